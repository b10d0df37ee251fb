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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from blip2cli.models.config import clean_config_dict
from blip2cli.models.eva_convert import convert_eva_state_dict, eva_vit_g_config
from blip2cli.models.vision import VISION_PRESETS

EVA_OPEN_CLIP = ("EVA01-g-14", "laion400m_s11b_b41k")


def load_vision_encoder(
    name_or_spec: str | dict[str, Any], image_size: int = 224, dtype: torch.dtype | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A vision encoder with pretrained trunk weights, in eval mode, and the spec that rebuilds it.

    ``image_size`` applies to names and to specs that do not state one. ``dtype`` (e.g. bf16) casts the
    trunk only; ``post_layernorm`` (BLIP-2's trainable ``ln_vision``) stays fp32. Without network access a
    hub download fails with a one-line ``RuntimeError`` that says how to pass a local file instead.
    """
    spec = _spec_from_name(name_or_spec, image_size) if isinstance(name_or_spec, str) else dict(name_or_spec)
    kind = spec.get("kind")
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


def _spec_from_name(name: str, image_size: int) -> dict[str, Any]:
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
