"""Frozen image encoders with real pretrained weights, chosen by name (``--vision``) or by spec.

Names:

``eva-vit-g``                     EVA01-CLIP-g/14 (open_clip ``EVA01-g-14``, tag ``laion400m_s11b_b41k``, the
                                  weights LAVIS's ``eva_vit_g.pth`` comes from) converted to transformers'
                                  ``Blip2VisionModel``: 39 of 40 blocks, 1408 wide, no final norm.
``eva-vit-g:/path/file``          the same from a local file: open_clip/EVA-CLIP checkpoint, LAVIS
                                  ``eva_vit_g.pth`` or a timm ``Eva`` state dict (.pt/.pth/.bin/.safetensors).
``clip-vit-l``                    OpenAI CLIP ViT-L/14 through open_clip (``ViT-L-14-quickgelu``, ``openai``).
``open_clip:MODEL[:PRETRAINED]``  any open_clip ViT tower; PRETRAINED is a tag or a local weights file.
``hf:HUB_ID_OR_PATH``             any transformers ViT-like vision model (see ``vision_hf.py``).

A spec dict (``{"kind": "open_clip" | "hf" | "eva", ...}``) works too; an ``eva`` spec may name a local
``pretrained`` file and carry its own ``config``.

``encoder_preprocessing(name)`` tells how images must be prepared for the named encoder (its own
image-processor or pretrained config; the paper's values for EVA and CLIP ViT-L), and ``describe_encoder``
which hidden layer feeds the Q-Former: both are printed when training starts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from blip2cli import hub
from blip2cli.models.config import clean_config_dict
from blip2cli.models.eva_convert import convert_eva_state_dict, eva_vit_g_config
from blip2cli.models.preprocessing import ImagePreprocessing, paper_preprocessing
from blip2cli.models.vision import VISION_PRESETS

EVA_OPEN_CLIP = ("EVA01-g-14", "laion400m_s11b_b41k")


def load_vision_encoder(
    name_or_spec: str | dict[str, Any],
    image_size: int = 224,
    dtype: torch.dtype | None = None,
    feature_layer: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A vision encoder with pretrained trunk weights, in eval mode, and the spec that rebuilds it.

    ``image_size`` applies to names and to specs that do not state one. ``dtype`` (e.g. bf16) casts the
    trunk only; ``post_layernorm`` (BLIP-2's trainable ``ln_vision``) stays fp32. ``feature_layer``: the
    hidden layer the Q-Former reads (None: the family's default, see ``describe_encoder``). Without network
    access a hub download fails with a one-line ``RuntimeError`` that says how to pass a local file instead.
    """
    spec = _spec_from_name(name_or_spec, image_size) if isinstance(name_or_spec, str) else dict(name_or_spec)
    kind = spec.get("kind")
    if feature_layer is not None:
        if kind == "eva":
            if feature_layer != -2:
                raise ValueError(
                    f"vision feature layer {feature_layer}: the EVA ViT-g encoder is built with 39 of its 40 blocks "
                    "(the penultimate block, BLIP-2's); only -2 is possible"
                )
        else:
            spec["feature_layer"] = feature_layer
    if kind == "eva":
        if spec.get("config"):
            config = Blip2VisionConfig(**{"image_size": image_size, **spec["config"]})
        else:
            config = eva_vit_g_config(image_size)
        model = load_eva_vision_model(spec.get("pretrained"), config, dtype)
        spec = {"kind": "eva", "config": clean_config_dict(config.to_dict())}
    elif kind == "open_clip":
        from blip2cli.models.vision_open_clip import OpenClipVisionEncoder

        model = OpenClipVisionEncoder.from_spec({"image_size": image_size, **spec}, load_pretrained=True, dtype=dtype)
        spec = model.spec
    elif kind == "hf":
        from blip2cli.models.vision_hf import HFVisionEncoder

        model = HFVisionEncoder.from_spec({"image_size": image_size, **spec}, load_pretrained=True, dtype=dtype)
        spec = model.spec
    else:
        raise ValueError(f"unknown vision encoder kind {kind!r}; expected one of eva, open_clip, hf")
    return model.eval(), spec


def encoder_preprocessing(name_or_spec: str | dict[str, Any]) -> ImagePreprocessing:
    """How images must be prepared for this encoder: its own preprocessing where it has one (``hf:``
    models, open_clip tags), the paper's for EVA ViT-g and CLIP ViT-L (spec (d))."""
    spec = _spec_from_name(name_or_spec, None) if isinstance(name_or_spec, str) else dict(name_or_spec)
    kind = spec.get("kind")
    preset = isinstance(name_or_spec, str) and (name_or_spec in VISION_PRESETS or name_or_spec.startswith("eva-vit-g"))
    if kind == "eva" or preset:
        size = (spec.get("config") or {}).get("image_size") or 224
        return paper_preprocessing(size)
    if kind == "open_clip":
        import open_clip

        from blip2cli.models.vision_open_clip import open_clip_preprocessing

        config = spec.get("model_config") or open_clip.get_model_config(spec["model_name"]) or {}
        size = (config.get("vision_cfg") or {}).get("image_size", 224)
        return open_clip_preprocessing(spec, int(size[0] if isinstance(size, (list, tuple)) else size))
    if kind == "hf":
        from blip2cli.models.vision_hf import hf_preprocessing

        found = hf_preprocessing(spec["name_or_path"])
        if found is None:
            native = _hf_native_size(spec["name_or_path"])
            return ImagePreprocessing(
                size=native or 224,
                source=f"BLIP-2's (paper; {spec['name_or_path']} has no preprocessor_config.json)",
            )
        return found
    raise ValueError(f"unknown vision encoder kind {kind!r}; expected one of eva, open_clip, hf")


