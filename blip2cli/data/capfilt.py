"""`blip2 capfilt`: BLIP-2's CapFilt on webdataset shards (caption, rank by CLIP, keep the top 2).

The paper's procedure (spec (f)): for each web image the BLIP-large captioner samples ``num_captions``
(10) captions with nucleus sampling (top_p 0.9, prompt "a picture of"); these and the original web
caption are ranked by CLIP ViT-L/14 image-text cosine similarity and the best ``top_k`` (2) are kept;
training then draws one of them per step (``blip2cli.data.training.choose_caption`` reads
``json["captions"]``, best first, and samples among its first 2).

Input: shards as ``blip2 download pretrain`` / img2dataset write them (``{key}.jpg`` + ``{key}.txt`` +
``{key}.json``). Output: one shard per input shard, same file name, same samples in the same order with
every member unchanged except ``{key}.json``, which keeps its keys and gains:

* ``captions``: the top ``top_k`` candidates, best first (the key the training reader uses);
* ``clip_scores``: their CLIP cosine similarities (same order, floats in [-1, 1]);
* ``original_caption``: the web caption (``{key}.txt``, else ``json["caption"]``; null if none);
* ``original_clip_score``: the web caption's similarity (null if none);
* ``capfilt_candidates`` (only with ``keep_candidates``): every distinct candidate as
  ``{"caption", "clip_score", "source": "web"|"blip"}``, best first.

Identical candidates (after whitespace/case folding) are scored once, so the two kept captions differ.
Samples whose image is missing or cannot be decoded are left out of the output and counted
(``no_image``, ``corrupt``: unreadable or truncated, ``too_large``: over the decompression-size guard
of ``images.open_rgb``). Next to each output shard ``{name}_capfilt.json`` records the shard's
counts and the settings used.

Resuming and scaling out: each shard is written to ``{name}.part`` and renamed to ``{name}`` only when
complete (its ``_capfilt.json`` is written just before), so a finished ``.tar`` is never partial and a
rerun skips every shard whose ``.tar`` exists (``overwrite`` redoes them). Shards are assigned
round-robin over ranks (``shards[rank::world_size]`` of the sorted input list) from ``RANK`` /
``WORLD_SIZE`` (torchrun, also across nodes) or explicit values, with no process group: ranks never talk
to each other, so any mix of nodes, GPUs and reruns is fine. Sampling is seeded per shard from
``seed`` and the shard name, so a shard's captions do not depend on which rank did it (same batch
size and device type; GPU kernels are not bitwise deterministic across hardware).

Weights: the captioner is any ``BlipForConditionalGeneration`` checkpoint (hub id or local folder,
loaded by transformers: safetensors, else ``torch.load(weights_only=True)``); the ranker is any open_clip
model name (or a model-config ``.json`` file, registered on the fly, or ``hf-hub:``/``local-dir:``)
with a pretrained tag or a local weights file (open_clip loads with ``weights_only=True``). OpenAI
weights need QuickGELU, which is switched on from open_clip's pretrained table (``ViT-L-14`` +
``openai`` alone would otherwise build a GELU model and silently mis-score).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from blip2cli import hub
from blip2cli.errors import Blip2Error

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"


@dataclass
class CapfiltSettings:
    """The knobs, with the paper's values (BLIP's released sampling code for the rest)."""

    captioner: str = DEFAULT_CAPTIONER
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    prompt: str = "a picture of"
    num_captions: int = 10
    top_k: int = 2
    top_p: float = 0.9
    sample_top_k: int = 50  # transformers' default that BLIP's nucleus sampling ran with
    repetition_penalty: float = 1.1  # BLIP's sampling branch
    min_length: int = 10  # tokens, counting the prompt (LAVIS/BLIP semantics)
    max_length: int = 30
    batch_size: int = 16
    seed: int = 0
    keep_candidates: bool = False
    max_image_pixels: int | None = None  # None: images.max_image_pixels() (50 megapixels)

    def check(self) -> None:
        for name in ("num_captions", "top_k", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise Blip2Error(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise Blip2Error(f"top-p must be in (0, 1], got {self.top_p}")
        if self.min_length > self.max_length:
            raise Blip2Error(f"min-length {self.min_length} is larger than max-length {self.max_length}")


# ----------------------------------------------------------------------------- models
class Captioner(Protocol):
    def __call__(self, images: list[Any]) -> list[list[str]]: ...


class Ranker(Protocol):
    def score(self, images: list[Any], texts: list[list[str]]) -> list[list[float]]: ...


def pick_device(device: str = "auto") -> str:
    """``auto``: the local rank's GPU when CUDA is there, else CPU."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def pick_dtype(dtype: str, device: str):
    """``auto``: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU."""
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in table:
        raise Blip2Error(f"unknown dtype {dtype!r}; choose auto, fp32, fp16 or bf16")
    return table[dtype]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class BlipCaptioner:
    """transformers BLIP captioning model: ``num_captions`` nucleus samples per image after ``prompt``."""

    def __init__(self, settings: CapfiltSettings, device: str = "cpu", dtype=None):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.s = settings
        self.device = device
        self.dtype = dtype or torch.float32
        if hub.looks_like_hub_id(settings.captioner):
            hub.require(settings.captioner, "CapFilt captioner")  # offline: one line, not minutes of retries
        try:
            self.processor = BlipProcessor.from_pretrained(settings.captioner)
            self.model = BlipForConditionalGeneration.from_pretrained(settings.captioner, dtype=self.dtype)
        except Exception as err:  # OSError (not found / offline), ValueError (not a BLIP checkpoint), ...
            raise Blip2Error(f"cannot load captioner {settings.captioner}: {_first_line(err)}") from err
        self.model.to(device).eval()

    def __call__(self, images: list[Any]) -> list[list[str]]:
        import torch

        s = self.s
        inputs = self.processor(images=images, text=[s.prompt] * len(images), return_tensors="pt")
        ids = inputs["input_ids"].to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                input_ids=ids,
                attention_mask=inputs["attention_mask"].to(self.device),
                do_sample=True,
                top_p=s.top_p,
                top_k=s.sample_top_k,
                num_return_sequences=s.num_captions,
                max_length=s.max_length,
                min_length=s.min_length,
                repetition_penalty=s.repetition_penalty,
            )
        # The output repeats the prompt; cut it from the decoded text (as LAVIS does), which is robust
        # to WordPiece merging at the boundary.
        texts = [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        prefix = " ".join(self.processor.batch_decode(ids[:, 1:-1], skip_special_tokens=True)[0].split())
        texts = [t[len(prefix):].strip() if prefix and t.startswith(prefix) else t for t in texts]
        n = s.num_captions
        return [texts[i * n:(i + 1) * n] for i in range(len(images))]


class ClipRanker:
    """open_clip image-text cosine similarity."""

    def __init__(self, model_name: str, pretrained: str | None, device: str = "cpu", dtype=None):
        import open_clip
        import torch

        self.device = device
        self.autocast = dtype if (dtype is not None and dtype != torch.float32 and device.startswith("cuda")) else None
        name = model_name
        if name.endswith(".json") and Path(name).is_file():  # a model config of one's own
            open_clip.add_model_config(Path(name))
            name = Path(name).stem
        quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
        what = f"{model_name}" + (f" ({pretrained})" if pretrained else "")
        if name.startswith("hf-hub:"):
            hub.require(name[len("hf-hub:"):], "CapFilt ranker")
        else:
            hub.require_open_clip(name, pretrained, "CapFilt ranker")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, force_quick_gelu=quick_gelu, device=device,
            )
            self.tokenizer = open_clip.get_tokenizer(name)
        except Exception as err:  # RuntimeError (unknown name/tag, offline hub), OSError, ...
            raise Blip2Error(f"cannot load CLIP ranker {what}: {_first_line(err)}") from err
        self.model = model.eval()
        self.preprocess = preprocess

    def score(self, images: list[Any], texts: list[list[str]]) -> list[list[float]]:
        import contextlib

        import torch
        import torch.nn.functional as F

        flat = [t for group in texts for t in group]
        if not flat:
            return [[] for _ in texts]
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        amp = (torch.autocast("cuda", dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            txt = F.normalize(self.model.encode_text(self.tokenizer(flat).to(self.device)).float(), dim=-1)
        out, at = [], 0
        for i, group in enumerate(texts):
            out.append((txt[at:at + len(group)] @ img[i]).tolist())
            at += len(group)
        return out


# ----------------------------------------------------------------------------- ranking
def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def distinct_candidates(original: str | None, generated: Sequence[str]) -> list[tuple[str, str]]:
    """(caption, source) pairs: the web caption first, then the generated ones, without repeats
    (compared case- and whitespace-insensitively) or empty strings."""
    candidates: list[tuple[str, str]] = []
    seen: set[str] = set()
    for text, source in [(original, "web")] + [(g, "blip") for g in generated]:
        if text and text.strip() and _fold(text) not in seen:
            seen.add(_fold(text))
            candidates.append((" ".join(text.split()), source))
    return candidates


def rank_candidates(candidates: Sequence[tuple[str, str]], scores: Sequence[float], original: str | None,
                    top_k: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The json fields CapFilt adds, and every candidate ranked best first. Ties keep candidate order
    (so the web caption wins a tie)."""
    if len(scores) != len(candidates):
        raise ValueError(f"{len(scores)} scores for {len(candidates)} candidates")
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    ranked = [{"caption": candidates[i][0], "clip_score": float(scores[i]), "source": candidates[i][1]} for i in order]
    web = next((c for c in ranked if c["source"] == "web"), None)
    fields = {
        "captions": [c["caption"] for c in ranked[:top_k]],
        "clip_scores": [c["clip_score"] for c in ranked[:top_k]],
        "original_caption": original,
        "original_clip_score": web["clip_score"] if web else None,
    }
    return fields, ranked


# ----------------------------------------------------------------------------- shards
def split_key(name: str) -> tuple[str, str] | None:
    """webdataset's convention: ``dir/key.ext.ext2`` -> (``dir/key``, ``ext.ext2``)."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext


def read_samples(path: str | os.PathLike) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, [(member, bytes), ...]) for each sample of a tar shard, in order, members unchanged."""
    key, members = None, []
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                parts = split_key(info.name)
                if parts is None:
                    continue
                data = tar.extractfile(info).read()
                tar.members = []
                if key is not None and parts[0] != key:
                    yield key, members
                    members = []
                key = parts[0]
                members.append((info, data))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise Blip2Error(f"cannot read shard {path}: {_first_line(err)}") from err
    if key is not None:
        yield key, members


def _ext(info: tarfile.TarInfo) -> str:
    return split_key(info.name)[1].lower()


@dataclass
class ShardStats:
    shard: str
    samples: int = 0
    written: int = 0
    corrupt: int = 0
    no_image: int = 0
    too_large: int = 0
    seconds: float = 0.0


def _decode_image(members: list[tuple[tarfile.TarInfo, bytes]], max_pixels: int | None = None):
    """The RGB image of a sample, ``"no_image"``, ``"too_large"`` or ``"corrupt"``."""
    from blip2cli.images import ImageTooLarge, open_rgb

    data = next((d for i, d in members if _ext(i) in IMAGE_EXTS), None)
    if data is None:
        return "no_image"
    try:
        return open_rgb(io.BytesIO(data), max_pixels)
    except ImageTooLarge:
        return "too_large"
    except Exception:  # OSError, SyntaxError, ValueError, ... (truncated files included)
        return "corrupt"


def _decoded_samples(src: str | os.PathLike, max_pixels: int | None = None) -> Iterator[tuple[str, list, Any]]:
    """(key, members, RGB image or skip reason) for each sample of a shard."""
    for key, members in read_samples(src):
        yield key, members, _decode_image(members, max_pixels)


def in_background(items: Iterator[Any], depth: int = 256) -> Iterator[Any]:
    """Iterate ``items`` in a thread (reading and JPEG decoding overlap the model), ``depth`` ahead.

    Exceptions raised by ``items`` come out of this iterator; closing it early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((None, item)):
                    return
            put((end, None))
        except BaseException as err:  # handed to the consumer
            put((end, err))

    thread = threading.Thread(target=work, name="capfilt-reader", daemon=True)
    thread.start()
    try:
        while True:
            tag, item = q.get()
            if tag is end:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _web_caption(members: list[tuple[tarfile.TarInfo, bytes]], meta: dict[str, Any]) -> str | None:
    txt = next((d for i, d in members if _ext(i) == "txt"), None)
    if txt is not None:
        text = txt.decode("utf-8", errors="replace").strip()
        if text:
            return text
    cap = meta.get("caption")
    return cap.strip() if isinstance(cap, str) and cap.strip() else None


def _meta(members: list[tuple[tarfile.TarInfo, bytes]]) -> dict[str, Any]:
    raw = next((d for i, d in members if _ext(i) == "json"), None)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {"original_json": meta}


def _add(tar: tarfile.TarFile, name: str, data: bytes, like: tarfile.TarInfo | None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = like.mode if like is not None else 0o444
    info.mtime = like.mtime if like is not None else int(time.time())
    info.uname, info.gname = (like.uname, like.gname) if like is not None else ("bigdata", "bigdata")
    tar.addfile(info, io.BytesIO(data))


def write_sample(tar: tarfile.TarFile, key: str, members: list[tuple[tarfile.TarInfo, bytes]],
                 meta: dict[str, Any]) -> None:
    """A sample's members, unchanged but for ``{key}.json``, which becomes ``meta`` (added if there was none)."""
    payload = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    wrote_json = False
    for info, data in members:
        if _ext(info) == "json":
            data, wrote_json = payload, True
        _add(tar, info.name, data, info)
    if not wrote_json:
        _add(tar, f"{key}.json", payload, members[0][0])


def process_shard(
    src: str | os.PathLike,
    dst: Path,
    captioner: Captioner,
    ranker: Ranker,
    settings: CapfiltSettings,
    on_images: Callable[[int], None] | None = None,
    extra_stats: dict[str, Any] | None = None,
) -> ShardStats:
    """CapFilt one shard into ``dst`` atomically (``dst.part`` -> ``dst``); returns its counts."""
    import torch

    start = time.monotonic()
    stats = ShardStats(shard=dst.name)
    torch.manual_seed((settings.seed * 1_000_003 + zlib.crc32(dst.name.encode())) % (2**63))
    tmp = dst.with_name(dst.name + ".part")
    batch: list[tuple[str, list, Any]] = []

    def flush(tar: tarfile.TarFile) -> None:
        if not batch:
            return
        images = [img for _, _, img in batch]
        generated = captioner(images)
        metas, webs = [], []
        for _, members, _ in batch:
            meta = _meta(members)
            metas.append(meta)
            webs.append(_web_caption(members, meta))
        candidates = [distinct_candidates(web, gen) for web, gen in zip(webs, generated)]
        scores = ranker.score(images, [[text for text, _ in cand] for cand in candidates])
        for (key, members, _), meta, web, cand, cand_scores in zip(batch, metas, webs, candidates, scores):
            fields, ranked = rank_candidates(cand, cand_scores, web, settings.top_k)
            meta.update(fields)
            if settings.keep_candidates:
                meta["capfilt_candidates"] = ranked
            write_sample(tar, key, members, meta)
            stats.written += 1
        if on_images is not None:
            on_images(len(batch))
        batch.clear()

    try:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            with contextlib.closing(in_background(_decoded_samples(src, settings.max_image_pixels), depth=4 * settings.batch_size)) as samples:
                for key, members, image in samples:
                    stats.samples += 1
                    if isinstance(image, str):
                        setattr(stats, image, getattr(stats, image) + 1)
                        continue
                    batch.append((key, members, image))
                    if len(batch) >= settings.batch_size:
                        flush(tar)
            flush(tar)
        stats.seconds = time.monotonic() - start
        record = {**asdict(stats), "input": os.fspath(src), "settings": asdict(settings), **(extra_stats or {})}
        side = dst.with_name(f"{dst.stem}_capfilt.json")
        side_tmp = side.with_name(side.name + ".part")
        side_tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(side_tmp, side)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


# ----------------------------------------------------------------------------- the run
def assign_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This rank's shards: every ``world_size``-th of the name-sorted list, starting at ``rank``."""
    return sorted(shards, key=lambda s: (Path(s).name, s))[rank::world_size]


@dataclass
class CapfiltSummary:
    out_dir: Path
    rank: int
    world_size: int
    assigned: int
    skipped: int  # already done before this run
    written: int  # shards finished by this run
    samples: int = 0
    captioned: int = 0
    corrupt: int = 0
    no_image: int = 0
    too_large: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)  # unreadable input shards
    folder: dict[str, int] = field(default_factory=dict)  # totals over every finished shard in out_dir

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


def summarize_folder(out_dir: Path) -> dict[str, int]:
    """Totals over the finished shards of an output folder (all ranks, all runs), from their
    ``_capfilt.json`` records."""
    totals = {"shards": 0, "samples": 0, "written": 0, "corrupt": 0, "no_image": 0, "too_large": 0}
    for tar in sorted(Path(out_dir).glob("*.tar")):
        try:
            record = json.loads(tar.with_name(f"{tar.stem}_capfilt.json").read_text())
        except (OSError, ValueError):
            continue
        totals["shards"] += 1
        for key in ("samples", "written", "corrupt", "no_image", "too_large"):
            totals[key] += int(record.get(key, 0))
    return totals


def _expected_images(shard: str) -> int | None:
    """img2dataset's ``successes`` for a shard, when its ``_stats.json`` sits next to it."""
    stats = Path(shard).with_name(Path(shard).stem + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_capfilt(
    shards: Sequence[str],
    out_dir: str | os.PathLike,
    settings: CapfiltSettings | None = None,
    *,
    captioner: Captioner | None = None,
    ranker: Ranker | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    console=None,
) -> CapfiltSummary:
    """CapFilt this rank's share of ``shards`` into ``out_dir`` (skipping finished ones).

    ``captioner``/``ranker`` default to :class:`BlipCaptioner` / :class:`ClipRanker` built from
    ``settings``; they are only built when some shard is left to do.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    from blip2cli.data.download import check_writable

    settings = settings or CapfiltSettings()
    settings.check()
    from blip2cli.distributed import launch_rank_and_world

    r, w = launch_rank_and_world(rank, world_size)
    out = Path(out_dir).expanduser().resolve()
    names = [Path(s).name for s in shards]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise Blip2Error(f"input shards share file names ({sorted(dupes)[0]}, ...); outputs are named after inputs")
    if any(Path(s).resolve().parent == out for s in shards if "://" not in s):
        raise Blip2Error(f"output folder {out} holds the input shards; choose another --out")
    check_writable(out)

    mine = assign_shards(shards, r, w)
    todo = [s for s in mine if overwrite or not (out / Path(s).name).exists()]
    summary = CapfiltSummary(out, r, w, len(mine), len(mine) - len(todo), 0)
    if not todo:
        summary.folder = summarize_folder(out)
        return summary
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if captioner is None:
        captioner = BlipCaptioner(settings, dev, dt)
    if ranker is None:
        ranker = ClipRanker(settings.clip_model, settings.clip_pretrained, dev, dt)

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            if not task.fields.get("rate"):
                return Text("")
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} img/s" if speed else "-- img/s")

    expected = [_expected_images(s) for s in todo]
    total_images = sum(expected) if all(e is not None for e in expected) else None
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                    console=console or Console(stderr=True), disable=not progress)
    start = time.monotonic()
    with bars:
        tag = f"rank {r}/{w} " if w > 1 else ""
        shard_bar = bars.add_task(f"{tag}shards", total=len(todo))
        image_bar = bars.add_task(f"{tag}images", total=total_images, rate=True)
        for shard in todo:
            try:
                stats = process_shard(shard, out / Path(shard).name, captioner, ranker, settings,
                                      on_images=lambda n: bars.advance(image_bar, n),
                                      extra_stats={"rank": r, "world_size": w})
            except Blip2Error as err:
                if str(err).startswith("cannot read shard"):
                    summary.failed.append(str(err))
                    bars.advance(shard_bar, 1)
                    continue
                raise
            summary.written += 1
            summary.samples += stats.samples
            summary.captioned += stats.written
            summary.corrupt += stats.corrupt
            summary.no_image += stats.no_image
            summary.too_large += stats.too_large
            bars.advance(shard_bar, 1)
    summary.seconds = time.monotonic() - start
    summary.folder = summarize_folder(out)
    return summary
