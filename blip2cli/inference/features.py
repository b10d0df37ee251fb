"""Features, matching and search: ``blip2 embed``, ``blip2 match`` and ``blip2 search``.

Embeddings are the reference feature extractor's (LAVIS ``Blip2Qformer.extract_features``):

- ``image``: the normalised projected query outputs ``image_embeds_proj`` (N, NQ, D) of a stage-1
  checkpoint; a stage-2 checkpoint has no projection heads and gives the raw query outputs
  ``image_embeds`` (N, NQ, H) instead (what its LLM projection reads);
- ``text``: the normalised projected ``[CLS]`` output ``text_embeds_proj`` (N, D) (stage 1 only);
- ``multimodal``: the query outputs of the joint image-text pass ``multimodal_embeds`` (N, NQ, H), not
  projected (stage 1 only).

Image-text similarity (ITC) is the maximum over queries of the cosine similarity, without temperature;
matching (ITM) is the softmax "match" probability of the ITM head averaged over the queries; both as
transformers' ``Blip2ForImageTextRetrieval`` computes them (tests/test_features.py checks equality).

An embedding index is a folder:

- ``index.json``: kind, tensor name, model, per-item shape, and the list of finished shards;
- ``embeds-00000.safetensors`` (or ``.npy``): one tensor of ``shard_size`` items;
- ``embeds-00000.jsonl``: the items of that shard in order (``{"image": ...}``, ``{"shard", "key"}`` or
  ``{"text": ...}``).

Shards are written whole (a temporary file renamed into place) and ``index.json`` lists only finished
ones, so a killed ``blip2 embed`` resumes at the first unfinished shard. Nothing is pickled: safetensors,
or ``.npy`` read with ``allow_pickle=False``.

Search ranks an image index by a text query, or a text index by an image query, with ITC; ``rerank``
re-scores the best candidates as LAVIS' retrieval does: ITM "match" logit + ITC similarity.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip2cli.errors import Blip2Error
from blip2cli.inference.inputs import ImageRef

INDEX_JSON = "index.json"
TEXT_MAX_LENGTH = 35  # Q-Former text length of BLIP-2's retrieval evaluation
KINDS = ("image", "text", "multimodal")
TENSOR_NAMES = {("image", 1): "image_embeds_proj", ("image", 2): "image_embeds", ("text", 1): "text_embeds_proj",
                ("multimodal", 1): "multimodal_embeds"}
FORMATS = ("safetensors", "numpy")


# ============================================================================ features
class FeatureExtractor:
    """The reference feature extractor over a loaded checkpoint (stage 1: all kinds; stage 2: images)."""

    def __init__(self, loaded, device: torch.device | str = "cpu"):
        self.loaded = loaded
        self.model = loaded.model
        self.stage = loaded.stage
        self.device = torch.device(device)
        self.text_tokenizer = loaded.tokenizer if self.stage == 1 else loaded.qformer_tokenizer

    def tensor_name(self, kind: str) -> str:
        name = TENSOR_NAMES.get((kind, self.stage))
        if name is None:
            raise Blip2Error(f"{kind} embeddings need a stage-1 (Q-Former retrieval) checkpoint; "
                             f"{self.loaded.source or 'this model'} is stage {self.stage}, which gives image embeddings only")
        return name

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-Former token ids and mask of ``texts`` (normalised like BLIP-2's captions, 35 tokens at most)."""
        from blip2cli.models.text import normalize_caption

        encoded = self.text_tokenizer([normalize_caption(t) for t in texts], padding="longest", truncation=True,
                                      max_length=TEXT_MAX_LENGTH, return_tensors="pt")
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        return self.loaded.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)

    @torch.inference_mode()
    def image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, NQ, D) normalised projected query outputs (stage 1), or (B, NQ, H) query outputs (stage 2)."""
        image_embeds = self.model.image_features(pixel_values.to(self.device))
        if self.stage == 1:
            return self.model.image_feats(image_embeds).float()
        return self.model.query_outputs(image_embeds).float()

    @torch.inference_mode()
    def text(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, D) normalised projected ``[CLS]`` outputs."""
        self.tensor_name("text")
        return self.model.text_embeddings(*self.tokenize(texts)).float()

    @torch.inference_mode()
    def multimodal(self, pixel_values: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(B, NQ, H) query outputs of the joint pass over each image and its text."""
        self.tensor_name("multimodal")
        image_embeds = self.model.image_features(pixel_values.to(self.device))
        return self.model.multimodal_embeddings(image_embeds, *self.tokenize(texts)).float()

    @torch.inference_mode()
    def match(self, image, texts: Sequence[str]) -> list[dict[str, Any]]:
        """For one image and each text: ``itm`` (match probability), ``itm_logit`` (its "match" logit) and
        ``itc`` (query-max cosine similarity)."""
        self.tensor_name("text")
        pixels = self.pixel_values([image])
        feats, image_embeds = self.model.image_embeddings(pixels)
        itc = self.model.itc_similarity(feats, self.text(texts))[0]
        ids, mask = self.tokenize(texts)
        logits = self.model.itm_scores(image_embeds.expand(len(texts), -1, -1), ids, mask).float()
        probs = logits.softmax(dim=-1)[:, 1]
        return [{"text": t, "itm": float(p), "itm_logit": float(lg), "itc": float(s)}
                for t, p, lg, s in zip(texts, probs.tolist(), logits[:, 1].tolist(), itc.tolist())]


# ============================================================================ index files
@dataclass
class IndexInfo:
    kind: str
    tensor: str
    model: str
    stage: int
    shape: list[int]  # per item
    format: str = "safetensors"
    shard_size: int = 10000
    shards: list[dict[str, Any]] = field(default_factory=list)  # {"name", "count"}

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"format_version": 1, **asdict(self)}


def read_index(folder: str | os.PathLike) -> IndexInfo:
    path = Path(folder) / INDEX_JSON
    if not path.is_file():
        raise Blip2Error(f"{folder} is not an embedding index (no {INDEX_JSON}); make one with blip2 embed")
    try:
        data = json.loads(path.read_text())
        data.pop("format_version", None)
        return IndexInfo(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise Blip2Error(f"{path} is not a readable index description ({err})") from None


def _write_index(folder: Path, info: IndexInfo) -> None:
    tmp = folder / f".{INDEX_JSON}.tmp"
    tmp.write_text(json.dumps(info.to_dict(), indent=1) + "\n")
    tmp.replace(folder / INDEX_JSON)


def _shard_file(folder: Path, name: str, fmt: str) -> Path:
    return folder / f"{name}.{'safetensors' if fmt == 'safetensors' else 'npy'}"


def _save_shard(folder: Path, name: str, info: IndexInfo, tensor: torch.Tensor, items: list[dict]) -> None:
    """The shard's items, then its tensor, each through a temporary file renamed into place."""
    items_tmp = folder / f".{name}.jsonl.tmp"
    items_tmp.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    items_tmp.replace(folder / f"{name}.jsonl")
    target = _shard_file(folder, name, info.format)
    tmp = target.with_name(f".{target.name}.tmp")
    if info.format == "safetensors":
        from safetensors.torch import save_file

        save_file({info.tensor: tensor.contiguous()}, str(tmp))
    else:
        import numpy as np

        with open(tmp, "wb") as f:
            np.save(f, tensor.numpy(), allow_pickle=False)
    tmp.replace(target)


def load_shard(folder: str | os.PathLike, info: IndexInfo, shard: dict[str, Any]) -> tuple[torch.Tensor, list[dict]]:
    """A shard's tensor and items (never unpickles)."""
    folder = Path(folder)
    target = _shard_file(folder, shard["name"], info.format)
    try:
        if info.format == "safetensors":
            from safetensors.torch import load_file

            tensor = load_file(str(target))[info.tensor]
        else:
            import numpy as np

            tensor = torch.from_numpy(np.load(target, allow_pickle=False))
        items = [json.loads(line) for line in (folder / f"{shard['name']}.jsonl").read_text(encoding="utf-8").splitlines()]
    except Exception as err:  # missing or torn files surface as many error types
        raise Blip2Error(f"cannot read index shard {target}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if tensor.shape[0] != len(items) or len(items) != shard["count"]:
        raise Blip2Error(f"index shard {target} holds {tensor.shape[0]} embeddings for {len(items)} items")
    return tensor, items


def load_index(folder: str | os.PathLike) -> tuple[IndexInfo, torch.Tensor, list[dict]]:
    """Every embedding of an index, stacked, and its items."""
    info = read_index(folder)
    tensors, items = [], []
    for shard in info.shards:
        tensor, shard_items = load_shard(folder, info, shard)
        tensors.append(tensor)
        items.extend(shard_items)
    stacked = torch.cat(tensors) if tensors else torch.empty(0, *info.shape)
    return info, stacked, items


# ============================================================================ embedding many items
@dataclass
class EmbedResult:
    embedded: int = 0  # items embedded by this run
    reused: int = 0  # items found in finished shards
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    out: Path | None = None

    @property
    def items_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts from a .txt file (one per line) or a .jsonl file (``text`` or ``caption`` field per line)."""
    path = Path(path)
    if not path.is_file():
        raise Blip2Error(f"text file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix.lower() != ".jsonl":
        return [line.strip() for line in lines]
    texts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            texts.append(str(record["text"] if "text" in record else record["caption"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise Blip2Error(f'{path}:{number}: expected {{"text": ...}} or {{"caption": ...}}') from None
    return texts


def read_pairs(path: str | os.PathLike) -> list[tuple[ImageRef, str]]:
    """(image, text) pairs from a JSONL of ``{"image": PATH, "text": TEXT}`` lines (paths relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise Blip2Error(f"pairs file not found: {path}")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, text = str(record["image"]), str(record["text"] if "text" in record else record["caption"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise Blip2Error(f'{path}:{number}: expected {{"image": ..., "text": ...}}') from None
        if not image.startswith(("http://", "https://")) and not Path(image).expanduser().is_absolute():
            image = str(path.parent / image)
        pairs.append((ImageRef(image), text))
    return pairs


def _item_record(item) -> dict[str, Any]:
    if isinstance(item, str):
        return {"text": item}
    if isinstance(item, tuple):
        return {**item[0].record(), "text": item[1]}
    return item.record()


def build_index(
    extractor: FeatureExtractor,
    kind: str,
    items: Sequence,
    out: str | os.PathLike,
    *,
    model_name: str = "",
    shard_size: int = 10000,
    fmt: str = "safetensors",
    batch_size: int = 32,
    num_workers: int = 0,
    restart: bool = False,
    show_progress: bool = True,
    stop_after_shards: int | None = None,
) -> EmbedResult:
    """Embed ``items`` (``ImageRef``s for images, strings for texts, (``ImageRef``, text) pairs for
    multimodal) into an index folder; a rerun continues after the last finished shard. Unreadable images
    are skipped and counted. ``stop_after_shards`` simulates an interruption (tests)."""
    from blip2cli.evaluation.runner import progress_bar

    if kind not in KINDS:
        raise Blip2Error(f"unknown embedding kind {kind!r}; use {', '.join(KINDS)}")
    if fmt not in FORMATS:
        raise Blip2Error(f"unknown index format {fmt!r}; use safetensors or numpy")
    if shard_size < 1 or batch_size < 1:
        raise Blip2Error("--shard-size and --batch-size must be at least 1")
    tensor = extractor.tensor_name(kind)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise Blip2Error(f"--out {folder} is a file; an index is a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if restart and (folder / INDEX_JSON).exists():
        (folder / INDEX_JSON).unlink()

    info = IndexInfo(kind=kind, tensor=tensor, model=model_name, stage=extractor.stage, shape=[], format=fmt,
                     shard_size=shard_size)
    done_keys: set[str] = set()
    if (folder / INDEX_JSON).exists():
        previous = read_index(folder)
        for key in ("kind", "model", "format", "shard_size"):
            if getattr(previous, key) != getattr(info, key):
                raise Blip2Error(f"{folder} holds an index with another {key} ({getattr(previous, key)!r}); "
                                 "pass another --out, or --restart to replace it")
        info = previous
        for shard in info.shards:
            done_keys.update(json.dumps(it, sort_keys=True) for it in load_shard(folder, info, shard)[1])
    records = [_item_record(it) for it in items]
    todo = [i for i, rec in enumerate(records) if json.dumps(rec, sort_keys=True) not in done_keys]
    result = EmbedResult(reused=len(items) - len(todo), out=folder)
    before = info.count
    started = time.perf_counter()
    pending_t: list[torch.Tensor] = []
    pending_items: list[dict] = []
    written = 0

    def flush(final: bool) -> bool:
        nonlocal pending_t, pending_items, written
        while pending_items and (len(pending_items) >= shard_size or final):
            stacked = torch.cat(pending_t)
            name = f"embeds-{len(info.shards):05d}"
            take = min(shard_size, len(pending_items))
            _save_shard(folder, name, info, stacked[:take].cpu(), pending_items[:take])
            info.shape = list(stacked.shape[1:])
            info.shards.append({"name": name, "count": take})
            _write_index(folder, info)
            pending_t, pending_items = [stacked[take:]], pending_items[take:]
            written += 1
            if stop_after_shards is not None and written >= stop_after_shards:
                return True
        return False

    with progress_bar(show_progress, unit="items") as progress:
        bar = progress.add_task(f"{kind} embeddings", total=len(todo))
        for rows, embeds in _embedded_batches(extractor, kind, [items[i] for i in todo], batch_size, num_workers,
                                              result.failed):
            pending_t.append(embeds.cpu())
            pending_items.extend(records[todo[r]] for r in rows)
            progress.advance(bar, len(rows))
            if flush(final=False):
                break
        else:
            flush(final=True)
    if not info.shards and not (folder / INDEX_JSON).exists():
        _write_index(folder, info)
    result.embedded = info.count - before
    result.seconds = time.perf_counter() - started
    return result


def _embedded_batches(extractor: FeatureExtractor, kind: str, items: Sequence, batch_size: int, num_workers: int,
                      failed: list) -> Any:
    """(positions into ``items``, embeddings) batch after batch; unreadable images go to ``failed``."""
    from blip2cli.images import image_batches

    if kind == "text":
        for start in range(0, len(items), batch_size):
            chunk = list(items[start:start + batch_size])
            yield list(range(start, start + len(chunk))), extractor.text(chunk)
        return
    refs = [it[0] if kind == "multimodal" else it for it in items]
    for positions, pixels, failures in image_batches(refs, extractor.loaded.image_processor, batch_size, num_workers,
                                                     pin_memory=extractor.device.type == "cuda", skip_unreadable=True):
        failed.extend((refs[i].key, reason) for i, reason in failures)
        if not positions:
            continue
        if kind == "image":
            yield positions, extractor.image(pixels)
        else:
            yield positions, extractor.multimodal(pixels, [items[i][1] for i in positions])


# ============================================================================ search
def _item_image(item: dict[str, Any]) -> ImageRef:
    if "shard" in item:
        from blip2cli.inference.inputs import shard_images

        for ref in shard_images(item["shard"]):
            if ref.member == item["key"]:
                return ref
        raise Blip2Error(f"{item['shard']} no longer holds sample {item['key']}")
    return ImageRef(item["image"])


def search(
    extractor: FeatureExtractor,
    index: str | os.PathLike,
    text: str | None = None,
    image=None,
    top_k: int = 5,
    rerank: int = 0,
) -> list[dict[str, Any]]:
    """The ``top_k`` items of an image index for a ``text`` query, or of a text index for an ``image`` query,
    best first, by ITC similarity; with ``rerank`` > 0, the best ``max(rerank, top_k)`` by ITC re-scored by
    ITM "match" logit + ITC (LAVIS' retrieval protocol). Each result: the item's record, ``itc``, and with
    re-ranking ``itm`` (probability) and ``score``."""
    info = read_index(index)
    if (text is None) == (image is None):
        raise Blip2Error("search with a text query or an --image query, one of them")
    want = "image" if text is not None else "text"
    if info.kind != want:
        raise Blip2Error(f"{index} is a {info.kind} index; search an image index with text, a text index with --image")
    extractor.tensor_name("text")  # stage 1 only
    with torch.inference_mode():
        if text is not None:
            query = extractor.text([text])  # (1, D)
        else:
            feats, image_embeds = extractor.model.image_embeddings(extractor.pixel_values([image]))
            query = feats  # (1, NQ, D)
        scores, items = [], []
        for shard in info.shards:
            tensor, shard_items = load_shard(index, info, shard)
            tensor = tensor.to(extractor.device)
            sims = (extractor.model.itc_similarity(tensor, query)[:, 0] if text is not None
                    else extractor.model.itc_similarity(query, tensor)[0])
            scores.append(sims.float().cpu())
            items.extend(shard_items)
        if not items:
            return []
        itc = torch.cat(scores)
        keep = min(len(items), max(top_k, rerank))
        values, order = itc.topk(keep)
        results = [{**items[i], "itc": float(v)} for v, i in zip(values.tolist(), order.tolist())]
        if rerank > 0:
            _rerank(extractor, results, text, image_embeds if image is not None else None)
            results.sort(key=lambda r: -r["score"])
    return results[:top_k]


def _rerank(extractor: FeatureExtractor, results: list[dict[str, Any]], text: str | None, image_embeds) -> None:
    model = extractor.model
    if text is not None:  # candidate images, one query text
        refs = [_item_image(r) for r in results]
        from blip2cli.images import image_batches

        ids, mask = extractor.tokenize([text])
        for positions, pixels, failures in image_batches(refs, extractor.loaded.image_processor, 16, 0,
                                                         skip_unreadable=True):
            for i, reason in failures:
                results[i].update(itm=0.0, score=float("-inf"), error=reason)
            if positions:
                embeds = model.image_features(pixels.to(extractor.device))
                logits = model.itm_scores(embeds, ids.expand(len(positions), -1), mask.expand(len(positions), -1))
                _set_scores([results[i] for i in positions], logits)
    else:  # candidate texts, one query image
        ids, mask = extractor.tokenize([r["text"] for r in results])
        logits = model.itm_scores(image_embeds.expand(len(results), -1, -1), ids, mask)
        _set_scores(results, logits)


def _set_scores(results: list[dict[str, Any]], logits: torch.Tensor) -> None:
    logits = logits.float()
    for result, probs, match in zip(results, logits.softmax(-1)[:, 1].tolist(), logits[:, 1].tolist()):
        result.update(itm=probs, score=match + result["itc"])