def _hf_native_size(name_or_path: str) -> int | None:
    from transformers import AutoConfig

    if hub.looks_like_hub_id(name_or_path):
        hub.require(name_or_path, "image encoder", f"hf:{name_or_path}",
                    local="pass a local directory instead: 'hf:/path/to/model'")
    config = AutoConfig.from_pretrained(name_or_path)
    config = getattr(config, "vision_config", None) or config
    size = getattr(config, "image_size", None)
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


def describe_encoder(model: nn.Module, spec: dict[str, Any]) -> str:
    """One line: which of the encoder's hidden layers feeds the Q-Former, and why."""
    kind = spec.get("kind")
    if kind == "eva":
        layers = spec.get("config", {}).get("num_hidden_layers", "?")
        return (f"image encoder: EVA-style ViT ({layers} blocks kept); the Q-Former reads the output of its last kept "
                "block (for EVA ViT-g: the penultimate of 40, as the paper)")
    layer = spec.get("feature_layer", -2)
    if kind == "hf":
        family = model.trunk.config.model_type
        layers = model.num_layers
        which = {-1: "the last block", -2: "the penultimate block"}.get(layer, f"hidden state {layer}")
        from blip2cli.models.vision_hf import default_feature_layer

        why = "the default for" if layer == default_feature_layer(model.trunk.config) else "set for"
        return (f"image encoder: {family} ({layers} blocks); the Q-Former reads {which} (layer {layer}, {why} "
                f"{family}; model.vision_feature_layer sets it)")
    which = {-1: "the last block", -2: "the penultimate block, as the paper"}.get(layer, f"block {layer}")
    return (f"image encoder: open_clip {spec.get('model_name')}; the Q-Former reads {which} (layer {layer}; "
            "model.vision_feature_layer sets it)")


def _spec_from_name(name: str, image_size: int | None) -> dict[str, Any]:
    if name == "eva-vit-g" or name.startswith("eva-vit-g:"):
        return {"kind": "eva", "pretrained": name.partition(":")[2] or None}
    if name in VISION_PRESETS:
        return {**VISION_PRESETS[name], "image_size": image_size}
    if name.startswith("open_clip:"):
        model_name, _, pretrained = name[len("open_clip:"):].partition(":")
        if not model_name:
            raise ValueError("expected open_clip:MODEL[:PRETRAINED]")
        pretrained = pretrained or None
        return {"kind": "open_clip", "model_name": model_name, "pretrained": pretrained, "image_size": image_size}
    if name.startswith("hf:"):
        if not name[3:]:
            raise ValueError("expected hf:HUB_ID_OR_PATH")
        return {"kind": "hf", "name_or_path": name[3:], "image_size": image_size}
    choices = ", ".join([*VISION_PRESETS, "eva-vit-g:FILE", "open_clip:MODEL[:PRETRAINED]", "hf:HUB_ID_OR_PATH"])
    raise ValueError(f"unknown vision encoder {name!r}; expected one of {choices}")


def load_eva_vision_model(
    weights: str | None, config: Blip2VisionConfig | None = None, dtype: torch.dtype | None = None
) -> Blip2VisionModel:
    """EVA weights (a local file, or EVA01-g-14 ``laion400m_s11b_b41k`` from the hub) as a ``Blip2VisionModel``."""
    config = config or eva_vit_g_config()
    if weights is None:
        from blip2cli.models.vision_open_clip import fetch_open_clip_weights

        weights = fetch_open_clip_weights(*EVA_OPEN_CLIP, local_hint="eva-vit-g:/path/to/eva_weights.pth")
    return eva_vision_model_from_state_dict(read_state_dict(weights), config, dtype)


def eva_vision_model_from_state_dict(
    state_dict: dict[str, torch.Tensor], config: Blip2VisionConfig, dtype: torch.dtype | None = None
) -> Blip2VisionModel:
    """Convert (strictly) and load into a ``Blip2VisionModel`` with a fresh fp32 ``post_layernorm``."""
    converted = convert_eva_state_dict(state_dict, config)
    converted = {k: v.to(dtype or torch.float32) for k, v in converted.items()}
    # ln_vision starts as a default LayerNorm (LAVIS); it is trained by BLIP-2.
    converted["post_layernorm.weight"] = torch.ones(config.hidden_size)
    converted["post_layernorm.bias"] = torch.zeros(config.hidden_size)
    with torch.device("meta"):  # no throwaway random init of a 1B-parameter tower
        model = Blip2VisionModel(config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / torch checkpoint, unwrapped from ``state_dict`` / ``model`` / ``module``."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
