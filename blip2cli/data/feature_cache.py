"""Frozen-feature cache: the frozen image encoder run once per image and augmentation view, stored, and
read back by training instead of the images.

Stages 1 and 2 keep the image encoder's trunk frozen, so its output for a given input image is a constant:
at real size (ViT-g, 224 px) the trunk is most of a stage-1 step's compute. The paper's augmentation
(random resized crop + horizontal flip, a fresh draw every time a sample is seen) is reduced to
``views`` fixed draws per image; training picks one of them at random each time it sees the sample.

Layout of a cache directory (``write_feature_cache``):

* ``features-NNNNN.safetensors``: one per input shard, tensor ``features`` (images, views, tokens, width)
  in fp16 / bf16 (fp32 for tests): the trunk's output *before* ``ln_vision``, which trains;
* ``samples-NNNNN.jsonl``: per image, its key and the raw ``.txt`` / ``.json`` texts, so captions
  (CapFilt's top-k choice, VQA answers) are still drawn per use, as from the shards;
* ``feature_cache.json``: the manifest (written last: a cut write leaves no usable cache), with the
  encoder's fingerprint, the preprocessing and the views' augmentation settings.

View ``v`` of image ``key`` is ``augmented_view(image, transform, seed, key, v)``: a pure function, so the
same views can be made again from the shards (tests compare cached and live losses on them). Views are made
as uint8 pixels and normalised on the encoder's device, as training normalises its batches
(``ImagePreprocessing.normalized``), so cached features are those live training computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from blip2cli.data.training import SampleDecoder, SkipCounter, derive_seed, expand_shards, image_transform, iter_shard
from blip2cli.errors import Blip2Error
from blip2cli.models.preprocessing import ImagePreprocessing
from blip2cli.models.vision import trunk_features, trunk_parameters

MANIFEST = "feature_cache.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class CacheManifest:
    views: int
    tokens: int
    width: int
    dtype: str
    image_size: int
    rrc_scale: tuple[float, float]
    hflip: bool
    seed: int
    trunk: dict[str, Any]  # trunk_fingerprint of the encoder that wrote it
    files: list[dict[str, Any]] = field(default_factory=list)  # {"features", "samples", "images"}
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_per_image(self) -> int:
        return bytes_per_image(self.views, self.tokens, self.width, self.dtype)


def bytes_per_image(views: int, tokens: int, width: int, dtype: str) -> int:
    return views * tokens * width * DTYPES[dtype].itemsize


def describe_cost(views: int, tokens: int, width: int, dtype: str, images: int | None = None) -> str:
    """One line: the disk cost of caching an encoder's features, per image (and for ``images``)."""
    per = bytes_per_image(views, tokens, width, dtype)
    line = (f"feature cache: {per / 2**20:.2f} MiB per image ({views} views x {tokens} tokens x {width} x "
            f"{DTYPES[dtype].itemsize} bytes, {dtype})")
    if images is not None:
        line += f", {per * images / 2**30:.2f} GiB for {images:,} images"
    return line


def trunk_fingerprint(vision_model: nn.Module) -> dict[str, Any]:
    """Names and shapes (exact) and the sum of absolute values (compared with a tolerance, so that the same
    weights stored in fp16 or bf16 still match) of the frozen trunk's parameters."""
    digest = hashlib.sha256()
    total = 0.0
    for name, p in vision_model.named_parameters():
        if name.startswith("post_layernorm."):
            continue
        digest.update(f"{name}:{tuple(p.shape)}|".encode())
        total += float(p.detach().double().abs().sum())
    return {"shapes": digest.hexdigest(), "abs_sum": total}


def augmented_view(image, transform, seed: int, key: str, view: int) -> torch.Tensor:
    """View ``view`` of the image ``key``: the training transform with its randomness seeded from
    ``(seed, key, view)`` (the global CPU generator is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive_seed(seed, "view", key, view))
        return transform(image)


def trunk_tokens(vision_model: nn.Module, image_size: int) -> tuple[int, int]:
    """(tokens, width) of the trunk's output at ``image_size``, from one blank image."""
    params = trunk_parameters(vision_model)
    device, dtype = (params[0].device, params[0].dtype) if params else (torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        out = trunk_features(vision_model, torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype))
    return out.shape[1], out.shape[2]


