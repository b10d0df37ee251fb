"""Many images at once: folders, glob patterns, list files and webdataset shards, as ``ImageRef``s.

An ``ImageRef`` names one image and reads it on demand (``load``), in a worker process if need be. Inside a
``.tar`` shard it remembers the member's byte offset, so shards are read with random access like files and
a resumed run skips finished samples without decoding them.

Sources (``collect_images``), in the order given, each expanded in sorted order:

- an image file, or an http(s) URL;
- a folder: its image files, recursively;
- a glob pattern (``photos/*.jpg``, ``shards/*.tar``, ``**`` for any depth); shard lists in brace notation
  (``shards/{00000..00009}.tar``) as webdataset writes them;
- a ``.txt`` / ``.lst`` file: one image path or URL per line (relative paths are relative to the list's
  folder; blank lines and ``#`` comments are ignored);
- a ``.tar`` webdataset shard: one image per sample (``{key}.jpg``/``.png``/... as img2dataset writes them).

The same image named twice is kept once.
"""

from __future__ import annotations

import glob
import io
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from blip2cli.errors import Blip2Error, ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst")
SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class ImageRef:
    """One image: a file or URL (``member`` None), or a sample ``member`` of the shard ``source``."""

    source: str  # path or URL of the image, or of the shard holding it
    member: str | None = None  # shard sample key
    offset: int = 0  # byte offset of the image member's data inside the shard
    size: int = 0

    @property
    def key(self) -> str:
        """A unique, stable name: the path or URL as found, ``shard.tar/key`` for a shard sample."""
        return self.source if self.member is None else f"{self.source}/{self.member}"

    def record(self) -> dict[str, str]:
        """How an output record names this image."""
        return {"image": self.source} if self.member is None else {"shard": self.source, "key": self.member}

    def load(self):
        from blip2cli.images import decode_image, load_image

        if self.member is None:
            return load_image(self.source)
        try:
            with open(self.source, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as err:
            raise ImageError(f"{self.key}: cannot read ({err.strerror or err})") from None
        return decode_image(io.BytesIO(data), self.key)


def ref_from_record(record: dict) -> str | None:
    """The ``ImageRef.key`` an output record (``ImageRef.record()`` fields) belongs to."""
    if "shard" in record and "key" in record:
        return f"{record['shard']}/{record['key']}"
    image = record.get("image")
    return str(image) if image is not None else None


def names_many_images(source: str) -> bool:
    """Whether ``source`` is a folder, glob, brace pattern, list file or shard rather than one image."""
    if source.startswith(("http://", "https://")):
        return False
    path = Path(source).expanduser()
    return (glob.has_magic(source) or ("{" in source and ".." in source) or path.is_dir()
            or path.suffix.lower() in LIST_SUFFIXES + (SHARD_SUFFIX,))


def collect_images(sources: Sequence[str]) -> list[ImageRef]:
    """Every image the sources name (see the module docstring); a one-line error for a source that names
    nothing or does not exist."""
    if not sources:
        raise Blip2Error("no images given: pass image files, folders, glob patterns, list files or .tar shards")
    refs: list[ImageRef] = []
    for source in sources:
        found = list(_expand(str(source)))
        if not found:
            raise Blip2Error(f"{source}: no images found")
        refs.extend(found)
    seen: set[str] = set()
    unique = []
    for ref in refs:
        if ref.key not in seen:
            seen.add(ref.key)
            unique.append(ref)
    return unique


def _expand(source: str) -> Iterable[ImageRef]:
    if source.startswith(("http://", "https://")):
        yield ImageRef(source)
        return
    if "{" in source and ".." in source:
        from braceexpand import braceexpand

        for part in braceexpand(source):
            yield from _expand(part)
        return
    if glob.has_magic(source):
        for match in sorted(glob.glob(source, recursive=True)):
            path = Path(match)
            if path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES + (SHARD_SUFFIX,)):
                yield from _expand(match)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise Blip2Error(f"{source}: no such file or folder")
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            yield ImageRef(str(file))
    elif path.suffix.lower() == SHARD_SUFFIX:
        yield from shard_images(path)
    elif path.suffix.lower() in LIST_SUFFIXES:
        yield from _listed(path)
    else:
        yield ImageRef(str(path))  # any other file is taken as an image; an unreadable one is counted later


def _listed(list_file: Path) -> Iterable[ImageRef]:
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise Blip2Error(f"cannot read image list {list_file}: {err}") from None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("http://", "https://")):
            yield ImageRef(line)
            continue
        path = Path(line).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        yield ImageRef(str(path))


def shard_images(shard: str | Path) -> list[ImageRef]:
    """One ``ImageRef`` per sample of a webdataset shard that has an image member (the first, by the order
    of ``IMAGE_SUFFIXES``); reads the tar headers only."""
    try:
        with tarfile.open(shard, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError) as err:
        raise Blip2Error(f"{shard}: not a readable tar shard ({err})") from None
    images: dict[str, tuple[int, tarfile.TarInfo]] = {}
    order: list[str] = []
    for member in members:
        name = member.name.rsplit("/", 1)[-1]
        if "." not in name or name.startswith("."):
            continue
        key, ext = name.split(".", 1)
        key = member.name[: len(member.name) - len(name)] + key
        suffix = "." + ext.lower()
        if suffix not in IMAGE_SUFFIXES:
            continue
        rank = IMAGE_SUFFIXES.index(suffix)
        if key not in images:
            order.append(key)
        if key not in images or rank < images[key][0]:
            images[key] = (rank, member)
    return [ImageRef(str(shard), key, images[key][1].offset_data, images[key][1].size) for key in order]
