"""An open_clip visual tower as BLIP-2's frozen image encoder (spec (d)).

The tower is pruned to its penultimate block (or the spec's ``feature_layer``) with no final norm and no
projection (``prune_intermediate_layers(indices=[-2], prune_norm=True, prune_head=True)``), so every
parameter it keeps is used. ``trunk_features`` returns all tokens of that block, class token first
(257 for ViT-L/14 at 224 px). Works for open_clip's own ``VisionTransformer`` (CLIP ViT-L/14) and for
timm-based ViT towers (``EVA01-g-14``).

Spec (JSON-able, stored in ``Blip2ModelConfig.vision``)::

    {"kind": "open_clip", "model_name": "ViT-L-14-quickgelu", "pretrained": "openai",
     "force_quick_gelu": true, "hidden_size": 1024, "image_size": 224,
     "model_config": {...}}   # only for architectures registered at runtime

``pretrained`` is an open_clip tag or a local weights file (provenance, and what the QuickGELU check
reads); weights are only loaded with ``load_pretrained=True``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

LN_VISION_EPS = 1e-5  # LAVIS ln_vision is a default nn.LayerNorm


class OpenClipVisionEncoder(nn.Module):
    def __init__(self, trunk: nn.Module, spec: dict[str, Any]):
        super().__init__()
        self.trunk = trunk
        self.spec = spec
        self.post_layernorm = nn.LayerNorm(_tower_width(trunk), eps=LN_VISION_EPS)

    @property
    def hidden_size(self) -> int:
        return self.post_layernorm.normalized_shape[0]

    def trunk_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, prefix + patches, width): output of the last kept block, no norm."""
        out = self.trunk.forward_intermediates(
            pixel_values,
            indices=1,  # the last remaining block, i.e. the tower's penultimate one
            output_fmt="NLC",
            output_extra_tokens=True,
            intermediates_only=True,
        )
        patches = out["image_intermediates"][0]
        prefix = out.get("image_intermediates_prefix")
        return torch.cat([prefix[0], patches], dim=1) if prefix else patches

    @classmethod
    def from_spec(cls, spec: dict[str, Any], load_pretrained: bool = False, dtype: torch.dtype | None = None):
        """Build the tower from ``spec``: random weights, or the spec's ``pretrained`` ones.

        The returned module's ``spec`` is the resolved one (QuickGELU decided, sizes filled in,
        runtime-registered configs embedded), which rebuilds the same architecture offline.
        """
        import open_clip

        if spec.get("kind", "open_clip") != "open_clip":
            raise ValueError(f"not an open_clip spec: kind {spec.get('kind')!r}")
        name = spec["model_name"]
        if "/" in name or name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(
                f"open_clip model {name!r}: use a registered architecture name (pass its config as the spec's "
                "model_config) and a local weights file as pretrained"
            )
        model_config = spec.get("model_config")
        if model_config is not None:
            _register_config(name, model_config)
        base_config = open_clip.get_model_config(name)
        if base_config is None:
            raise ValueError(f"unknown open_clip architecture {name!r} (no built-in or registered config)")
        if model_config is None and not _is_builtin(name):
            model_config = base_config  # registered in this process only: keep it so the spec rebuilds anywhere
        pretrained = spec.get("pretrained")
        quick_gelu = resolve_quick_gelu(name, pretrained, base_config, spec.get("force_quick_gelu"))

        kwargs: dict[str, Any] = dict(
            force_quick_gelu=quick_gelu,
            force_image_size=spec.get("image_size"),
            pretrained_image=False,
            pretrained_text=False,
        )
        if load_pretrained and pretrained:
            model = _create_pretrained(open_clip, name, pretrained, **kwargs)
        else:
            with _quiet_random_init():
                model = open_clip.create_model(name, pretrained=None, **kwargs)
        visual = model.visual
        del model  # text tower and logit scale
        feature_layer = int(spec.get("feature_layer", -2))
        prune_to_layer(visual, feature_layer)
        if dtype is not None:
            visual.to(dtype)

        image_size = visual.image_size  # an int or an (h, w) pair
        if isinstance(image_size, (tuple, list)):
            image_size = image_size[0] if image_size[0] == image_size[1] else list(image_size)
        resolved = {
            "kind": "open_clip",
            "model_name": name,
            "pretrained": pretrained,
            "force_quick_gelu": quick_gelu,
            "hidden_size": _tower_width(visual),
            "image_size": image_size,
            "feature_layer": feature_layer,
        }
        if model_config is not None:
            resolved["model_config"] = model_config
        if spec.get("hidden_size") not in (None, resolved["hidden_size"]):
            raise ValueError(f"spec hidden_size {spec['hidden_size']} != {name} tower width {resolved['hidden_size']}")
        return cls(visual, resolved)


def resolve_quick_gelu(name: str, pretrained: str | None, model_config: dict, force: bool | None) -> bool:
    """Whether to force QuickGELU on ``name``, checked against what the ``pretrained`` tag was trained with.

    OpenAI weights need QuickGELU; plain ``ViT-L-14`` uses nn.GELU and silently degrades them, so
    ``force=None`` (auto) turns it on for such tags, and an explicit contradiction is an error.
    Local weight files carry no such information: set ``force_quick_gelu`` yourself for those.
    """
    import open_clip

    arch_quick = bool(model_config.get("quick_gelu", False))
    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained and not os.path.isfile(pretrained) else {}
    if not tag:
        if force is False and arch_quick:
            raise ValueError(f"{name} is a QuickGELU architecture; force_quick_gelu=False cannot turn that off")
        return bool(force) or arch_quick
    tag_quick = bool(tag.get("quick_gelu", False))
    if tag_quick and force is False and not arch_quick:
        raise ValueError(
            f"{name}:{pretrained} weights were trained with QuickGELU; force_quick_gelu=False would degrade them"
        )
    if not tag_quick and (arch_quick or force):
        raise ValueError(f"{name}:{pretrained} weights were trained with nn.GELU, not QuickGELU")
    if tag_quick and not arch_quick and not force:
        logger.info("%s:%s was trained with QuickGELU; forcing it", name, pretrained)
    return tag_quick