# ----------------------------------------------------------------- writing
def write_feature_cache(
    vision_model: nn.Module,
    shards: str | Sequence[str],
    out_dir: Path,
    *,
    preprocessing: ImagePreprocessing,
    views: int = 4,
    rrc_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = True,
    seed: int = 0,
    dtype: str = "fp16",
    batch_size: int = 32,
    max_image_pixels: int | None = None,
    say: Callable[[str], None] = print,
) -> CacheManifest:
    """Run the frozen trunk of ``vision_model`` over every usable image of ``shards`` (in order), ``views``
    augmented views each, and store the features in ``out_dir`` (see the module docstring)."""
    from safetensors.torch import save_file

    if views < 1:
        raise Blip2Error(f"a feature cache needs at least one view per image, got {views}")
    if dtype not in DTYPES:
        raise Blip2Error(f"feature cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    specs = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    urls = [u for spec in specs for u in expand_shards(spec)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the cache is unusable until the new manifest is written
    transform = image_transform(preprocessing.size, True, tuple(rrc_scale), hflip, preprocessing=preprocessing,
                                uint8=True)
    decoder = SampleDecoder(transform, max_pixels=max_image_pixels)
    tokens, width = trunk_tokens(vision_model, preprocessing.size)
    manifest = CacheManifest(views, tokens, width, dtype, preprocessing.size, tuple(rrc_scale), hflip, seed,
                             trunk_fingerprint(vision_model))
    say(describe_cost(views, tokens, width, dtype))
    counter = SkipCounter()
    for index, url in enumerate(urls):
        records, pixels, features = [], [], []
        for sample in iter_shard(url, counter):
            image = decoder.image(sample)
            if isinstance(image, str):
                counter.add(image)
                continue
            if decoder.text_and_question(sample, None)[0] is None:
                counter.add("no_caption")
                continue
            key = sample["__key__"]
            records.append({"key": key, **{k: _text(sample.get(k)) for k in ("txt", "json")}})
            pixels.extend(augmented_view(image, transform, seed, key, v) for v in range(views))
            if len(pixels) >= batch_size * views:
                features.append(_encode(vision_model, pixels, DTYPES[dtype], preprocessing))
                pixels = []
        if pixels:
            features.append(_encode(vision_model, pixels, DTYPES[dtype], preprocessing))
        if not records:
            continue
        stacked = torch.cat(features).reshape(len(records), views, tokens, width).contiguous()
        names = {"features": f"features-{index:05d}.safetensors", "samples": f"samples-{index:05d}.jsonl"}
        save_file({"features": stacked}, str(out_dir / names["features"]))
        (out_dir / names["samples"]).write_text("".join(json.dumps(r) + "\n" for r in records))
        manifest.files.append({**names, "images": len(records)})
        manifest.images += len(records)
        say(f"{url}: {len(records)} images cached")
    manifest.skipped = dict(counter.counts)
    if not manifest.images:
        raise Blip2Error(f"no usable image in {len(urls)} shard(s) (skipped: {counter})")
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=1))
    os.replace(tmp, out_dir / MANIFEST)
    say(describe_cost(views, tokens, width, dtype, manifest.images) + f" written to {out_dir}")
    return manifest


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


@torch.inference_mode()
def _encode(vision_model: nn.Module, pixels: list[torch.Tensor], dtype: torch.dtype,
            preprocessing: ImagePreprocessing) -> torch.Tensor:
    params = trunk_parameters(vision_model)
    device, trunk_dtype = params[0].device, params[0].dtype
    hidden = trunk_features(vision_model, preprocessing.normalized(torch.stack(pixels).to(device)).to(trunk_dtype))
    out = hidden.to(dtype)
    if not torch.isfinite(out).all():
        raise Blip2Error(f"the image encoder's features overflow {dtype}; write the cache with dtype bf16 or fp32")
    return out.cpu()


# ----------------------------------------------------------------- reading
def open_feature_cache(cache_dir: str | Path) -> CacheManifest:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise Blip2Error(f"{cache_dir} is not a finished feature cache (no {MANIFEST}); "
                         "write it with `blip2 cache-features`")
    data = json.loads(path.read_text())
    data["rrc_scale"] = tuple(data["rrc_scale"])
    return CacheManifest(**data)


