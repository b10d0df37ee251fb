"""How images are turned into pixel values for an image encoder: size, resize/crop, interpolation, mean/std.

A frozen encoder only sees what it was trained on if its inputs are prepared as they were in its own
training. So the values come from the encoder itself (spec section (d) gives the paper's):

- BLIP-2's own encoders (EVA ViT-g, OpenAI CLIP ViT-L) and blip2's tiny test encoder: the paper's values,
  a square bicubic resize to 224 px (no crop) with OpenAI CLIP mean/std (LAVIS ``blip_image_eval``);
- any transformers vision model (``hf:``): its own image-processor config (``preprocessor_config.json``),
  e.g. DINOv2's shortest-edge 256 + center crop 224 with ImageNet mean/std, SigLIP's 0.5/0.5;
- any other open_clip tower: the pretrained tag's preprocessing config.

Each value can be overridden from a recipe (``model.image_size``, ``model.image_mean``, ...); whatever is
chosen is stored in the checkpoint (``Blip2ModelConfig``) so that eval and inference prepare images the
same way. Training keeps BLIP-2's augmentation (random resized crop + flip) at the chosen size, with the
chosen mean/std and interpolation.

The training loaders send images as uint8 pixels (a quarter of fp32's bytes host -> device); the model
normalises them on the device with its own mean/std (``ImagePreprocessing.normalized``, called by
``Blip2Base.image_features``), bit-identical to torchvision's ``ToTensor`` + ``Normalize`` on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# OpenAI CLIP normalisation, used by every BLIP-2 image processor (LAVIS ``blip_processors.py``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# "square": resize to size x size, aspect not kept, nothing cut (BLIP-2's eval transform).
# "shortest_edge": resize the shorter side to ``resize_shortest`` (aspect kept), then center-crop size x size
# (CLIP / DINOv2-style eval transforms).
RESIZE_MODES = ("square", "shortest_edge")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
# PIL resample codes as stored by transformers image processors.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
PIL_RESAMPLE_CODES = {name: code for code, name in _PIL_RESAMPLE.items()}


@dataclass(frozen=True)
class ImagePreprocessing:
    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: str = "square"
    resize_shortest: int | None = None  # "shortest_edge" only; None = size (crop nothing but the longer side)
    interpolation: str = "bicubic"
    source: str = "BLIP-2's (paper)"  # where the values came from; printed, never stored

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"image resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.size <= 0 or (self.resize_shortest is not None and self.resize_shortest < self.size):
            raise ValueError(f"bad image sizes: size {self.size}, shortest edge {self.resize_shortest}")

    @property
    def shortest_edge(self) -> int:
        return self.resize_shortest or self.size

    def normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (the training loaders') -> float32 normalised with this mean/std (``normalize_uint8``);
        float pixels are taken as normalised already and returned unchanged."""
        import torch

        return normalize_uint8(pixels, self.mean, self.std) if pixels.dtype == torch.uint8 else pixels

    def describe(self) -> str:
        if self.resize == "square":
            how = f"square resize to {self.size} px"
        else:
            how = f"shortest edge {self.shortest_edge} px + center crop {self.size} px"
        mean = ", ".join(f"{v:.4g}" for v in self.mean)
        std = ", ".join(f"{v:.4g}" for v in self.std)
        return f"{how}, {self.interpolation}, mean ({mean}), std ({std})"

    def config_fields(self) -> dict[str, Any]:
        """The ``Blip2ModelConfig`` fields that store these values."""
        return {
            "image_size": self.size, "image_mean": tuple(self.mean), "image_std": tuple(self.std),
            "image_resize": self.resize, "image_resize_shortest": self.resize_shortest,
            "image_interpolation": self.interpolation,
        }

    @classmethod
    def from_config(cls, config, source: str = "the checkpoint's") -> "ImagePreprocessing":
        return cls(
            size=config.image_size, mean=tuple(config.image_mean), std=tuple(config.image_std),
            resize=config.image_resize, resize_shortest=config.image_resize_shortest,
            interpolation=config.image_interpolation, source=source,
        )

    def with_overrides(self, **overrides: Any) -> tuple["ImagePreprocessing", list[str]]:
        """Apply the values that are not None; return the result and one line per value that changed."""
        notes = []
        changes = {}
        for key, value in overrides.items():
            if value is None:
                continue
            value = tuple(float(v) for v in value) if key in ("mean", "std") else value
            old = getattr(self, key)
            if value != old:
                notes.append(f"model.image_{_RECIPE_NAMES[key]} = {_show(value)} replaces {self.source} {_show(old)}")
            changes[key] = value
        if changes.get("resize", self.resize) == "square":
            changes["resize_shortest"] = None
        elif "size" in changes and "resize_shortest" not in changes and self.resize_shortest:
            # keep the encoder's crop ratio (DINOv2: 224 of 256) at the new size
            changes["resize_shortest"] = round(changes["size"] * self.resize_shortest / self.size)
        return replace(self, **changes), notes


