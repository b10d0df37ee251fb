"""`blip2 download eval TASK`: official evaluation annotations and images -> ``<root>/eval/<task>/``.

Every official source is listed once, in :data:`TASKS` below (URL, saved name, where it is unpacked).
None of these hosts publishes a checksum or an exact byte size for its files, so the table's ``size``
and ``sha256`` fields are empty and each download is instead checked against the server's
``Content-Length`` (or ``Content-Range`` total); a future entry with a published size/sha256 is
verified against it, and a mismatch is a one-line error that leaves no file named as complete.

Downloads are resumable: bytes go to ``<name>.part`` and an interrupted ``.part`` is continued with an
HTTP ``Range`` request on the next run (a server that ignores ``Range`` restarts it from zero); only a
fully received and verified file is renamed (atomically) to its final name. An archive counts as
unpacked once ``downloads/<archive>.extracted`` exists, so a rerun skips finished work (also after
``--delete-archives`` removed the archive). ``--mirror URL`` fetches every file from
``URL/<file name>`` instead (an institutional mirror, or a local copy served over http/file).

Layout (``<out>`` = ``--out``, default ``<root>/eval/<task>``; paths in ``manifest.json`` are relative
to ``<out>``)::

    vqav2/      annotations/v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json
                images/val2014/COCO_val2014_{image_id:012d}.jpg           (train2014/, test2015/ on request)
    okvqa/      annotations/OpenEnded_mscoco_val2014_questions.json, mscoco_val2014_annotations.json
                images/val2014/COCO_val2014_{image_id:012d}.jpg
    gqa/        annotations/testdev_balanced_questions.json (official dict {question id: {"imageId", ...}})
                images/<imageId>.jpg
    coco/       annotations/dataset_coco.json (Karpathy; images[i].filepath/filename, split, sentences)
                images/val2014/, images/train2014/ (train only on request)
    coco_retrieval/  manifest.json only, pointing into ../coco/ (same files) unless --out is given
    nocaps/     annotations/nocaps_val_4500_captions.json (COCO format), images/val/<file_name>
    flickr30k/  annotations/dataset_flickr30k.json (Karpathy), images/<filename> (manual, licence form)
    */downloads/  the archives as fetched (+ .extracted markers); --delete-archives removes archives

``<out>/manifest.json`` (the contract with ``blip2 eval``)::

    {"task": "vqav2",
     "splits": {"val": {"questions": "annotations/v2_OpenEnded_mscoco_val2014_questions.json",
                        "annotations": "annotations/v2_mscoco_val2014_annotations.json",
                        "images": "images/val2014",
                        "image_pattern": "COCO_val2014_{image_id:012d}.jpg"}}}

Per task the split entries hold: vqav2/okvqa ``questions``, ``annotations`` (absent for vqav2
test-dev), ``images``, ``image_pattern``; gqa ``questions``, ``images``, ``image_pattern``
(``{image_id}.jpg`` with GQA's ``imageId``); coco/coco_retrieval/flickr30k ``annotations`` (Karpathy
json; the split name selects ``images[i].split``) and ``images`` (the folder under which
``filepath/filename`` resolves; flickr30k entries have no ``filepath``); nocaps ``annotations``
(COCO-format captions) and ``images`` (``file_name`` inside). okvqa's val2014 files are listed as both
``val`` and ``test`` (OK-VQA calls them its test set). The manifest is written only once every file
is in place and a probe image of each split has been found where the manifest says.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from blip2cli.data.download import check_writable
from blip2cli.errors import Blip2Error

CHUNK = 1 << 20
USER_AGENT = "blip2cli (+https://github.com/salesforce/LAVIS BLIP-2 reproduction)"


# ----------------------------------------------------------------------------- the source table
@dataclass(frozen=True)
class Source:
    """One official file. ``size``/``sha256``/``md5`` only where the host publishes them."""

    url: str
    dest: str  # folder under the data dir: plain files are saved there, archives unpacked there
    members: tuple[str, ...] | None = None  # archive members to unpack (by base name, flattened); None: all
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None

    @property
    def filename(self) -> str:
        return Path(urlparse(self.url).path).name

    @property
    def is_archive(self) -> bool:
        return self.filename.endswith((".zip", ".tar", ".tar.gz", ".tgz"))


@dataclass(frozen=True)
class ImageList:
    """Images listed one URL each inside a downloaded COCO-format json (nocaps)."""

    annotations: str  # the json, relative to the data dir
    dest: str
    url_key: str = "coco_url"
    name_key: str = "file_name"


@dataclass(frozen=True)
class ManualStep:
    """Data only obtainable by hand (licence click-through): what to fetch and where it goes."""

    what: str
    where: str  # the page to request it from
    dest: str  # folder under the data dir the images belong in
    archives: tuple[str, ...]  # accepted archive names in downloads/ (unpacked automatically)


@dataclass(frozen=True)
class Split:
    """One manifest entry: the sources it needs and its paths (relative to the data dir)."""

    sources: tuple[str, ...]  # Source.filename values
    entry: dict[str, str]
    probe: str  # how to find one image of the split: "vqa", "gqa", "karpathy" or "coco"


@dataclass(frozen=True)
class EvalTask:
    name: str
    description: str
    sources: tuple[Source, ...]
    splits: dict[str, Split]
    default_splits: tuple[str, ...]
    image_list: ImageList | None = None
    manual: ManualStep | None = None
    shares: str | None = None  # another task whose files this one reuses (default layout only)


VQA = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
COCO = "http://images.cocodataset.org/zips"
OKVQA = "https://okvqa.allenai.org/static/data"
GQA = "https://downloads.cs.stanford.edu/nlp/data/gqa"
KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
NOCAPS = "https://nocaps.s3.amazonaws.com"

# Approximate sizes, for the dry-run table only (never used to verify): COCO val2014 6.2 GiB, train2014
# 12.6 GiB, test2015 12.2 GiB; GQA images 20.3 GB, questions 1.4 GB; Karpathy caption_datasets 137 MB.
COCO_VAL = Source(f"{COCO}/val2014.zip", "images")
COCO_TRAIN = Source(f"{COCO}/train2014.zip", "images")
COCO_TEST15 = Source(f"{COCO}/test2015.zip", "images")
KARPATHY_COCO = Source(KARPATHY, "annotations", members=("dataset_coco.json",))
KARPATHY_FLICKR = Source(KARPATHY, "annotations", members=("dataset_flickr30k.json",))


def _vqa_split(q: str, a: str | None, images: str, prefix: str, sources: tuple[str, ...]) -> Split:
    entry = {"questions": f"annotations/{q}"}
    if a:
        entry["annotations"] = f"annotations/{a}"
    entry |= {"images": f"images/{images}", "image_pattern": f"{prefix}_{{image_id:012d}}.jpg"}
    return Split(sources, entry, "vqa")


def _karpathy_split(annotations: str, images: str, sources: tuple[str, ...]) -> Split:
    return Split(sources, {"annotations": f"annotations/{annotations}", "images": images}, "karpathy")


_COCO_SPLITS = {
    "test": _karpathy_split("dataset_coco.json", "images", ("caption_datasets.zip", "val2014.zip")),
    "val": _karpathy_split("dataset_coco.json", "images", ("caption_datasets.zip", "val2014.zip")),
    "train": _karpathy_split("dataset_coco.json", "images", ("caption_datasets.zip", "train2014.zip", "val2014.zip")),
}

TASKS: dict[str, EvalTask] = {
    "vqav2": EvalTask(
        "vqav2",
        "VQAv2 (visualqa.org) questions + annotations, COCO 2014/2015 images",
        (
            Source(f"{VQA}/v2_Questions_Val_mscoco.zip", "annotations"),
            Source(f"{VQA}/v2_Annotations_Val_mscoco.zip", "annotations"),
            Source(f"{VQA}/v2_Questions_Train_mscoco.zip", "annotations"),
            Source(f"{VQA}/v2_Annotations_Train_mscoco.zip", "annotations"),
            Source(f"{VQA}/v2_Questions_Test_mscoco.zip", "annotations"),
            COCO_VAL, COCO_TRAIN, COCO_TEST15,
        ),
        {
            "val": _vqa_split("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                              "val2014", "COCO_val2014",
                              ("v2_Questions_Val_mscoco.zip", "v2_Annotations_Val_mscoco.zip", "val2014.zip")),
            "train": _vqa_split("v2_OpenEnded_mscoco_train2014_questions.json",
                                "v2_mscoco_train2014_annotations.json", "train2014", "COCO_train2014",
                                ("v2_Questions_Train_mscoco.zip", "v2_Annotations_Train_mscoco.zip", "train2014.zip")),
            "test-dev": _vqa_split("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015",
                                   "COCO_test2015", ("v2_Questions_Test_mscoco.zip", "test2015.zip")),
        },
        ("val",),
    ),
    "okvqa": EvalTask(
        "okvqa",
        "OK-VQA (okvqa.allenai.org) questions + annotations, COCO 2014 images",
        (
            Source(f"{OKVQA}/OpenEnded_mscoco_val2014_questions.json.zip", "annotations"),
            Source(f"{OKVQA}/mscoco_val2014_annotations.json.zip", "annotations"),
            Source(f"{OKVQA}/OpenEnded_mscoco_train2014_questions.json.zip", "annotations"),
            Source(f"{OKVQA}/mscoco_train2014_annotations.json.zip", "annotations"),
            COCO_VAL, COCO_TRAIN,
        ),
        {
            **{
                name: _vqa_split("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json",
                                 "val2014", "COCO_val2014",
                                 ("OpenEnded_mscoco_val2014_questions.json.zip",
                                  "mscoco_val2014_annotations.json.zip", "val2014.zip"))
                for name in ("val", "test")
            },
            "train": _vqa_split("OpenEnded_mscoco_train2014_questions.json", "mscoco_train2014_annotations.json",
                                "train2014", "COCO_train2014",
                                ("OpenEnded_mscoco_train2014_questions.json.zip",
                                 "mscoco_train2014_annotations.json.zip", "train2014.zip")),
        },
        ("val", "test"),
    ),
    "gqa": EvalTask(
        "gqa",
        "GQA 1.2 (Stanford) balanced questions, GQA images",
        (
            Source(f"{GQA}/questions1.2.zip", "annotations",
                   members=("testdev_balanced_questions.json", "val_balanced_questions.json")),
            Source(f"{GQA}/images.zip", "."),  # unpacks to images/<imageId>.jpg
        ),
        {
            name: Split(("questions1.2.zip", "images.zip"),
                        {"questions": f"annotations/{name}_balanced_questions.json",
                         "images": "images", "image_pattern": "{image_id}.jpg"}, "gqa")
            for name in ("testdev", "val")
        },
        ("testdev",),
    ),
    "coco": EvalTask(
        "coco",
        "COCO captioning, Karpathy split (dataset_coco.json), COCO 2014 images",
        (KARPATHY_COCO, COCO_VAL, COCO_TRAIN),
        _COCO_SPLITS,
        ("val", "test"),
    ),
    "coco_retrieval": EvalTask(
        "coco_retrieval",
        "COCO retrieval, Karpathy 5k test: the same files as coco",
        (KARPATHY_COCO, COCO_VAL, COCO_TRAIN),
        _COCO_SPLITS,
        ("val", "test"),
        shares="coco",
    ),
    "nocaps": EvalTask(
        "nocaps",
        "NoCaps val (nocaps.org): COCO-format captions, Open Images pictures listed in it",
        (Source(f"{NOCAPS}/nocaps_val_4500_captions.json", "annotations"),),
        {"val": Split(("nocaps_val_4500_captions.json",),
                      {"annotations": "annotations/nocaps_val_4500_captions.json", "images": "images/val"}, "coco")},
        ("val",),
        image_list=ImageList("annotations/nocaps_val_4500_captions.json", "images/val"),
    ),
    "flickr30k": EvalTask(
        "flickr30k",
        "Flickr30k retrieval, Karpathy split (dataset_flickr30k.json); images by licence form",
        (KARPATHY_FLICKR,),
        {name: _karpathy_split("dataset_flickr30k.json", "images", ("caption_datasets.zip",))
         for name in ("test", "val")},
        ("test", "val"),
        manual=ManualStep(
            what="the Flickr30k images (flickr30k-images.tar.gz, 31,783 JPEGs, about 4.4 GB)",
            where="https://shannon.cs.illinois.edu/DenotationGraph/ (fill in the licence form; the link comes by"
                  " email; the Kaggle copy hsankesara/flickr-image-dataset also works)",
            dest="images",
            archives=("flickr30k-images.tar.gz", "flickr30k-images.tar", "flickr30k_images.zip",
                      "flickr-image-dataset.zip", "archive.zip"),
        ),
    ),
}
EVAL_TASKS = tuple(TASKS)


# ----------------------------------------------------------------------------- HTTP, resumable
@dataclass
class FileResult:
    path: Path
    downloaded: int  # bytes received in this run
    skipped: bool  # already complete before this run


def _resolve(url: str, mirror: str | None) -> str:
    if not mirror:
        return url
    return f"{mirror.rstrip('/')}/{Path(urlparse(url).path).name}"


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _total_from(resp, start: int) -> tuple[int | None, bool]:
    """(total size, resumed?) from a response to a request that asked for ``bytes=start-``."""
    status = getattr(resp, "status", None) or resp.getcode()
    if status == 206:
        rng = resp.headers.get("Content-Range", "")  # "bytes 100-199/200"
        try:
            span, total = rng.split(" ", 1)[1].split("/")
            first = int(span.split("-")[0])
        except (IndexError, ValueError):
            return None, False
        if first != start:
            return None, False  # a range we did not ask for: start over
        return (int(total) if total.strip() != "*" else None), True
    length = resp.headers.get("Content-Length")
    return (int(length) if length and length.isdigit() else None), False


def _open(url: str, start: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if start > 0:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - official http(s) sources / file://


def download_file(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    on_bytes: Callable[[int, int | None], None] | None = None,
) -> FileResult:
    """Fetch ``url`` to ``dest`` through ``dest.part`` (resumed with HTTP Range), verify, rename.

    ``on_bytes(n, total)`` is called as data arrives (``total`` may be None). Verification: the size
    against ``size`` (published) or else the server's announced total; ``sha256``/``md5`` if given.
    A verification failure deletes the ``.part`` and raises a one-line :class:`Blip2Error`; a
    connection that drops keeps the ``.part`` for the next attempt (up to ``retries`` in this call).
    """
    if dest.exists():
        if size is not None and dest.stat().st_size != size:
            raise Blip2Error(f"{dest} exists but has {dest.stat().st_size} bytes, expected {size}; delete it and rerun")
        return FileResult(dest, 0, True)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    received = 0
    attempt = 0
    while True:
        start = part.stat().st_size if part.exists() else 0
        try:
            try:
                resp = _open(url, start, timeout)
            except urllib.error.HTTPError as err:
                if err.code == 416 and start > 0:  # asked beyond the end: the .part is complete or bogus
                    if size is None or start == size:
                        total = start
                        break
                    part.unlink()
                    continue
                raise
            with resp:
                total, resumed = _total_from(resp, start)
                if size is not None and total is not None and total != size:
                    part.unlink(missing_ok=True)
                    raise Blip2Error(
                        f"{url} is {total} bytes but the published size is {size}: refusing it (no file kept)"
                    )
                if not resumed:
                    start = 0
                if on_bytes is not None:
                    on_bytes(start, total)
                with open(part, "ab" if resumed else "wb") as f:
                    while block := resp.read(CHUNK):
                        f.write(block)
                        received += len(block)
                        if on_bytes is not None:
                            on_bytes(len(block), None)
            have = part.stat().st_size
            expected = size if size is not None else total
            if expected is not None and have < expected:
                raise ConnectionError(f"connection closed at {have} of {expected} bytes")
            break
        except Blip2Error:
            raise
        except urllib.error.HTTPError as err:
            raise Blip2Error(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError, timeouts, resets, short reads
            attempt += 1
            if attempt > retries:
                have = part.stat().st_size if part.exists() else 0
                reason = getattr(err, "reason", None) or err
                raise Blip2Error(
                    f"cannot download {url}: {reason} ({have} bytes kept in {part.name}; rerun to resume)"
                ) from err
            time.sleep(min(2.0**attempt, 30.0) * 0.1)
    _verify(part, url, size if size is not None else total, sha256, md5)
    os.replace(part, dest)
    return FileResult(dest, received, False)


def _verify(part: Path, url: str, size: int | None, sha256: str | None, md5: str | None) -> None:
    have = part.stat().st_size
    problem = None
    if size is not None and have != size:
        problem = f"{have} bytes, expected {size}"
    elif sha256 and (got := _digest(part, "sha256")) != sha256.lower():
        problem = f"sha256 {got}, expected {sha256}"
    elif md5 and (got := _digest(part, "md5")) != md5.lower():
        problem = f"md5 {got}, expected {md5}"
    if problem:
        part.unlink(missing_ok=True)
        raise Blip2Error(f"{url} failed verification ({problem}); the bad download was deleted, rerun to retry")


# ----------------------------------------------------------------------------- archives
def _safe_target(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise Blip2Error(f"archive member {name!r} would be written outside {root}; refusing the archive")
    return target


def extract(archive: Path, dest: Path, members: Sequence[str] | None = None,
            on_member: Callable[[int, int], None] | None = None) -> list[Path]:
    """Unpack a zip or tar archive into ``dest``; with ``members`` only those base names, flattened.

    Each file is written under a temporary name and renamed, so an interrupted extraction never leaves
    a truncated file under a real name. Returns the written paths.
    """
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set(members) if members else None
    written: list[Path] = []
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
                if wanted is not None:
                    infos = [i for i in infos if Path(i.filename).name in wanted]
                for n, info in enumerate(infos, 1):
                    name = Path(info.filename).name if wanted is not None else info.filename
                    target = _safe_target(dest, name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".part")
                    with zf.open(info) as src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    os.replace(tmp, target)
                    written.append(target)
                    if on_member:
                        on_member(n, len(infos))
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                infos = [i for i in tf.getmembers() if i.isreg()]
                if wanted is not None:
                    infos = [i for i in infos if Path(i.name).name in wanted]
                for n, info in enumerate(infos, 1):
                    name = Path(info.name).name if wanted is not None else info.name
                    target = _safe_target(dest, name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".part")
                    src = tf.extractfile(info)
                    with src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                    os.replace(tmp, target)
                    written.append(target)
                    if on_member:
                        on_member(n, len(infos))
        else:
            raise Blip2Error(f"{archive} is neither a zip nor a tar archive; delete it and rerun")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise Blip2Error(f"{archive} is damaged ({err}); delete it and rerun") from err
    if wanted is not None:
        missing = wanted - {p.name for p in written}
        if missing:
            raise Blip2Error(f"{archive.name} lacks {', '.join(sorted(missing))}")
    return written


# ----------------------------------------------------------------------------- the command
@dataclass
class EvalDownloadResult:
    task: str
    out_dir: Path
    data_dir: Path
    manifest: Path
    splits: list[str]
    files: list[str] = field(default_factory=list)  # downloaded or reused file names
    bytes_downloaded: int = 0
    seconds: float = 0.0


def data_dir_for(task: str, out: Path | None, root: str | os.PathLike | None) -> tuple[Path, Path]:
    """(manifest dir, data dir): the same folder except for a sharing task in the default layout."""
    from blip2cli.data.workspace import eval_dir

    spec = get_task(task)
    out_dir = Path(out) if out is not None else eval_dir(task, root)
    data = out_dir if (out is not None or spec.shares is None) else eval_dir(spec.shares, root)
    return out_dir.expanduser(), data.expanduser()


def get_task(task: str) -> EvalTask:
    if task not in TASKS:
        raise Blip2Error(f"unknown evaluation task {task!r}; choose one of {', '.join(EVAL_TASKS)}")
    return TASKS[task]


def plan(task: str, splits: Iterable[str] | None = None) -> tuple[EvalTask, list[str], list[Source]]:
    """The task, the chosen splits and the sources they need (each once, in table order)."""
    spec = get_task(task)
    chosen = list(splits) if splits else list(spec.default_splits)
    unknown = [s for s in chosen if s not in spec.splits]
    if unknown:
        raise Blip2Error(f"{task} has no split {unknown[0]!r}; choose among {', '.join(spec.splits)}")
    needed = {name for s in chosen for name in spec.splits[s].sources}
    seen: set[tuple[str, str]] = set()
    sources = []
    for src in spec.sources:
        key = (src.filename, src.dest)
        if src.filename in needed and key not in seen:
            seen.add(key)
            sources.append(src)
    return spec, chosen, sources


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )


def _marker(data: Path, src: Source) -> Path:
    return data / "downloads" / f"{src.filename}.{'-'.join(src.members) if src.members else 'all'}.extracted"


def _fetch_source(src: Source, data: Path, mirror: str | None, timeout: float, retries: int,
                  progress: Progress, delete_archives: bool) -> FileResult:
    url = _resolve(src.url, mirror)
    if src.is_archive:
        archive = data / "downloads" / src.filename
        marker = _marker(data, src)
        if marker.exists():
            return FileResult(archive, 0, True)
    else:
        archive = data / src.dest / src.filename
    bar = progress.add_task(src.filename, total=src.size)

    def on_bytes(n: int, total: int | None) -> None:
        if total is not None:
            progress.update(bar, total=total)
        progress.advance(bar, n)

    result = download_file(url, archive, size=src.size, sha256=src.sha256, md5=src.md5,
                           timeout=timeout, retries=retries, on_bytes=on_bytes)
    if result.skipped:
        size = archive.stat().st_size
        progress.update(bar, total=size, completed=size)
    if src.is_archive:
        progress.update(bar, description=f"{src.filename} (unpacking)")
        extract(archive, data / src.dest, src.members,
                on_member=lambda n, total: progress.update(bar, description=f"{src.filename} (unpacked {n}/{total})"))
        marker.write_text(json.dumps({"url": url, "bytes": archive.stat().st_size}) + "\n")
        if delete_archives:
            archive.unlink()
        progress.update(bar, description=src.filename)
    return result


def _fetch_image_list(spec: ImageList, data: Path, mirror: str | None, timeout: float, retries: int,
                      threads: int, progress: Progress) -> int:
    """Download every image listed in a COCO-format json (skipping those present); bytes fetched."""
    listing = json.loads((data / spec.annotations).read_text())
    dest = data / spec.dest
    dest.mkdir(parents=True, exist_ok=True)
    todo = []
    for image in listing.get("images", []):
        name = Path(str(image[spec.name_key])).name
        if not (dest / name).exists():
            todo.append((_resolve(str(image[spec.url_key]), mirror), dest / name))
    total = len(listing.get("images", []))
    bar = progress.add_task(f"{spec.dest} (images)", total=total, completed=total - len(todo))
    failures: list[str] = []
    fetched = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = {pool.submit(download_file, url, path, timeout=timeout, retries=retries): url for url, path in todo}
        for fut in as_completed(futures):
            try:
                fetched += fut.result().downloaded
            except Blip2Error as err:
                failures.append(str(err))
            progress.advance(bar, 1)
    if failures:
        raise Blip2Error(f"{len(failures)} of {total} images failed (first: {failures[0]}); rerun to retry them")
    return fetched


def _manual_done(step: ManualStep, data: Path, probe: str | None, progress: Progress) -> bool:
    """Whether the manual data is in place, unpacking an accepted archive found in downloads/."""
    dest = data / step.dest
    if probe and _locate(dest, probe) is not None:
        return True
    for name in step.archives:
        archive = data / "downloads" / name
        if archive.exists():
            bar = progress.add_task(f"{name} (unpacking)", total=None)
            extract(archive, dest)
            progress.update(bar, total=1, completed=1)
            return probe is None or _locate(dest, probe) is not None
    return False


def manual_instructions(task: str, data: Path) -> str:
    """What the user must fetch by hand and where to put it (several lines)."""
    step = get_task(task).manual
    if step is None:
        return ""
    return (
        f"{task} needs a manual step: {step.what} cannot be downloaded automatically.\n"
        f"  1. Request it at {step.where}.\n"
        f"  2. Either put the archive ({' or '.join(step.archives[:2])}) in {data / 'downloads'}/\n"
        f"     or unpack the .jpg files into {data / step.dest}/ (sub-folders are fine).\n"
        f"  3. Run the same command again: it unpacks the archive, checks the files and writes the manifest."
    )


def _probe(kind: str, data: Path, entry: dict[str, str], split: str) -> str | None:
    """Relative path (under the split's images folder) of one image the annotations name."""
    ann = data / (entry.get("questions") or entry["annotations"])
    if not ann.exists():
        raise Blip2Error(f"expected {ann} after unpacking, but it is missing")
    try:
        obj = json.loads(ann.read_text())
        if kind == "vqa":
            first = obj["questions"][0]
            return entry["image_pattern"].format(image_id=int(first["image_id"]))
        if kind == "gqa":
            first = next(iter(obj.values())) if isinstance(obj, dict) else obj[0]
            return entry["image_pattern"].format(image_id=first["imageId"])
        if kind == "karpathy":
            images = [im for im in obj["images"] if im.get("split") == split] or obj["images"]
            im = images[0]
            return str(Path(im.get("filepath", "")) / im["filename"])
        if kind == "coco":
            return str(obj["images"][0]["file_name"])
    except (KeyError, IndexError, TypeError, ValueError, StopIteration) as err:
        raise Blip2Error(f"{ann} is not in the expected {kind} format ({type(err).__name__}: {err})") from err
    return None


def _locate(root: Path, rel: str, depth: int = 3) -> Path | None:
    """The folder D under ``root`` (itself or up to ``depth`` levels down) with ``D/rel`` present."""
    if not root.is_dir():
        return None
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            if (d / rel).is_file():
                return d
            nxt.extend(sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")))
        level = nxt
    return None


def write_manifest(task: str, out_dir: Path, data: Path, splits: Sequence[str]) -> Path:
    """Check each split's files and probe image, then write ``<out>/manifest.json`` atomically."""
    spec = get_task(task)
    result: dict[str, dict[str, str]] = {}
    for split in splits:
        sp = spec.splits[split]
        entry = dict(sp.entry)
        for key in ("questions", "annotations"):
            if key in entry and not (data / entry[key]).is_file():
                raise Blip2Error(f"{task} {split}: {data / entry[key]} is missing")
        probe = _probe(sp.probe, data, entry, split)
        images = data / entry["images"]
        found = _locate(images, probe) if probe else images
        if found is None:
            # The folder an archive unpacks into can differ by mirror: search the data dir too.
            found = _locate(data / entry["images"].split("/")[0], probe, depth=4) if probe else None
        if found is None:
            raise Blip2Error(f"{task} {split}: image {probe} not found under {images} (if you removed unpacked "
                             f"files, delete {data / 'downloads'}/*.extracted and rerun)")
        entry["images"] = found
        for key in ("questions", "annotations", "images"):
            if key in entry:
                entry[key] = os.path.relpath(data / entry[key], out_dir).replace(os.sep, "/")
        result[split] = entry
    manifest = out_dir / "manifest.json"
    tmp = manifest.with_name("manifest.json.part")
    tmp.write_text(json.dumps({"task": task, "splits": result}, indent=2) + "\n")
    os.replace(tmp, manifest)
    return manifest


def download_eval(
    task: str,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
    mirror: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    threads: int = 16,
    delete_archives: bool = False,
    console: Console | None = None,
) -> EvalDownloadResult:
    """Fetch, verify and unpack a task's official files, then write ``manifest.json``.

    ``data_dir`` (default ``out_dir``) holds the files; the manifest goes to ``out_dir``. A task with
    a manual step raises a one-line :class:`Blip2Error` after printing the instructions to
    ``console`` when the hand-fetched data is not in place yet (everything automatic is done first).
    """
    spec, chosen, sources = plan(task, splits)
    out = Path(out_dir).expanduser().resolve()
    data = Path(data_dir).expanduser().resolve() if data_dir is not None else out
    for folder in dict.fromkeys((out, data)):
        check_writable(folder)
    console = console or Console(stderr=True)
    result = EvalDownloadResult(task, out, data, out / "manifest.json", chosen)
    start = time.monotonic()
    with _progress(console) as progress:
        for src in sources:
            res = _fetch_source(src, data, mirror, timeout, retries, progress, delete_archives)
            result.files.append(src.filename)
            result.bytes_downloaded += res.downloaded
        if spec.image_list is not None:
            result.bytes_downloaded += _fetch_image_list(spec.image_list, data, mirror, timeout, retries,
                                                         threads, progress)
        if spec.manual is not None:
            first = spec.splits[chosen[0]]
            probe = _probe(first.probe, data, dict(first.entry), chosen[0])
            if not _manual_done(spec.manual, data, probe, progress):
                progress.stop()
                console.print(manual_instructions(task, data), markup=False, highlight=False)
                raise Blip2Error(
                    f"{task}: {spec.manual.what.split(' (')[0]} must be fetched by hand; see the instructions "
                    f"above, then rerun"
                )
    result.manifest = write_manifest(task, out, data, chosen)
    result.seconds = time.monotonic() - start
    return result
