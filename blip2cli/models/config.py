"""The one configuration object that describes a BLIP-2 model built by blip2.

Field names follow transformers' ``Blip2Config`` so that a model whose vision encoder is EVA
(``Blip2VisionModel``) converts to and from a transformers checkpoint without renaming:

- ``vision``: ``{"kind": "eva", "config": <Blip2VisionConfig dict>}`` or, for encoders transformers'
  Blip2 classes cannot hold, ``{"kind": "open_clip", ...}`` / ``{"kind": "hf", ...}`` (see ``vision.py``).
- ``qformer``: keyword arguments of ``Blip2QFormerConfig``.
- ``text``: the frozen LLM's transformers config as a dict (``model_type`` included), or ``None`` for a
  stage-1 model, which has no LLM.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, PretrainedConfig

# OpenAI CLIP normalisation, used by every BLIP-2 image processor (LAVIS ``blip_processors.py``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONFIG_FILENAME = "blip2cli_config.json"
FORMAT_VERSION = 1


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
    stage: int = 2
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