_RECIPE_NAMES = {"size": "size", "mean": "mean", "std": "std", "resize": "resize",
                 "resize_shortest": "resize_shortest", "interpolation": "interpolation"}


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:.4g}" for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


def normalize_uint8(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (..., 3, H, W) pixels -> float32 ``(x / 255 - mean) / std`` on the pixels' device.

    Bit-identical to torchvision's ``Normalize(mean, std)(ToTensor()(image))``: the same fp32 ops in the same
    order (``div(255)``, ``sub(mean)``, ``div(std)``, mean/std as float32 tensors), also under autocast
    (these ops do not autocast). Only eager: a compiled graph may fuse them differently.
    """
    import torch

    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device)
    # 255 as a device tensor: CUDA multiplies by the reciprocal of a Python-scalar divisor (one ulp off)
    scale = torch.full((), 255.0, device=pixels.device)
    return pixels.float().div(scale).sub(mean[:, None, None]).div(std[:, None, None])


def paper_preprocessing(size: int = 224) -> ImagePreprocessing:
    return ImagePreprocessing(size=size)


def from_image_processor_dict(values: dict[str, Any], source: str) -> ImagePreprocessing:
    """The preprocessing a transformers image-processor config describes (``preprocessor_config.json``).

    ``size`` ``{"height", "width"}`` without a crop is a square resize; ``{"shortest_edge": E}`` with a
    ``crop_size`` is shortest-edge resize + center crop. Non-square targets are refused (BLIP-2 feeds square
    images); a config that does not normalise gets mean 0 / std 1.
    """
    size = values.get("size")
    crop = values.get("crop_size") if values.get("do_center_crop") else None
    resize_shortest = None
    if isinstance(size, int):  # very old configs: one number = shortest edge for CLIP-style processors
        size = {"shortest_edge": size}
    if crop is not None:
        final = _square(crop, source, "crop_size")
        if isinstance(size, dict) and "shortest_edge" in size:
            resize, resize_shortest = "shortest_edge", int(size["shortest_edge"])
        else:
            resize, final = "square", _square(size, source, "size")
    elif isinstance(size, dict) and "shortest_edge" in size:
        resize, final = "shortest_edge", int(size["shortest_edge"])
    else:
        resize, final = "square", _square(size, source, "size")
    if values.get("do_normalize", True):
        mean = tuple(float(v) for v in values.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in values.get("image_std", CLIP_STD))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = values.get("resample", 3)
    interpolation = _PIL_RESAMPLE.get(int(resample), "bicubic") if resample is not None else "bicubic"
    if resize_shortest is not None and resize_shortest < final:
        resize_shortest = final
    return ImagePreprocessing(final, mean, std, resize, resize_shortest, interpolation, source)


def _square(size: Any, source: str, key: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width"):
        return int(size["height"])
    raise ValueError(f"{source}: {key} {size!r} is not a square size; set model.image_size explicitly")


def from_open_clip_config(values: dict[str, Any], size: int, source: str) -> ImagePreprocessing:
    """open_clip's preprocessing config (``mean``, ``std``, ``interpolation``, ``resize_mode``)."""
    mode = values.get("resize_mode", "shortest")
    resize = "square" if mode == "squash" else "shortest_edge"
    interpolation = values.get("interpolation", "bicubic")
    return ImagePreprocessing(
        size=size, mean=tuple(float(v) for v in values.get("mean", CLIP_MEAN)),
        std=tuple(float(v) for v in values.get("std", CLIP_STD)), resize=resize,
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic", source=source,
    )
