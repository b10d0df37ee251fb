"""Reading images from paths or http(s) URLs, with one-line errors for anything unreadable."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from blip2cli.errors import ImageError

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
        return _decode(io.BytesIO(data), text)
    path = Path(text).expanduser()
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image")
    return _decode(path, str(path))


def _decode(fp, name: str) -> Image.Image:
    try:
        with Image.open(fp) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        kind = "not an image" if isinstance(err, UnidentifiedImageError) else f"unreadable image ({err})"
        raise ImageError(f"{name}: {kind}") from None