def check_cache_fits(manifest: CacheManifest, vision_model: nn.Module, image_size: int, cache_dir: str | Path) -> None:
    """Refuse a cache written by another encoder or at another image size, in one line."""
    mine = trunk_fingerprint(vision_model)
    theirs = manifest.trunk
    same = mine["shapes"] == theirs["shapes"] and \
        abs(mine["abs_sum"] - theirs["abs_sum"]) <= 1e-3 * max(abs(theirs["abs_sum"]), 1e-12)
    if not same:
        raise Blip2Error(f"feature cache {cache_dir} was written by another image encoder (weights differ); "
                         "write a new one with `blip2 cache-features`")
    if manifest.image_size != image_size:
        raise Blip2Error(f"feature cache {cache_dir} holds {manifest.image_size} px views; the model trains at "
                         f"{image_size} px")


class CachedFeatureLoader:
    """An infinite iterable of training batches read from a feature cache: dicts with ``vision_features``
    (B, tokens, width) in the cache's dtype, ``text``, ``question``, ``key``, ``skipped`` (always empty: bad
    samples were dropped when the cache was written).

    Each rank reads its own slice of the images (``rank::world_size``, all of them if there are fewer
    images than ranks), in an order reshuffled every pass; sample ``n`` of the stream takes a view and a
    caption drawn from a generator seeded by ``(seed, rank, n)``. Batch ``b`` is therefore a pure function
    of ``b``: ``skip_batches`` resumes exactly, at no cost.
    """

    def __init__(self, cache_dir: str | Path, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, captions_top_k: int = 2, skip_batches: int = 0, pin_memory: bool = False):
        from safetensors import safe_open

        self.dir = Path(cache_dir)
        self.manifest = open_feature_cache(self.dir)
        self.batch_size, self.rank, self.seed, self.pin_memory = micro_batch_size, rank, seed, pin_memory
        self.decoder = SampleDecoder(transform=None, captions_top_k=captions_top_k)
        self._files = [safe_open(str(self.dir / f["features"]), framework="pt") for f in self.manifest.files]
        self._samples: list[tuple[int, int, dict[str, Any]]] = []
        for file_index, f in enumerate(self.manifest.files):
            for row, line in enumerate((self.dir / f["samples"]).read_text().splitlines()):
                self._samples.append((file_index, row, json.loads(line)))
        mine = list(range(len(self._samples)))
        self._mine = mine[rank::world_size] if len(mine) >= world_size else mine
        self._order: dict[int, list[int]] = {}
        self.batches_done = skip_batches

    def _sample_index(self, n: int) -> int:
        epoch, position = divmod(n, len(self._mine))
        if epoch not in self._order:
            order = list(self._mine)
            random.Random(derive_seed(self.seed, "cache-epoch", self.rank, epoch)).shuffle(order)
            self._order = {epoch: order}  # only the current pass is kept
        return self._order[epoch][position]

    def _sample(self, n: int) -> tuple[torch.Tensor, str, str | None, str]:
        file_index, row, record = self._samples[self._sample_index(n)]
        rng = random.Random(derive_seed(self.seed, "cache-sample", self.rank, n))
        view = rng.randrange(self.manifest.views)
        raw = {k: record[k].encode() for k in ("txt", "json") if record.get(k) is not None}
        text, question = self.decoder.text_and_question(raw, rng)
        if text is None:  # e.g. an empty answer drawn: the cache kept the sample for its other texts
            text, question = self.decoder.text_and_question(raw, None)
        features = self._files[file_index].get_slice("features")[row:row + 1][0, view]
        return features, text, question, record["key"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            start = self.batches_done * self.batch_size
            samples = [self._sample(n) for n in range(start, start + self.batch_size)]
            features = torch.stack([s[0] for s in samples])
            if self.pin_memory:
                features = features.pin_memory()
            self.batches_done += 1
            yield {"vision_features": features, "text": [s[1] for s in samples],
                   "question": [s[2] for s in samples], "key": [s[3] for s in samples], "skipped": {}}
