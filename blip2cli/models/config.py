"""The one configuration object that describes a BLIP-2 model built by blip2.

Field names follow transformers' ``Blip2Config`` so that a model whose vision encoder is EVA
(``Blip2VisionModel``) converts to and from a transformers checkpoint without renaming:

- ``vision``: ``{"kind": "eva", "config": <Blip2VisionConfig dict>}`` or, for encoders transformers'
  Blip2 classes cannot hold, ``{"kind": "open_clip", ...}`` / ``{"kind": "hf", ...}`` (see ``vision.py``).
- ``qformer``: keyword arguments of ``Blip2QFormerConfig``.
- ``text``: the frozen LLM's transformers config as a dict (``model_type`` included), or ``None`` for a
  stage-1 model, which has no LLM.
- ``image_*``: how images are prepared for the encoder (``preprocessing.ImagePreprocessing``): the values
  the encoder was trained with unless a recipe chose others.
- ``usage``: how the model was trained to be used, so that ``ask``, ``eval`` and in-loop evaluation use it
  the same way unless told otherwise: ``vqa_prompt_template`` (``{}`` = the question), ``caption_prompt``
  (text a caption continues), ``end_token`` (text that ended every training text: "\\n" for OPT, else the
  EOS token), ``generation`` (``{"vqa" | "caption": {num_beams, max_new_tokens, ...}}``, the settings the
  recipe chose for its in-loop evaluation). Absent keys mean the protocol defaults (spec (g)).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, PretrainedConfig

from blip2cli.models.preprocessing import CLIP_MEAN, CLIP_STD  # noqa: F401  (re-exported)

CONFIG_FILENAME = "blip2cli_config.json"
# 2: image_resize / image_resize_shortest / image_interpolation and ``usage`` (format 1 files still load).
FORMAT_VERSION = 2

# Keys of ``Blip2ModelConfig.usage``: how the model was trained to be used (see the class docstring).
USAGE_KEYS = ("vqa_prompt_template", "caption_prompt", "end_token", "generation")


@dataclass
class Blip2ModelConfig:
    vision: dict[str, Any]
    qformer: dict[str, Any]
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    text: dict[str, Any] | None = None
    image_token_index: int | None = None
    image_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    image_resize: str = "square"  # "square" (BLIP-2) | "shortest_edge" (+ center crop), see preprocessing.py
    image_resize_shortest: int | None = None
    image_interpolation: str = "bicubic"
    stage: int = 2
    usage: dict[str, Any] = field(default_factory=dict)
    # Free-form provenance (where frozen parts came from, the recipe...). Never read by model code.
    extra: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- typed views
    @property
    def vision_kind(self) -> str:
        return self.vision["kind"]

    def qformer_config(self) -> Blip2QFormerConfig:
        return Blip2QFormerConfig(**self.qformer)

    def vision_config(self) -> Blip2VisionConfig:
        if self.vision_kind != "eva":
            raise ValueError(f"a {self.vision_kind!r} vision encoder has no Blip2VisionConfig")
        return Blip2VisionConfig(**self.vision["config"])

    def text_config(self) -> PretrainedConfig | None:
        if self.text is None:
            return None
        text = dict(self.text)
        return AutoConfig.for_model(text.pop("model_type"), **text)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.text and self.text.get("is_encoder_decoder", False))

    def stored_generation(self, kind: str) -> dict[str, Any]:
        """What this model was trained to be used with for ``kind`` "vqa" or "caption": ``prompt`` (the VQA
        template or the caption prompt) and the generation settings its recipe chose; absent keys were not
        recorded (use the protocol's defaults)."""
        if kind not in ("vqa", "caption"):
            raise ValueError(f"kind must be 'vqa' or 'caption', got {kind!r}")
        usage = self.usage or {}
        stored: dict[str, Any] = {}
        prompt = usage.get("vqa_prompt_template") if kind == "vqa" else usage.get("caption_prompt")
        if prompt is not None:
            stored["prompt"] = prompt
        stored.update((usage.get("generation") or {}).get(kind, {}))
        return stored

    @property
    def preprocessing(self):
        """The image preprocessing this model expects (``preprocessing.ImagePreprocessing``)."""
        from blip2cli.models.preprocessing import ImagePreprocessing

        return ImagePreprocessing.from_config(self)

    @property
    def has_transformers_equivalent(self) -> bool:
        """True when transformers' Blip2 classes can hold every weight of this model losslessly."""
        return self.vision_kind == "eva"

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Blip2ModelConfig":
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"checkpoint format {version} is newer than this blip2 understands ({FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys in {CONFIG_FILENAME}: {', '.join(unknown)}")
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key])
        unknown_usage = sorted(set(data.get("usage") or {}) - set(USAGE_KEYS))
        if unknown_usage:
            raise ValueError(f"unknown usage keys in {CONFIG_FILENAME}: {', '.join(unknown_usage)}")
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_FILENAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Blip2ModelConfig":
        return cls.from_dict(json.loads(Path(directory, CONFIG_FILENAME).read_text()))

    # ----------------------------------------------------------------- transformers interop
    @classmethod
    def from_hf(cls, hf_config: Blip2Config, image_size: int | None = None) -> "Blip2ModelConfig":
        vision = clean_config_dict(hf_config.vision_config.to_dict())
        qformer = clean_config_dict(hf_config.qformer_config.to_dict())
        text = clean_config_dict(hf_config.text_config.to_dict()) if hf_config.text_config is not None else None
        return cls(
            vision={"kind": "eva", "config": vision},
            qformer=qformer,
            num_query_tokens=hf_config.num_query_tokens,
            image_text_hidden_size=hf_config.image_text_hidden_size,
            text=text,
            image_token_index=hf_config.image_token_index,
            image_size=image_size or hf_config.vision_config.image_size,
        )

    def to_hf(self) -> Blip2Config:
        if not self.has_transformers_equivalent:
            raise ValueError(
                f"a model with a {self.vision_kind!r} vision encoder cannot be represented by transformers' "
                "Blip2 classes (Blip2VisionModel holds EVA-style ViTs only)"
            )
        text_config = self.text_config()
        kwargs: dict[str, Any] = {}
        if text_config is not None:
            kwargs["text_config"] = text_config.to_dict()
        return Blip2Config(
            vision_config=self.vision_config().to_dict(),
            qformer_config=self.qformer_config().to_dict(),
            num_query_tokens=self.num_query_tokens,
            image_text_hidden_size=self.image_text_hidden_size,
            image_token_index=self.image_token_index,
            **kwargs,
        )


_VOLATILE_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"}


def clean_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop keys that describe a save event rather than the architecture."""
    return {k: v for k, v in config_dict.items() if k not in _VOLATILE_KEYS}