def prune_to_layer(visual: nn.Module, feature_layer: int = -2) -> None:
    """Keep the blocks up to ``feature_layer`` (-2: the penultimate, BLIP-2's; -1: all of them) and drop the
    final norm and the head/projection of an open_clip visual tower, in place."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        blocks = len(visual.transformer.resblocks)
        keep = _kept_blocks(blocks, feature_layer)
        visual.prune_intermediate_layers(indices=[keep - 1], prune_norm=True, prune_head=True)
        if len(visual.transformer.resblocks) != keep or not isinstance(visual.ln_post, nn.Identity):
            raise RuntimeError("open_clip prune_intermediate_layers did not drop the later blocks and ln_post")
        visual.attn_pool = visual.attn_pool_contrastive = None  # CoCa-style poolers, unused
    elif isinstance(visual, TimmModel) and all(hasattr(visual.trunk, a) for a in ("blocks", "num_prefix_tokens")):
        # timm ViT-like trunks (Eva, VisionTransformer); open_clip's wrapper has no prune method of its own
        blocks = len(visual.trunk.blocks)
        keep = _kept_blocks(blocks, feature_layer)
        visual.trunk.prune_intermediate_layers(indices=[keep - 1], prune_norm=True, prune_head=True)
        visual.head = nn.Identity()  # open_clip's projection after the timm trunk
        if len(visual.trunk.blocks) != keep or not isinstance(visual.trunk.norm, nn.Identity):
            raise RuntimeError("timm prune_intermediate_layers did not drop the later blocks and the final norm")
    else:
        raise ValueError(
            f"{type(visual).__name__} towers are not supported: BLIP-2 needs a ViT's block tokens "
            "(open_clip VisionTransformer or a timm ViT/EVA tower)"
        )


def _kept_blocks(blocks: int, feature_layer: int) -> int:
    """Blocks to keep so that the last kept one is ``feature_layer`` (-1 = last, -2 = penultimate, k >= 1 = the
    k-th block)."""
    keep = blocks + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= keep <= blocks:
        raise ValueError(f"feature layer {feature_layer} is out of range for a tower of {blocks} blocks")
    return keep


def open_clip_preprocessing(spec: dict[str, Any], size: int):
    """The preprocessing of an open_clip tower's pretrained tag (OpenAI CLIP's values for local weights)."""
    import open_clip

    from blip2cli.models.preprocessing import from_open_clip_config

    pretrained = spec.get("pretrained")
    tag = open_clip.get_pretrained_cfg(spec["model_name"], pretrained) if pretrained and not os.path.isfile(pretrained) else {}
    source = f"open_clip {spec['model_name']}:{pretrained}'s" if tag else f"open_clip {spec['model_name']}'s default"
    return from_open_clip_config(tag or {}, size, source)


class _quiet_random_init(logging.Filter):
    """Silence open_clip's root-logger warning that a model was initialised randomly: building from a
    spec is random by design, the weights come from our checkpoint afterwards."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    def __enter__(self):
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def _tower_width(visual: nn.Module) -> int:
    if hasattr(visual, "transformer"):
        return visual.transformer.width
    return visual.trunk.embed_dim


def _is_builtin(name: str) -> bool:
    import open_clip

    return (Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").is_file()


def _register_config(name: str, model_config: dict[str, Any]) -> None:
    """Make ``name`` resolvable by ``open_clip.create_model`` (spec (j): ``add_model_config``)."""
    import open_clip

    existing = open_clip.get_model_config(name)
    if existing == model_config:
        return
    if existing is not None:
        raise ValueError(f"open_clip already knows an architecture named {name!r} with a different config")
    # open_clip registers configs from files; its registry keeps the entry after the file is gone.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, f"{name}.json").write_text(json.dumps(model_config))
        open_clip.add_model_config(Path(tmp, f"{name}.json"))


def _create_pretrained(open_clip, name: str, pretrained: str, **kwargs):
    """``create_model`` with the ``pretrained`` tag or file; a failed download is one clear error."""
    if not os.path.isfile(pretrained):
        tag = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise RuntimeError(
                f"open_clip {name}: {pretrained!r} is neither a known tag (known: {tags}) nor a local file"
            )
        pretrained = fetch_open_clip_weights(name, pretrained)
    return open_clip.create_model(name, pretrained=pretrained, require_pretrained=True, **kwargs)


def fetch_open_clip_weights(name: str, tag: str, local_hint: str | None = None) -> str:
    """Local path of the weights file for an open_clip ``name``/``tag`` (downloaded or from the cache)."""
    import open_clip

    from blip2cli import hub

    hint = local_hint or f"open_clip:{name}:/path/to/open_clip_model.safetensors"
    # offline: one line now, not minutes of retries
    hub.require_open_clip(name, tag, "image encoder", local=f"pass a local file instead: {hint!r}")
    try:
        path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag))
    except Exception as err:
        raise RuntimeError(
            f"could not fetch open_clip weights {name}:{tag} ({short_error(err)}); "
            f"without network, pass a local file instead: {hint!r}"
        ) from err
    if not path:
        raise RuntimeError(f"open_clip has no download location for {name}:{tag}")
    return path


def short_error(err: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters, for one-line error messages."""
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
