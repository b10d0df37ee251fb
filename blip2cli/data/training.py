"""Training and evaluation data: webdataset shards -> batches of (uint8 images, captions).

Shards are what ``blip2 download`` / img2dataset and ``blip2 capfilt`` write: tar files whose members
are ``{key}.jpg`` (or png/webp), ``{key}.txt`` (the web caption) and ``{key}.json`` (metadata; CapFilt
adds ``"captions"``, a list ranked best first). A *question-answer* sample (``blip2 download pretrain vqa``)
has ``"question"`` and ``"answers"`` (a list: one is drawn per use, so frequent answers weigh more, as VQA
training weighs them) in its json: batches carry its question in ``"question"`` (None for captions) and its
answer in ``"text"``, and stage 2 trains the LLM on the answer alone, the question being its prompt.

Training stream (``make_train_loader``)
---------------------------------------
* **Infinite and resampled**: each stream draws shards with replacement, so there is no epoch end and
  every rank always yields full micro-batches of exactly ``micro_batch_size`` (LAVIS dropped unreadable
  samples in the collater, giving unequal per-rank batches that break ITC targets; here a bad sample is
  *replaced* by the next good one, never dropped from a batch).
* **Streams**: one per (rank, worker); rank and world size are passed explicitly (no env lookups, no
  ``single_node_only`` trap). For each dataset, a stream resamples a *disjoint* slice of its shards
  (``urls[stream::n_streams]``) when the dataset has at least as many shards as there are streams; a
  smaller dataset is resampled whole by every stream (different seeds, so different orders, but the
  same samples can then appear on several ranks — fine for resampling, give real datasets >= ranks x
  workers shards).
* **Mixtures**: ``shards`` is a list of datasets (each a spec for :func:`expand_shards`) with
  ``weights``; for every sample a stream picks a dataset with probability proportional to its weight
  (the ``wds.RandomMix`` scheme, but drawn from the stream's own seeded RNG instead of the global one).
  A dataset of weight 0 is never opened.
* **Shuffling**: a buffer of ``shuffle_buffer`` *raw* samples (bytes, not decoded tensors) per stream.
* **Determinism**: every random choice (shard draws, dataset choice, shuffle buffer) comes from RNGs
  seeded from ``(seed, rank, worker, num_workers, world_size)``; the per-sample randomness (random
  resized crop, flip, CapFilt caption choice) comes from a seed derived from ``(stream seed, index of
  the sample in the stream)``. The stream is therefore a pure function of the seed and the layout
  (world size, num_workers, shards): change any of them and it changes.
* **Skips**: a corrupt or missing image, a missing caption, an unreadable shard are skipped and counted
  by reason; each batch carries ``"skipped"``, the counts since the stream's previous batch (a delta,
  so summing them over batches in the main process gives totals even with worker processes). A dataset
  none of whose shards can be read, or a stream that sees only bad samples for a long time, raises a
  one-line :class:`Blip2Error` instead of spinning forever.
* **Images travel as uint8**: ``pixel_values`` are the transformed image's pixels (``uint8=True``, the
  default of both loaders), a quarter of fp32's bytes to pin and copy to the GPU; the model normalises
  them on the device with its own mean/std, bit-identical to ``ToTensor`` + ``Normalize`` here
  (``models/preprocessing.normalize_uint8``). ``uint8=False`` gives the normalised floats instead.

Resume
------
``make_train_loader(..., skip_batches=N)`` yields exactly the batches an uninterrupted loader (same
seed and layout) yields from batch N on. DataLoader workers deliver batches round-robin, so batch ``b``
comes from logical stream ``b % num_workers``; on resume worker ``p`` plays logical stream
``(p + N) % num_workers`` and fast-forwards past the batches that stream already delivered. Which raw
samples were good must be known to fast-forward, so skipped batches' images are *decoded* (PIL decode
only: no crop, no tensor); this is exact with any ``num_workers`` as long as it is unchanged.
Measured on one CPU thread with 320x256 JPEGs at 224 px: loading costs ~2.9 ms/sample, the decoding
replay ~0.4-0.6 ms/sample (about a fifth of loading those batches again).

Faster, decode-free resume: :class:`TrainLoader` tracks, per stream, how many raw samples were
consumed; ``loader.state_dict()`` (per rank) passed back as ``resume_state=`` skips those raw samples
without decoding anything (tar bytes are still read, since tar shards cannot be seeked). Both are
exact; both replay the stream from its start, so their cost grows with the position (the decode-free
replay read 640 samples in well under 0.1 s in the measurement above). ``reseed=True``
instead starts a fresh stream (seed mixed with the resume position): O(1), statistically equivalent,
not identical.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T

from blip2cli.errors import Blip2Error
from blip2cli.images import ImageTooLarge, open_rgb
from blip2cli.models.preprocessing import CLIP_MEAN, CLIP_STD, ImagePreprocessing
from blip2cli.models.text import normalize_caption, normalize_question

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
URL_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "hf://")
# Reasons a sample (or shard) is skipped; the keys of every "skipped" dict.
# bad_image: unreadable or truncated; too_large: over the decompression-size guard (``images.open_rgb``)
SKIP_REASONS = ("bad_image", "too_large", "no_image", "no_caption", "bad_shard")
# A stream that sees this many bad samples in a row raises instead of looping forever.
MAX_CONSECUTIVE_SKIPS = 10_000

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]


# ----------------------------------------------------------------- skip counting
class SkipCounter:
    """Counts skipped samples by reason. ``take()`` returns the counts since the last ``take()``."""

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: dict[str, int] = dict(counts or {})
        self._taken: dict[str, int] = dict(self.counts)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def update(self, delta: dict[str, int]) -> None:
        for reason, n in delta.items():
            self.add(reason, n)

    def take(self) -> dict[str, int]:
        delta = {k: v - self._taken.get(k, 0) for k, v in self.counts.items() if v != self._taken.get(k, 0)}
        self._taken = dict(self.counts)
        return delta

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"


# ----------------------------------------------------------------- transforms
def image_transform(
    image_size: int,
    train: bool,
    rrc_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    preprocessing: ImagePreprocessing | None = None,
    uint8: bool = False,
) -> T.Compose:
    """BLIP-2 preprocessing of a PIL RGB image into a normalised (3, S, S) float tensor, or with ``uint8``
    into its (3, S, S) uint8 pixels, which the model normalises on the device (``Blip2Base.image_features``,
    with the model's mean/std: ``mean``/``std`` apply to float output only). Both are the same numbers.

    train: LAVIS ``blip2_image_train`` = RandomResizedCrop(S, scale, bicubic) + horizontal flip.
    eval:  LAVIS ``blip_image_eval`` = Resize((S, S), bicubic): a square resize, no crop.
    ``preprocessing`` (the model's, see ``models/preprocessing.py``) replaces ``image_size``/``mean``/``std``
    and sets the interpolation and, for eval, the resize mode (shortest edge + center crop).
    """
    pre = preprocessing or ImagePreprocessing(size=image_size, mean=tuple(mean), std=tuple(std))
    interpolation = T.InterpolationMode(pre.interpolation)
    if train:
        steps: list[Any] = [T.RandomResizedCrop(pre.size, scale=tuple(rrc_scale), interpolation=interpolation)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    elif pre.resize == "square":
        steps = [T.Resize((pre.size, pre.size), interpolation=interpolation)]
    else:
        steps = [T.Resize(pre.shortest_edge, interpolation=interpolation), T.CenterCrop(pre.size)]
    to_tensor = [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose([*steps, *to_tensor])


# ----------------------------------------------------------------- shard lists
def _is_url(s: str) -> bool:
    return s.startswith(URL_PREFIXES)


def expand_shards(spec: ShardSpec) -> list[str]:
    """Paths, brace patterns (``dir/{00000..00009}.tar``), globs, directories (every ``*.tar`` inside,
    sorted) and URLs (http(s), ``pipe:``, ...) -> a flat list of shard urls/paths.

    Local entries must exist: a missing file or a directory without ``.tar`` files raises a one-line
    :class:`Blip2Error`. URLs are brace-expanded but not checked.
    """
    import braceexpand

    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        if _is_url(item):
            out.extend(braceexpand.braceexpand(item))
            continue
        if item.startswith("file:"):
            item = item[len("file:"):]
        item = os.path.expanduser(item)
        expanded = list(braceexpand.braceexpand(item)) if "{" in item else [item]
        for path in expanded:
            p = Path(path)
            if p.is_dir():
                tars = sorted(str(t) for t in p.glob("*.tar"))
                if not tars:
                    raise Blip2Error(f"no .tar shards in directory {path}")
                out.extend(tars)
            elif p.is_file():
                out.append(path)
            elif glob.has_magic(path) and (matches := sorted(glob.glob(path))):
                out.extend(matches)
            else:
                missing = [q for q in expanded if not Path(q).exists()]
                where = f" ({len(missing)} of {len(expanded)} from {item}, first shown)" if len(expanded) > 1 else ""
                raise Blip2Error(f"shard not found: {path}{where}")
    if not out:
        raise Blip2Error("no shards given")
    return out


# ----------------------------------------------------------------- reading shards
def iter_shard(url: str, counter: SkipCounter | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples ``{"__key__", "__url__", ext: bytes, ...}`` of one tar shard, in order.

    An unopenable or truncated shard is counted as ``bad_shard`` (once) and ends early: samples read
    before the error still come through (the last one possibly incomplete, and then skipped later).
    """
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext

    current: dict[str, Any] | None = None
    stream = None
    try:
        stream = gopen(url, "rb")
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None or os.path.basename(prefix).startswith("__"):
                    continue
                data = tar.extractfile(info).read()
                tar.members = []  # streaming mode keeps every TarInfo otherwise
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                current[suffix.lower()] = data
    except Exception:  # tarfile.ReadError, OSError, a failing pipe: all mean "unreadable shard"
        if counter is not None:
            counter.add("bad_shard")
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a failed `pipe:` command raises on close; already counted
                pass
    if current is not None:
        yield current


# ----------------------------------------------------------------- decoding
def choose_caption(meta: Any, txt: str | None, top_k: int, rng: random.Random | None) -> str | None:
    """CapFilt captions (``meta["captions"]``, ranked) -> one of the top ``top_k`` drawn with ``rng``
    (the first when ``rng`` is None, i.e. evaluation); otherwise the web caption ``txt``."""
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if isinstance(captions, list):
        captions = [c for c in captions[:top_k] if isinstance(c, str) and c.strip()]
        if captions:
            return rng.choice(captions) if rng is not None else captions[0]
    return txt if txt and txt.strip() else None


def _decode_text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def choose_answer(meta: Any, rng: random.Random | None) -> tuple[str, str] | None:
    """``(question, answer)`` of a question-answer sample, or None. The answer is drawn from ``answers``
    with ``rng`` (repeated answers are drawn more often), the most frequent one when ``rng`` is None."""
    if not isinstance(meta, dict) or not isinstance(meta.get("question"), str) or not meta["question"].strip():
        return None
    answers = meta.get("answers")
    if isinstance(answers, str):  # `blip2 download pretrain vqa` stores the list as a JSON string
        try:
            answers = json.loads(answers)
        except ValueError:
            answers = [answers]
    answers = [a for a in (answers if isinstance(answers, list) else [meta.get("answer")]) if isinstance(a, str) and a.strip()]
    if not answers:
        return None
    if rng is not None:
        answer = rng.choice(answers)
    else:
        answer = max(answers, key=answers.count)  # most frequent, first seen on ties
    return meta["question"], answer


@dataclass
class SampleDecoder:
    """Raw webdataset sample -> ``(image tensor, text, question)`` (question None for captions), or None
    (counted) when unusable."""

    transform: Any
    captions_top_k: int = 2
    max_words: int = 50
    max_pixels: int | None = None  # None: images.max_image_pixels()

    def _meta(self, raw: dict[str, Any]) -> Any:
        if "json" not in raw:
            return None
        try:
            return json.loads(raw["json"])
        except ValueError:
            return None  # a broken json only matters if there is no .txt either

    def text_and_question(self, raw: dict[str, Any], rng: random.Random | None) -> tuple[str | None, str | None]:
        """A question-answer sample's (answer, question), else (caption, None); normalised as LAVIS does."""
        meta = self._meta(raw)
        qa = choose_answer(meta, rng)
        if qa is not None:
            question, answer = normalize_question(qa[0], self.max_words), normalize_caption(qa[1], self.max_words)
            return (answer or None), question
        text = choose_caption(meta, _decode_text(raw.get("txt")), self.captions_top_k, rng)
        text = normalize_caption(text, self.max_words) if text else ""
        return (text or None), None

    def caption(self, raw: dict[str, Any], rng: random.Random | None) -> str | None:
        return self.text_and_question(raw, rng)[0]

    def image(self, raw: dict[str, Any]) -> Image.Image | str:
        """The decoded RGB image, or the skip reason."""
        data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        if data is None:
            return "no_image"
        try:
            return open_rgb(io.BytesIO(data), self.max_pixels)
        except ImageTooLarge:
            return "too_large"
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... (truncated files included)
            return "bad_image"

    def is_valid(self, raw: dict[str, Any]) -> bool:
        """Whether ``__call__`` would accept the sample (decodes the image, no transform)."""
        return self.caption(raw, None) is not None and not isinstance(self.image(raw), str)

    def __call__(self, raw: dict[str, Any], rng: random.Random | None, counter: SkipCounter):
        text, question = self.text_and_question(raw, rng)
        image = self.image(raw)
        if isinstance(image, str):
            counter.add(image)
            return None
        if text is None:
            counter.add("no_caption")
            return None
        if rng is None:
            return self.transform(image), text, question
        # torchvision draws crop/flip from the global torch RNG: seed it per sample, and restore it so
        # that with num_workers=0 the data pipeline does not perturb the model's RNG (dropout, ...).
        # Only the CPU generator: torch.manual_seed also queues lazy accelerator seeding, which records a
        # Python stack trace per call (~100 us against ~1 us, per sample).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(rng.getrandbits(63))
            return self.transform(image), text, question


# ----------------------------------------------------------------- seeds
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts; stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------- the training stream
class _TrainStream(IterableDataset):
    def __init__(self, datasets, weights, decoder, batch_size, rank, world_size, seed, shuffle_buffer,
                 skip_batches=0, skip_raw=None, rotate=0):
        self.datasets, self.weights, self.decoder = datasets, weights, decoder
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.skip_batches, self.skip_raw, self.rotate = skip_batches, skip_raw, rotate

    def _dataset_samples(self, urls: list[str], rng: random.Random, counter: SkipCounter, name: str):
        """Infinite raw samples of one dataset: shards drawn with replacement."""
        readable: set[str] = set()
        unreadable: set[str] = set()
        while True:
            url = rng.choice(urls)
            n = 0
            for sample in iter_shard(url, counter):
                n += 1
                yield sample
            (readable if n else unreadable).add(url)
            if not readable and len(unreadable) == len(urls):
                raise Blip2Error(f"no readable samples in any of the {len(urls)} shard(s) of {name}")

    def _raw(self, stream: int, n_streams: int, seed: int, counter: SkipCounter):
        """Infinite mixture of the datasets, then the shuffle buffer."""
        sources, probs = [], []
        for i, (urls, w) in enumerate(zip(self.datasets, self.weights)):
            if w <= 0:
                continue  # never opened
            mine = urls[stream::n_streams] if len(urls) >= n_streams else urls
            rng = random.Random(derive_seed(seed, "shards", i))
            sources.append(self._dataset_samples(mine, rng, counter, f"dataset {i} ({urls[0]}, ...)"))
            probs.append(w)
        mix_rng = random.Random(derive_seed(seed, "mix"))
        if len(sources) == 1:
            mixed = sources[0]
        else:
            mixed = (next(mix_rng.choices(sources, probs)[0]) for _ in itertools.count())
        if self.shuffle_buffer <= 1:
            yield from mixed
            return
        shuffle_rng = random.Random(derive_seed(seed, "shuffle"))
        buf: list[dict[str, Any]] = []
        for sample in mixed:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            j = shuffle_rng.randrange(len(buf))
            buf[j], sample = sample, buf[j]
            yield sample

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (worker + self.rotate) % n_workers
        stream = self.rank * n_workers + logical
        n_streams = self.world_size * n_workers
        seed = derive_seed(self.seed, self.rank, logical, n_workers, self.world_size)
        counter = SkipCounter()
        raw = enumerate(self._raw(stream, n_streams, seed, counter))

        # Fast-forward. Batches are delivered round-robin from logical streams 0..W-1, so after
        # `skip_batches` batches this stream has delivered ceil((skip_batches - logical) / W) of them.
        cursor = 0
        if self.skip_raw is not None:  # decode-free: skip the raw samples recorded in a state_dict
            cursor = self.skip_raw[logical]
            for _ in itertools.islice(raw, cursor):
                pass
        else:
            good_to_skip = max(0, -(-(self.skip_batches - logical) // n_workers)) * self.batch_size
            while good_to_skip > 0:
                cursor, sample = next(raw)
                cursor += 1
                good_to_skip -= self.decoder.is_valid(sample)
        counter.take()  # counts of the replayed part were already reported by the original run

        pixels, texts, questions, keys, bad_in_row = [], [], [], [], 0
        for i, sample in raw:
            out = self.decoder(sample, random.Random(derive_seed(seed, "sample", i)), counter)
            if out is None:
                bad_in_row += 1
                if bad_in_row >= MAX_CONSECUTIVE_SKIPS:
                    raise Blip2Error(f"{bad_in_row} unusable samples in a row (skipped: {counter}); check the shards")
                continue
            bad_in_row = 0
            pixels.append(out[0])
            texts.append(out[1])
            questions.append(out[2])
            keys.append(sample["__key__"])
            if len(pixels) == self.batch_size:
                yield {"pixel_values": torch.stack(pixels), "text": texts, "question": questions, "key": keys,
                       "skipped": counter.take(), "stream": logical, "cursor": i + 1}
                pixels, texts, questions, keys = [], [], [], []


class TrainLoader:
    """An infinite iterable of training batches (dicts: ``pixel_values`` (B, 3, S, S) uint8, ``text``
    list[str], ``key`` list[str], ``skipped`` {reason: count since the stream's last batch}).

    Iterating again continues where the previous iteration stopped (workers are kept). With
    ``epoch_samples``, each iteration yields ``epoch_samples // micro_batch_size`` batches (per rank).
    ``skipped`` holds the running totals; ``state_dict()`` the position for ``resume_state=``.
    """

    def __init__(self, stream: _TrainStream, num_workers: int, batches_done: int, cursors: list[int],
                 skipped: dict[str, int], batches_per_epoch: int | None, timeout: float, pin_memory: bool = False):
        self._stream, self.num_workers = stream, num_workers
        self.batches_done, self.cursors = batches_done, cursors
        self.skipped = SkipCounter(skipped)
        self.batches_per_epoch = batches_per_epoch
        self._timeout, self._pin_memory = timeout, pin_memory
        self._it: Iterator[dict[str, Any]] | None = None

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an infinite training stream has no length (no epoch_samples given)")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._it is None:
            w = self.num_workers
            # A private generator: DataLoader would otherwise draw its base seed from the global RNG on
            # first use, shifting the model's random stream (ITM negatives) differently after a resume.
            loader = DataLoader(self._stream, batch_size=None, num_workers=w, persistent_workers=w > 0,
                                prefetch_factor=2 if w else None, timeout=self._timeout if w else 0,
                                generator=torch.Generator().manual_seed(self._stream.seed),
                                worker_init_fn=_ignore_stop_signals if w else None, pin_memory=self._pin_memory)
            self._it = iter(loader)
        count = range(self.batches_per_epoch) if self.batches_per_epoch else itertools.count()
        for _ in count:
            batch = next(self._it)
            self.cursors[batch["stream"]] = batch["cursor"]
            self.skipped.update(batch["skipped"])
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """This rank's position. With several ranks, save every rank's (``all_gather_object``) and
        pass the list back: ``resume_state`` picks its own rank's entry."""
        s = self._stream
        return {"batches": self.batches_done, "cursors": list(self.cursors), "skipped": dict(self.skipped.counts),
                "rank": s.rank, "world_size": s.world_size, "num_workers": len(self.cursors), "seed": s.seed}


def _datasets(shards: ShardSpec | Sequence[ShardSpec]) -> list[list[str]]:
    """A single spec string is one dataset; a list holds one dataset spec per entry."""
    if isinstance(shards, (str, os.PathLike)):
        return [expand_shards(shards)]
    if not shards:
        raise Blip2Error("no training shards given")
    return [expand_shards(s) for s in shards]


def make_train_loader(
    shards: ShardSpec | Sequence[ShardSpec],
    weights: Sequence[float] | None = None,
    micro_batch_size: int = 32,
    image_size: int = 224,
    *,
    rrc_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True,
    captions_top_k: int = 2,
    max_words: int = 50,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    preprocessing: ImagePreprocessing | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    epoch_samples: int | None = None,
    skip_batches: int = 0,
    resume_state: dict | Sequence[dict] | None = None,
    reseed: bool = False,
    timeout: float = 0,
    max_image_pixels: int | None = None,
    uint8: bool = True,
    pin_memory: bool = False,
) -> TrainLoader:
    """The infinite, resampled, per-rank training stream (see the module docstring).

    ``shards``: one spec (a single dataset) or a list with one spec per dataset, mixed with ``weights``
    (default equal). ``skip_batches``: resume after that many micro-batches of this rank, exactly
    (decodes the skipped images). ``resume_state``: a ``TrainLoader.state_dict()`` (or the list of every
    rank's), exact and decode-free; it overrides ``skip_batches``. ``reseed``: instead of replaying,
    start a fresh stream seeded with the resume position (O(1), not identical). ``timeout``: seconds a
    worker may take for one batch before the DataLoader raises (0 = wait forever). ``max_image_pixels``:
    larger images are skipped and counted as ``too_large`` (None: ``images.max_image_pixels()``).
    ``uint8``: uint8 ``pixel_values`` (the model normalises them), else normalised floats (``mean``/``std``).
    ``pin_memory``: batches in page-locked memory, for asynchronous copies to a GPU.
    """
    if not 0 <= rank < world_size:
        raise Blip2Error(f"rank {rank} is outside world size {world_size}")
    if micro_batch_size <= 0:
        raise Blip2Error(f"micro batch size must be positive, got {micro_batch_size}")
    datasets = _datasets(shards)
    weights = [1.0] * len(datasets) if not weights else [float(w) for w in weights]
    if len(weights) != len(datasets) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise Blip2Error(f"weights {weights} do not fit {len(datasets)} dataset(s): need one >= 0 each, not all 0")

    n_workers = max(1, num_workers)
    skipped: dict[str, int] = {}
    skip_raw = None
    if resume_state is not None:
        state = resume_state if isinstance(resume_state, dict) else list(resume_state)[rank]
        layout = (state["rank"], state["world_size"], state["num_workers"], state["seed"])
        if layout != (rank, world_size, n_workers, seed):
            raise Blip2Error(f"data state was saved with rank/world_size/num_workers/seed {layout}, "
                             f"now {(rank, world_size, n_workers, seed)}: use skip_batches or reseed")
        skip_batches, skip_raw, skipped = state["batches"], list(state["cursors"]), dict(state["skipped"])
    stream_seed = seed
    if reseed and skip_batches:
        stream_seed, skip_raw = derive_seed(seed, "resume", skip_batches), None
    rotate = 0 if (reseed and skip_batches) else skip_batches % n_workers

    decoder = SampleDecoder(image_transform(image_size, True, rrc_scale, hflip, mean, std, preprocessing, uint8),
                            captions_top_k, max_words, max_image_pixels)
    stream = _TrainStream(datasets, weights, decoder, micro_batch_size, rank, world_size, stream_seed,
                          shuffle_buffer, skip_batches=0 if (reseed or skip_raw) else skip_batches,
                          skip_raw=skip_raw, rotate=rotate)
    # The loader's own cursors are indexed by logical stream; on a decode-free resume they start from
    # the saved ones, otherwise they are unknown until each stream delivers a batch (0 = not yet).
    cursors = list(skip_raw) if skip_raw else [0] * n_workers
    per_epoch = max(1, epoch_samples // micro_batch_size) if epoch_samples else None
    return TrainLoader(stream, num_workers, skip_batches, cursors, skipped, per_epoch, timeout, pin_memory)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the main process, which saves and stops the run (a scheduler that
    signals the whole process group must not kill a worker mid-batch: the main process would fail)."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


# ----------------------------------------------------------------- evaluation
class _EvalStream(IterableDataset):
    def __init__(self, urls: list[str], decoder: SampleDecoder, batch_size: int):
        self.urls, self.decoder, self.batch_size = urls, decoder, batch_size

    def __iter__(self):
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        counter = SkipCounter()
        pixels, texts, questions, keys = [], [], [], []
        full = None  # a full batch is held back until the next good sample (or the end), so that the
        # skips counted after it (e.g. a trailing unreadable shard) still reach the main process
        for url in urls:
            for sample in iter_shard(url, counter):
                out = self.decoder(sample, None, counter)
                if out is None:
                    continue
                if full is not None:
                    yield {**full, "skipped": counter.take()}
                    full = None
                pixels.append(out[0])
                texts.append(out[1])
                questions.append(out[2])
                keys.append(sample["__key__"])
                if len(pixels) == self.batch_size:
                    full = {"pixel_values": torch.stack(pixels), "text": texts, "question": questions, "key": keys}
                    pixels, texts, questions, keys = [], [], [], []
        if full is not None:
            yield {**full, "skipped": counter.take()}
        if pixels:  # the partial last batch
            yield {"pixel_values": torch.stack(pixels), "text": texts, "question": questions, "key": keys,
                   "skipped": counter.take()}


def make_eval_loader(
    shards: ShardSpec | Sequence[ShardSpec],
    batch_size: int,
    image_size: int,
    *,
    max_words: int = 50,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    num_workers: int = 0,
    preprocessing: ImagePreprocessing | None = None,
    max_image_pixels: int | None = None,
    uint8: bool = True,
) -> DataLoader:
    """A finite pass over ``shards`` in order (shards in the given order, samples in tar order) with the
    eval transform; captions are the best CapFilt caption or the ``.txt``; the last batch may be
    partial; bad samples are skipped and counted as in training. With ``num_workers > 0`` the shards
    are split across workers, so batches interleave by worker (still deterministic). ``uint8`` as in
    :func:`make_train_loader`."""
    if isinstance(shards, (str, os.PathLike)):
        urls = expand_shards(shards)
    else:
        urls = [u for spec in shards for u in expand_shards(spec)] if shards else expand_shards([])
    transform = image_transform(image_size, False, mean=mean, std=std, preprocessing=preprocessing, uint8=uint8)
    decoder = SampleDecoder(transform, 1, max_words, max_image_pixels)
    return DataLoader(_EvalStream(urls, decoder, batch_size), batch_size=None, num_workers=num_workers)


def read_captions(shards: ShardSpec | Sequence[ShardSpec], limit: int = 5000) -> list[str]:
    """Up to ``limit`` normalised captions (every CapFilt caption and the ``.txt``) read in order from
    the shards without decoding images; for training tokenizers on the data. Unreadable shards are
    skipped."""
    specs = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out: list[str] = []
    for spec in specs:
        for url in expand_shards(spec):
            for sample in iter_shard(url):
                texts = []
                try:
                    meta = json.loads(sample["json"]) if "json" in sample else None
                except ValueError:
                    meta = None
                if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
                    texts.extend(c for c in meta["captions"] if isinstance(c, str))
                if "txt" in sample:
                    texts.append(_decode_text(sample["txt"]))
                for t in texts:
                    t = normalize_caption(t)
                    if t:
                        out.append(t)
                        if len(out) >= limit:
                            return out
    return out
