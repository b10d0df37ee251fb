"""Any transformers vision transformer as BLIP-2's frozen image encoder.

CLIPVisionModel, SiglipVisionModel, Dinov2Model, ViTModel...: anything whose forward takes
``pixel_values`` and returns ``hidden_states`` of shape (B, tokens, hidden). A two-tower checkpoint
(CLIPModel, SiglipModel) contributes its ``vision_model``. Features are ``hidden_states[feature_layer]``
(transformers records block outputs before any final norm), prefix tokens (CLS, registers) first when the
model has them. ``feature_layer`` defaults by family (``default_feature_layer``): -2, the penultimate
block, for CLIP towers, as BLIP-2 uses its CLIP ViT-L; -1, the last block, for every other model (DINOv2,
SigLIP, ViT...), whose own users read the last block. A recipe sets it with ``model.vision_feature_layer``.

Images are prepared as the model's own image processor says (``hf_preprocessing``: its
``preprocessor_config.json``), see ``preprocessing.py``.

Spec (JSON-able, stored in ``Blip2ModelConfig.vision``)::

    {"kind": "hf", "name_or_path": "facebook/dinov2-base", "config": {<vision config, model_type included>},
     "feature_layer": -2, "hidden_size": 768, "image_size": 224}

``config`` rebuilds the architecture offline; ``name_or_path`` is where real weights come from.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from blip2cli import hub
from blip2cli.models.config import clean_config_dict
from blip2cli.models.preprocessing import ImagePreprocessing, from_image_processor_dict

LN_VISION_EPS = 1e-5  # LAVIS ln_vision is a default nn.LayerNorm
# Model types whose penultimate block feeds the Q-Former by default (BLIP-2 uses CLIP ViT-L's penultimate block).
PENULTIMATE_MODEL_TYPES = frozenset({"clip", "clip_vision_model"})


def default_feature_layer(config) -> int:
    """-2 (penultimate block) for CLIP towers, as BLIP-2; -1 (last block) for every other family."""
    return -2 if getattr(config, "model_type", None) in PENULTIMATE_MODEL_TYPES else -1


class HFVisionEncoder(nn.Module):
    def __init__(
        self,
        trunk: PreTrainedModel,
        feature_layer: int | None = None,
        image_size: int | None = None,
        name_or_path: str | None = None,
    ):
        super().__init__()
        config = trunk.config
        width = getattr(config, "hidden_size", None)
        layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(width, int) or not isinstance(layers, int):
            raise ValueError(
                f"{type(trunk).__name__} is not a ViT-like model (needs integer hidden_size and num_hidden_layers)"
            )
        if feature_layer is None:
            feature_layer = default_feature_layer(config)
        if not -(layers + 1) <= feature_layer <= layers:
            raise ValueError(
                f"feature_layer {feature_layer} out of range for {layers} layers (hidden_states has {layers + 1})"
            )
        self.trunk = trunk
        self.feature_layer = feature_layer
        self.name_or_path = name_or_path
        native = getattr(config, "image_size", None)
        self.native_image_size = native
        self.image_size = image_size or native
        # Models with fixed position tables (CLIP, SigLIP, ViT) resize them on request; DINOv2 always does.
        self._accepts_interpolation = "interpolate_pos_encoding" in inspect.signature(trunk.forward).parameters
        self.interpolate_pos_encoding = bool(native and self.image_size != native and self._accepts_interpolation)
        self.post_layernorm = nn.LayerNorm(width, eps=LN_VISION_EPS)

    @property
    def hidden_size(self) -> int:
        return self.post_layernorm.normalized_shape[0]

    @property
    def num_layers(self) -> int:
        return self.trunk.config.num_hidden_layers

    @property
    def patch_size(self) -> int | None:
        patch = getattr(self.trunk.config, "patch_size", None)
        return patch[0] if isinstance(patch, (tuple, list)) else patch

    @property
    def spec(self) -> dict[str, Any]:
        config = self.trunk.config
        return {
            "kind": "hf",
            "name_or_path": self.name_or_path,
            "config": clean_config_dict(config.to_dict()),
            "feature_layer": self.feature_layer,
            "hidden_size": self.hidden_size,
            "image_size": self.image_size,
        }

    def trunk_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Images of another size than the position table's (a fine-tuning recipe's model.image_size) are
        # interpolated too, whatever size the encoder was built for.
        other_size = self.native_image_size and pixel_values.shape[-1] != self.native_image_size
        interpolate = self.interpolate_pos_encoding or (other_size and self._accepts_interpolation)
        kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
        out = self.trunk(pixel_values=pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        hidden = out.hidden_states[self.feature_layer]
        if hidden.ndim != 3:
            raise ValueError(
                f"{type(self.trunk).__name__} hidden states have shape {tuple(hidden.shape)}, not (B, tokens, width)"
            )
        return hidden

    @classmethod
    def from_spec(cls, spec: dict[str, Any], load_pretrained: bool = False, dtype: torch.dtype | None = None):
        """Rebuild from ``spec["config"]`` (random weights), or load ``spec["name_or_path"]``'s weights."""
        if spec.get("kind", "hf") != "hf":
            raise ValueError(f"not an hf spec: kind {spec.get('kind')!r}")
        name_or_path = spec.get("name_or_path")
        if load_pretrained:
            if not name_or_path:
                raise ValueError("an hf vision spec needs name_or_path to load weights")
            trunk = load_hf_vision_trunk(name_or_path, dtype)
        else:
            if not spec.get("config"):
                raise ValueError("an hf vision spec needs its config to be rebuilt without the hub")
            config = dict(spec["config"])
            config = AutoConfig.for_model(config.pop("model_type"), **config)
            trunk = AutoModel.from_config(config)
            if dtype is not None:
                trunk.to(dtype)

        encoder = cls(trunk, spec.get("feature_layer"), spec.get("image_size"), name_or_path)
        if spec.get("hidden_size") not in (None, encoder.hidden_size):
            raise ValueError(f"spec hidden_size {spec['hidden_size']} != model hidden size {encoder.hidden_size}")
        return encoder


