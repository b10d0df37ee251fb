"""Reading images from paths, http(s) URLs or bytes, with one-line errors for anything unreadable, and
batching them for a model (``image_batches``, shared by ``blip2 eval`` and the batch inference commands).

Decompression-size guard: an image is measured from its header before anything is decoded, and one over
``max_image_pixels()`` (default 50 megapixels, ``BLIP2_MAX_IMAGE_PIXELS`` to change it; training recipes
also take ``data.max_image_pixels``) is refused: a 12000x12000 JPEG in a shard would otherwise be decoded
in full, 430 MB and seconds of one worker's time for one sample. PIL's own guard only warns below
twice its limit (179 megapixels). A truncated file fails the full decode (PIL's default,
``LOAD_TRUNCATED_IMAGES = False``, which blip2 never changes).
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from PIL import Image, UnidentifiedImageError

from blip2cli.errors import ImageError

if TYPE_CHECKING:
    import torch

URL_TIMEOUT_S = 20
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
MAX_PIXELS_ENV = "BLIP2_MAX_IMAGE_PIXELS"


class ImageTooLarge(ImageError):
    pass


def max_image_pixels() -> int:
    """The decompression-size limit in pixels: ``$BLIP2_MAX_IMAGE_PIXELS`` or 50 megapixels."""
    value = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        return int(value) if value else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        raise ImageError(f"{MAX_PIXELS_ENV}={value!r} is not a whole number of pixels") from None


def open_rgb(source: str | Path | bytes | io.IOBase, max_pixels: int | None = None) -> Image.Image:
    """Decode ``source`` (a path, bytes or a file object) to RGB after checking its size from the header.

    Raises ``ImageTooLarge`` over ``max_pixels`` (default ``max_image_pixels()``), OSError for a truncated
    file, and lets PIL's other errors (not an image: OSError, SyntaxError, ValueError...) through."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    data = _read_bytes(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit here decides
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise ImageTooLarge(f"image over PIL's limit: {err}") from None
        with image:
            width, height = image.size
            if width * height > limit:
                raise ImageTooLarge(f"{width}x{height} pixels is over the limit of {limit:,} "
                                    f"(set {MAX_PIXELS_ENV} to allow it)")
            if image.format == "JPEG" and not _jpeg_has_end(data):
                raise OSError("image file is truncated (no end-of-image marker after the last scan)")
            return image.convert("RGB")  # forces the full decode: a file cut inside the pixel data fails here


def _read_bytes(source) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    return source.read()


def _jpeg_has_end(data: bytes) -> bool:
    """Whether an end-of-image marker follows the last start-of-scan. A JPEG cut after its pixel data but
    before the marker decodes without an error (libjpeg only warns), so PIL alone would accept it. Inside
    the compressed data 0xFF is always escaped, so neither marker can appear there by accident."""
    last_scan = data.rfind(b"\xff\xda")
    return last_scan >= 0 and data.find(b"\xff\xd9", last_scan) >= 0


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
        return open_rgb(fp)
    except ImageTooLarge as err:
        raise ImageTooLarge(f"{name}: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
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
