"""Reading images from paths or http(s) URLs, with one-line errors for anything unreadable, and batching them
for a model (``image_batches``, shared by ``blip2 eval`` and the batch inference commands)."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from PIL import Image, UnidentifiedImageError

from blip2cli.errors import ImageError

if TYPE_CHECKING:
    import torch

URL_TIMEOUT_S = 20


def load_image(source: str | Path) -> Image.Image:
    """An RGB PIL image from a local path or an http(s) URL."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=URL_TIMEOUT_S) as response:
                data = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ImageError(f"cannot fetch image {text}: {reason}") from None
        return decode_image(io.BytesIO(data), text)
    path = Path(text).expanduser()
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image")
    return decode_image(path, str(path))


def decode_image(fp, name: str) -> Image.Image:
    try:
        with Image.open(fp) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        kind = "not an image" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
        raise ImageError(f"{name}: {kind}") from None


# --------------------------------------------------------------------------- batches for a model
class ImageBatch(NamedTuple):
    positions: list[int]  # indices into the sources, in order
    pixel_values: "torch.Tensor | None"  # (len(positions), 3, H, W); None when every image of the batch failed
    failures: list[tuple[int, str]]  # (index, one-line reason) of the unreadable images of this batch


class _ProcessedImages:
    """A map-style dataset of processed images. An unreadable image comes back as its error message, not an
    exception, so that worker processes never turn it into a traceback. A source is a path (or URL) or an
    object with ``load() -> PIL.Image`` (see ``blip2cli.inference.inputs.ImageRef``)."""

    def __init__(self, sources: Sequence, image_processor):
        self.sources = list(sources)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source = self.sources[index]
        try:
            image = source.load() if hasattr(source, "load") else load_image(source)
        except ImageError as err:
            return index, None, str(err)
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return index, pixels, None


def _collate(batch):
    import torch

    good = [(i, p) for i, p, error in batch if error is None]
    failures = [(i, error) for i, _, error in batch if error is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return ImageBatch([i for i, _ in good], pixels, failures)


def image_batches(sources: Sequence, image_processor, batch_size: int, num_workers: int = 0,
                  pin_memory: bool = False, skip_unreadable: bool = False) -> Iterator[ImageBatch]:
    """Processed images in order, ``batch_size`` at a time, decoded by ``num_workers`` worker processes.

    An unreadable image raises its one-line ``ImageError``, or with ``skip_unreadable`` is left out of the
    batch and reported in ``failures``."""
    import torch

    loader = torch.utils.data.DataLoader(
        _ProcessedImages(sources, image_processor), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory,
    )
    for batch in loader:
        if batch.failures and not skip_unreadable:
            raise ImageError(batch.failures[0][1])
        yield batch
