"""`blip2 download pretrain`: image-caption url lists -> webdataset shards, through img2dataset.

Output layout (img2dataset's webdataset writer), in ``out_dir``::

    00000.tar            {key}.jpg, {key}.txt (caption), {key}.json (url, caption, extra columns, status)
    00000.parquet        every input row of the shard with its status and error_message
    00000_stats.json     count, successes, failed_to_download, failed_to_resize, status_dict, duration

Resuming: img2dataset's ``incremental_mode="incremental"`` treats a shard as done when its
``NNNNN_stats.json`` exists (it is written last), so a rerun skips finished shards and rewrites only
the ones interrupted mid-way. img2dataset exits 0 when interrupted (SIGINT), so completion is checked
here: the url list's rows give the number of shards to expect, and fewer finished ones is reported as
an interrupted download (non-zero exit) that a rerun completes. SIGTERM to blip2 is passed on to
img2dataset as SIGINT, its clean stop. For the same reason nothing else ending in ``.json`` may be written in
``out_dir`` (img2dataset parses every ``*.json`` name there as a shard number).

Local data (``custom``): plain paths in the url column are turned into ``file://`` URLs (relative
paths are resolved against the url list's folder) in a temporary parquet copy of the list; img2dataset
fetches ``file://`` URLs with ``urllib`` like any other, so local and web data share one code path,
one shard layout and one summary. Row order is preserved, so reruns map rows to the same shards.

Resize mode: the default is ``keep_ratio`` (shorter side = ``image_size``, aspect kept, nothing
cropped or padded). BLIP-2 trains with ``RandomResizedCrop(224, scale=(0.5, 1.0))`` on the stored
image, so the shards should keep the whole picture: ``center_crop`` would throw away content the
caption may talk about, and ``border`` would bake black bars into the crops. ``--resize-mode`` takes
any img2dataset mode for other needs.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from blip2cli.errors import Blip2Error

# Known column names per dataset: (url column candidates, caption column candidates); the first
# candidate present in the file wins, and --url-col/--caption-col override both.
#
# | dataset | url column         | caption column    | where the names come from                                  |
# |---------|--------------------|-------------------|------------------------------------------------------------|
# | coco    | coco_url, url      | caption           | COCO captions json (images.coco_url joined to annotations) |
# | vg      | url                | phrase, caption   | VG image_data.json url + region_descriptions phrase        |
# | cc3m    | url                | caption           | img2dataset's cc3m recipe (tsv header "caption\turl")      |
# | cc12m   | url                | caption           | img2dataset's cc12m recipe (tsv header "url\tcaption")     |
# | sbu     | image_url, url     | caption           | HF sbu_captions (image_url, user_id, caption)              |
# | laion   | URL, url           | TEXT, caption     | LAION-400M/5B metadata parquet                             |
# | custom  | url, image, path   | caption, text     | your own list; url may be http(s)://, file:// or a path    |
# | vqa     | (built)            | (built)           | official VQA questions + annotations JSON (``VqaSource``)  |
DATASET_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coco": (("coco_url", "url"), ("caption",)),
    "vg": (("url",), ("phrase", "caption")),
    "cc3m": (("url",), ("caption",)),
    "cc12m": (("url",), ("caption",)),
    "sbu": (("image_url", "url"), ("caption",)),
    "laion": (("URL", "url"), ("TEXT", "caption")),
    "custom": (("url", "image", "path"), ("caption", "text")),
    "vqa": (("url",), ("caption",)),
}
DATASETS = tuple(DATASET_COLUMNS)

# Input formats img2dataset reads, by file suffix (".gz" variants of the text formats too).
FORMATS = ("parquet", "csv", "tsv", "jsonl", "json")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
RESIZE_MODES = ("keep_ratio", "center_crop", "border", "keep_ratio_largest", "no")


@dataclass
class VqaSource:
    """VQA-format training files (``blip2 download pretrain vqa``): the official questions and annotations
    JSON (VQAv2, OK-VQA and any set written in that format) and the image folder."""

    questions: Path
    annotations: Path
    images: Path
    image_pattern: str | None = None  # e.g. "COCO_train2014_{image_id:012d}.jpg"; default: COCO names or "{id}.jpg"


def write_vqa_url_list(source: VqaSource, out_file: Path) -> int:
    """The url list of a VQA training set: one row per question, ``url`` (the image's path), ``caption``
    ("question answer", what stage 1 reads), ``question``, ``answers`` (the human answers as a JSON list) and
    ``question_id``. The shards' json then carries the question and answers (``data/training.py``). Returns
    the number of rows."""
    import pandas as pd

    from blip2cli.evaluation.datasets import load_eval_data

    data = load_eval_data("vqav2", split="train", questions=source.questions, annotations=source.annotations,
                          images=source.images, image_pattern=source.image_pattern)
    rows = []
    for item in data.items:
        truth = data.vqa_truth.get(item.key)
        if truth is None or not truth["answers"]:
            continue
        answers = list(truth["answers"])
        rows.append({"url": str(item.image.resolve()), "caption": f"{item.text} {max(answers, key=answers.count)}",
                     "question": item.text, "answers": json.dumps(answers), "question_id": str(item.id)})
    if not rows:
        raise Blip2Error(f"{source.annotations}: no question of {source.questions} has answers to train on")
    pd.DataFrame(rows).to_parquet(out_file, index=False)
    return len(rows)


@dataclass
class UrlList:
    """A validated url list: its file(s), format and the columns to use."""

    path: Path
    input_format: str
    url_col: str
    caption_col: str
    columns: list[str]
    files: list[Path] = field(default_factory=list)

    @property
    def extra_columns(self) -> list[str]:
        """Columns kept in each sample's json besides url and caption (image ids, licences, scores)."""
        return [c for c in self.columns if c not in (self.url_col, self.caption_col)]


@dataclass
class DownloadSummary:
    """What the output folder holds after a run (all shards, not only this run's)."""

    out_dir: Path
    shards: int
    shards_skipped: int
    count: int
    successes: int
    failures: dict[str, int]
    seconds: float

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def detect_format(path: Path) -> str:
    """The img2dataset input format of a file, from its suffix (``x.tsv.gz`` -> ``tsv.gz``)."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    fmt = stem.rsplit(".", 1)[-1] if "." in stem else ""
    if fmt not in FORMATS or (gz and fmt == "parquet"):
        raise Blip2Error(
            f"cannot tell the format of url list {path}: expected a suffix among "
            f"{', '.join('.' + f for f in FORMATS)} (text formats may end in .gz)"
        )
    return fmt + (".gz" if gz else "")


def _format_or_none(path: Path) -> str | None:
    try:
        return detect_format(path)
    except Blip2Error:
        return None


def read_columns(path: Path, input_format: str) -> list[str]:
    """Column names of a url list, reading only its header / schema / first record."""
    fmt = input_format.removesuffix(".gz")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if fmt in ("csv", "tsv"):
            import pandas as pd

            return [str(c) for c in pd.read_csv(path, sep="," if fmt == "csv" else "\t", nrows=0).columns]
        opener = gzip.open if input_format.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if fmt == "jsonl":
                line = f.readline().strip()
                return list(json.loads(line)) if line else []
            records = json.load(f)  # json: a list of records
            return list(records[0]) if records else []
    except Blip2Error:
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
        raise Blip2Error(f"cannot read url list {path} as {input_format}: {str(err).splitlines()[0]}") from err


def _pick(candidates: tuple[str, ...], override: str | None, columns: list[str]) -> str | None:
    if override:
        return override if override in columns else None
    return next((c for c in candidates if c in columns), None)


def validate_url_list(
    dataset: str, url_list: str | os.PathLike, url_col: str | None = None, caption_col: str | None = None
) -> UrlList:
    """Check a url list (a file, or a folder of files of one format) before anything is downloaded."""
    if dataset not in DATASET_COLUMNS:
        raise Blip2Error(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    path = Path(url_list).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        formats = {f for f in map(_format_or_none, files) if f}
        if len(formats) != 1:
            raise Blip2Error(f"url list folder {path} must hold files of exactly one format, found {sorted(formats) or 'none'}")
        input_format = formats.pop()
        files = [p for p in files if _format_or_none(p) == input_format]
    elif path.is_file():
        input_format = detect_format(path)
        files = [path]
    else:
        raise Blip2Error(f"url list not found: {path}")

    columns = read_columns(files[0], input_format)
    url_cands, cap_cands = DATASET_COLUMNS[dataset]
    url = _pick(url_cands, url_col, columns)
    cap = _pick(cap_cands, caption_col, columns)
    if url is None or cap is None:
        want_url = url_col or " or ".join(url_cands)
        want_cap = caption_col or " or ".join(cap_cands)
        raise Blip2Error(
            f"{files[0]} has columns [{', '.join(columns)}] but {dataset} needs a url column ({want_url}) "
            f"and a caption column ({want_cap}); pass --url-col/--caption-col to choose others"
        )
    return UrlList(path=path, input_format=input_format, url_col=url, caption_col=cap, columns=columns, files=files)


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` if needed and prove a file can be written there; else a one-line error."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".blip2-write-test-"):
            pass
    except OSError as err:
        raise Blip2Error(f"output directory {out_dir} is not writable: {err.strerror or err}") from err


def _is_local(value: str) -> bool:
    scheme = urlparse(value).scheme.lower()
    # One-letter schemes are Windows drive letters ("C:\\..."), i.e. paths.
    return scheme == "" or len(scheme) == 1


def localize_urls(urls: UrlList, tmp_dir: Path) -> UrlList:
    """For ``custom``: a parquet copy of the list where plain paths became ``file://`` URLs.

    Returns ``urls`` unchanged when every url already has a scheme (http, https, file, ...).
    """
    import pandas as pd

    frames = []
    for f in urls.files:
        fmt = urls.input_format.removesuffix(".gz")
        if fmt == "parquet":
            frames.append(pd.read_parquet(f))
        elif fmt in ("csv", "tsv"):
            frames.append(pd.read_csv(f, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False))
        else:
            frames.append(pd.read_json(f, lines=fmt == "jsonl", dtype=False))
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    col = df[urls.url_col].astype(str)
    local = col.map(_is_local)
    if not local.any():
        return urls
    base = urls.path if urls.path.is_dir() else urls.path.parent

    def to_uri(value: str) -> str:
        p = Path(value).expanduser()
        return (p if p.is_absolute() else base / p).resolve().as_uri()

    df[urls.url_col] = [to_uri(v) if is_local else v for v, is_local in zip(col, local)]
    out = tmp_dir / "url_list.parquet"
    df.to_parquet(out, index=False)
    return UrlList(out, "parquet", urls.url_col, urls.caption_col, list(df.columns), [out])


def _done_shards(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("*_stats.json"))


_QUOTED = re.compile(r":? '[^']*'")


def summarize(out_dir: Path, seconds: float = 0.0, shards_skipped: int = 0) -> DownloadSummary:
    """Read every ``*_stats.json`` in ``out_dir``: successes and failures by reason (``status_dict``)."""
    count = successes = 0
    failures: dict[str, int] = {}
    stats_files = _done_shards(out_dir)
    for path in stats_files:
        stats = json.loads(path.read_text())
        count += int(stats.get("count", 0))
        successes += int(stats.get("successes", 0))
        for reason, n in (stats.get("status_dict") or {}).items():
            if reason != "success":
                reason = _QUOTED.sub("", reason)  # group "No such file: '/a'" with "...: '/b'"
                failures[reason] = failures.get(reason, 0) + int(n)
    failures = dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))
    return DownloadSummary(out_dir, len(stats_files), shards_skipped, count, successes, failures, seconds)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations checks PyPI on import otherwise
    env["WANDB_MODE"] = "disabled"
    env.setdefault("PYTHONUNBUFFERED", "1")
    # img2dataset honours http(s)_proxy; a loopback or LAN mirror must never go through a proxy.
    for key in ("no_proxy", "NO_PROXY"):
        parts = [p for p in env.get(key, "").split(",") if p]
        for host in ("127.0.0.1", "localhost", "::1"):
            if host not in parts:
                parts.append(host)
        env[key] = ",".join(parts)
    return env


def _stream_target():
    """img2dataset's own progress output goes to our stderr (stdout is for results)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):  # e.g. a test runner's in-memory stream
        return None


def download_pretrain(
    dataset: str,
    url_list: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    vqa: VqaSource | None = None,
    image_size: int = 224,
    processes: int = 1,
    threads: int = 64,
    resize_mode: str = "keep_ratio",
    distributor: str = "multiprocessing",
    shard_size: int = 10000,
    timeout: int = 10,
    retries: int = 0,
    url_col: str | None = None,
    caption_col: str | None = None,
    quiet: bool = False,
) -> DownloadSummary:
    """Download a url list into webdataset shards (resumable) and summarize the output folder.

    Runs img2dataset in a child process: it starts its workers with the spawn context, which
    re-imports ``__main__`` and would re-run a console script or test module. ``dataset="vqa"`` takes
    ``vqa`` (VQA-format files) instead of a url list; its rows are written in a temporary url list.
    """
    if (dataset == "vqa") != (vqa is not None):
        raise Blip2Error("the vqa dataset takes --questions, --annotations and --images (and no --url-list)"
                         if dataset == "vqa" else f"--questions/--annotations/--images are for the vqa dataset, not {dataset}")
    if dataset != "vqa" and url_list is None:
        raise Blip2Error(f"{dataset} needs --url-list")
    if vqa is not None:
        absent = [flag for flag, value in (("--questions", vqa.questions), ("--annotations", vqa.annotations),
                                           ("--images", vqa.images)) if value is None]
        if absent:
            raise Blip2Error(f"the vqa dataset also needs {' and '.join(absent)}")
        if url_list is not None:
            raise Blip2Error("the vqa dataset reads --questions/--annotations/--images, not --url-list")
    if distributor not in DISTRIBUTORS:
        raise Blip2Error(f"unknown distributor {distributor!r}; choose one of {', '.join(DISTRIBUTORS)}")
    if distributor != "multiprocessing" and importlib.util.find_spec(distributor) is None:
        raise Blip2Error(f"--distributor {distributor} needs the {distributor} package: pip install {distributor}")
    if resize_mode not in RESIZE_MODES:
        raise Blip2Error(f"unknown resize mode {resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    for name, value in (("image size", image_size), ("processes", processes), ("threads", threads),
                        ("shard size", shard_size), ("timeout", timeout)):
        if value < 1:
            raise Blip2Error(f"{name} must be at least 1, got {value}")

    out = Path(out_dir).expanduser().resolve()
    check_writable(out)
    skipped = len(_done_shards(out))

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blip2-download-") as tmp:
        if vqa is not None:
            url_list = Path(tmp) / "vqa_url_list.parquet"
            write_vqa_url_list(vqa, url_list)
        urls = validate_url_list(dataset, url_list, url_col, caption_col)
        if dataset in ("custom", "vqa"):
            urls = localize_urls(urls, Path(tmp))
        kwargs = dict(
            url_list=str(urls.path),
            input_format=urls.input_format,
            url_col=urls.url_col,
            caption_col=urls.caption_col,
            save_additional_columns=urls.extra_columns or None,
            output_folder=str(out),
            output_format="webdataset",
            encode_format="jpg",
            image_size=image_size,
            resize_mode=resize_mode,
            processes_count=processes,
            thread_count=threads,
            number_sample_per_shard=shard_size,
            timeout=timeout,
            retries=retries,
            distributor=distributor,
            incremental_mode="incremental",
            enable_wandb=False,
        )
        target = None if quiet else _stream_target()
        proc = subprocess.Popen(
            [sys.executable, "-m", "blip2cli.data.download"],
            stdin=subprocess.PIPE,
            stdout=target if target is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if target is not None else subprocess.PIPE,
            env=_child_env(),
            text=True,
        )
        try:
            with _sigterm_as_interrupt():
                _, err = proc.communicate(json.dumps(kwargs))
        except BaseException:
            # Ctrl-C reaches the child too (same process group), SIGTERM is passed on as SIGINT here;
            # img2dataset cleans its _tmp and exits. Finished shards (those with *_stats.json) stay
            # and are skipped next time.
            try:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                proc.kill()
            done = len(_done_shards(out))
            raise DownloadInterrupted(f"{done} shard(s) finished in {out}; rerun the same command to finish "
                                      "(finished shards are kept and skipped)") from None
        expected = expected_shards(urls, shard_size)
    if proc.returncode != 0:
        tail = (err or "").strip().splitlines()[-1:] if err else []
        detail = f": {tail[0]}" if tail else " (see its output above)"
        raise Blip2Error(f"img2dataset exited with status {proc.returncode}{detail}")
    summary = summarize(out, time.monotonic() - start, skipped)
    check_complete(summary, expected)
    return summary


class DownloadInterrupted(Blip2Error):
    exit_code = 130
    heading = "interrupted"


def check_complete(summary: DownloadSummary, expected: int) -> None:
    """Raise ``DownloadInterrupted`` unless every expected shard has finished (has its ``_stats.json``)."""
    if summary.shards < expected:
        raise DownloadInterrupted(
            f"{summary.shards} of {expected} shards finished in {summary.out_dir} ({summary.successes} images so far); "
            "rerun the same command to finish (finished shards are kept and skipped)"
        )


def expected_shards(urls: UrlList, shard_size: int) -> int:
    """The shards img2dataset writes for ``urls``: each input file is cut into shards of ``shard_size`` rows."""
    files = urls.files or [urls.path]
    return sum(-(-count_rows(f, urls.input_format) // shard_size) for f in files)


def count_rows(path: Path, input_format: str) -> int:
    """Rows of one url-list file (parquet: from its metadata; text formats: parsed, as img2dataset does)."""
    fmt = input_format.removesuffix(".gz")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt in ("csv", "tsv"):
        import pandas as pd

        first = read_columns(path, input_format)[0]
        return len(pd.read_csv(path, sep="," if fmt == "csv" else "\t", usecols=[first]))
    opener = gzip.open if input_format.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if fmt == "jsonl":
            return sum(1 for line in f if line.strip())
        return len(json.load(f))


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while the child runs (main thread only), so the child is stopped
    cleanly instead of orphaned."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _child_main() -> None:
    """Entry of the child process: img2dataset.download(**json from stdin)."""
    kwargs = json.loads(sys.stdin.read())
    from img2dataset import download

    download(**kwargs)


if __name__ == "__main__":
    _child_main()
