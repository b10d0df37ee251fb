"""Frozen image encoders, selected by name, each followed by BLIP-2's trainable ``ln_vision``.

Every encoder exposes the same two pieces, so the rest of the model never asks which one it has:

- the frozen *trunk*: image -> token features of the penultimate block (no final norm), run under
  ``no_grad`` in eval mode, optionally in bf16/fp16;
- ``post_layernorm``: BLIP-2's ``ln_vision``, trainable, computed in fp32.

``eva``       transformers' ``Blip2VisionModel`` itself (EVA ViT-g/14 with 39 of its 40 blocks), so a
              BLIP-2 checkpoint's ``vision_model.*`` keys load unchanged.
``open_clip`` an open_clip visual tower (CLIP ViT-L/14 as BLIP-2's ViT-L variant), see ``OpenClipVisionEncoder``.
``hf``        any transformers vision model returning hidden states, see ``HFVisionEncoder``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

# Named presets accepted wherever a vision encoder is chosen by name (`--vision`).
VISION_PRESETS: dict[str, dict[str, Any]] = {
    # EVA01-CLIP-g/14 as BLIP-2 uses it: 40 blocks minus the last, no final norm.
    "eva-vit-g": {"kind": "eva", "config": Blip2VisionConfig().to_dict()},
    # OpenAI CLIP ViT-L/14 through open_clip: QuickGELU, penultimate block, all 257 tokens.
    "clip-vit-l": {
        "kind": "open_clip",
        "model_name": "ViT-L-14-quickgelu",
        "pretrained": "openai",
        "hidden_size": 1024,
    },
}


def trunk_features(vision_model: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
    """Token features of the (frozen) trunk, before ``ln_vision``."""
    if isinstance(vision_model, Blip2VisionModel):
        # Another size than the position table's (fine-tuning at 364 px from 224) is interpolated, as LAVIS does.
        interpolate_pos_encoding = interpolate_pos_encoding or pixel_values.shape[-1] != vision_model.config.image_size
        hidden = vision_model.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return vision_model.encoder(inputs_embeds=hidden).last_hidden_state
    return vision_model.trunk_features(pixel_values)


def trunk_parameters(vision_model: nn.Module):
    """Every parameter except ``post_layernorm``'s (those are BLIP-2's trainable ``ln_vision``)."""
    return [p for name, p in vision_model.named_parameters() if not name.startswith("post_layernorm.")]


def trunk_dtype(vision_model: nn.Module) -> torch.dtype:
    params = trunk_parameters(vision_model)
    return params[0].dtype if params else torch.float32


def encode_images(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    train_trunk: bool = False,
    interpolate_pos_encoding: bool = False,
) -> torch.Tensor:
    """Image -> (B, tokens, width) features after ``ln_vision``, in the LayerNorm's dtype (fp32 by default)."""
    with torch.set_grad_enabled(train_trunk and torch.is_grad_enabled()):
        hidden = trunk_features(
            vision_model, pixel_values.to(trunk_dtype(vision_model)), interpolate_pos_encoding=interpolate_pos_encoding
        )
    return ln_vision(vision_model, hidden)


def ln_vision(vision_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """BLIP-2's trainable ``ln_vision`` (the encoder's ``post_layernorm``) on trunk features, e.g. features
    read from a frozen-feature cache (``blip2cli/data/feature_cache.py``)."""
    norm = vision_model.post_layernorm
    # LAVIS computes ln_vision in fp32 and so do we, whatever the trunk's dtype.
    return F.layer_norm(hidden.to(norm.weight.dtype), norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def vision_hidden_size(vision_model: nn.Module) -> int:
    return vision_model.post_layernorm.normalized_shape[0]


def vision_patch_size(vision_model: nn.Module) -> int | None:
    """The encoder's square patch size in pixels, or None when it has none (a CNN)."""
    if isinstance(vision_model, Blip2VisionModel):
        patch = vision_model.config.patch_size
    elif hasattr(vision_model, "patch_size"):
        patch = vision_model.patch_size
    else:
        trunk = getattr(vision_model, "trunk", None)
        patch = getattr(trunk, "patch_size", None)
        if patch is None:
            embed = getattr(getattr(trunk, "trunk", trunk), "patch_embed", None)  # open_clip timm towers
            patch = getattr(embed, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[0]
    return int(patch) if patch else None


def build_vision_model(spec: dict[str, Any]) -> nn.Module:
    """Build a randomly initialised encoder from its spec (weights are loaded afterwards)."""
    kind = spec["kind"]
    if kind == "eva":
        return Blip2VisionModel(Blip2VisionConfig(**spec["config"]))
    if kind == "open_clip":
        from blip2cli.models.vision_open_clip import OpenClipVisionEncoder

        return OpenClipVisionEncoder.from_spec(spec, load_pretrained=False)
    if kind == "hf":
        from blip2cli.models.vision_hf import HFVisionEncoder

        return HFVisionEncoder.from_spec(spec, load_pretrained=False)
    raise ValueError(f"unknown vision encoder kind {kind!r}; expected one of eva, open_clip, hf")


def freeze_trunk(vision_model: nn.Module) -> None:
    for p in trunk_parameters(vision_model):
        p.requires_grad_(False)