def load_hf_vision_trunk(name_or_path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a hub id or local directory with ``AutoModel``; keep only the vision tower of a two-tower model."""
    if hub.looks_like_hub_id(name_or_path):
        hub.require(name_or_path, "image encoder", f"hf:{name_or_path}",
                    local="pass a local directory instead: 'hf:/path/to/model'")
    try:
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as err:
        if Path(name_or_path).exists():
            raise
        from blip2cli.models.vision_open_clip import short_error

        raise RuntimeError(
            f"could not fetch hf model {name_or_path!r} ({short_error(err)}); "
            "without network, pass a local directory instead: 'hf:/path/to/model'"
        ) from err
    if hasattr(model.config, "vision_config"):  # CLIPModel, SiglipModel...: a composite with a vision tower
        vision = getattr(model, "vision_model", None)
        if not isinstance(vision, PreTrainedModel):
            raise ValueError(f"{type(model).__name__} has no vision_model tower usable on its own")
        model = vision
    return model



def hf_preprocessing(name_or_path: str) -> ImagePreprocessing | None:
    """The preprocessing in a transformers model's image-processor config, or None when it has none."""
    from transformers.image_processing_base import ImageProcessingMixin

    if hub.looks_like_hub_id(name_or_path):
        hub.require(name_or_path, "image encoder", f"hf:{name_or_path}",
                    local="pass a local directory instead: 'hf:/path/to/model'")
    try:
        values, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    except (OSError, ValueError) as err:
        if Path(name_or_path).is_dir():
            return None  # a local model directory without preprocessor_config.json
        from blip2cli.models.vision_open_clip import short_error

        raise RuntimeError(
            f"could not fetch the image-processor config of hf model {name_or_path!r} ({short_error(err)}); "
            "without network, pass a local directory instead: 'hf:/path/to/model'"
        ) from err
    if not values:
        return None
    return from_image_processor_dict(values, source=f"{name_or_path}'s image processor")
