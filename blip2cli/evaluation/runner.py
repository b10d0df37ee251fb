"""Batched, resumable, data-parallel evaluation (what ``blip2 eval`` runs).

Generation tasks (VQA, GQA, captioning): items are batched through ``Blip2Stage2Model.generate``; each
finished batch is appended to ``predictions.jsonl`` (``predictions.rank<R>.jsonl`` for ranks > 0), so an
interrupted run started again with the same ``--out`` only generates what is missing. Retrieval: ITC
similarities for all pairs, then the top-``k_test`` candidates of every image and every text re-ranked by
``ITM match logit + ITC similarity``; the ITM logits are computed grouped by image (each image's ViT pass
serves all its pairs in both directions, and a pair needed by both directions is scored once) and
appended per image to the same JSONL.

Under torchrun (an initialised ``torch.distributed`` process group) the remaining items are split over
the ranks and the new results gathered once at the end; rank 0 scores and writes the outputs. Without
a process group everything runs in one process.

Model math stays in the model classes: this module batches, calls, decodes and scores.
"""

from __future__ import annotations

from contextlib import nullcontext

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blip2cli.distributed import all_gather_objects, broadcast_object, group_rank_and_world
from blip2cli.errors import Blip2Error
from blip2cli.jsonl import append_records, iter_records
from blip2cli.evaluation import metrics as M
from blip2cli.evaluation.datasets import EvalData, EvalItem
from blip2cli.evaluation.tasks import METRICS_JSON, EvalSettings, default_settings, resolve_settings, task_spec

PREDICTIONS_JSONL = "predictions.jsonl"
PREDICTIONS_JSON = "predictions.json"
RUN_JSON = "run.json"


@dataclass
class ModelParts:
    """What evaluation needs from a model: the module, its tokenizer, its image processor."""

    model: Any
    tokenizer: Any
    image_processor: Any
    name: str = ""

    @classmethod
    def from_any(cls, model: Any, tokenizer: Any = None, image_processor: Any = None, name: str = "") -> "ModelParts":
        """A ``LoadedModel`` or a bare model with its tokenizer and image processor."""
        if isinstance(model, ModelParts):
            return model
        if hasattr(model, "model") and hasattr(model, "image_processor"):  # LoadedModel
            return cls(model.model, tokenizer or model.tokenizer, image_processor or model.image_processor,
                       name or getattr(model, "source", ""))
        if tokenizer is None or image_processor is None:
            raise ValueError("a bare model needs its tokenizer and image_processor")
        return cls(model, tokenizer, image_processor, name)

    @property
    def stage(self) -> int:
        return 2 if hasattr(self.model, "language_model") else 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class RunResult:
    metrics: dict[str, Any]
    out_dir: Path | None
    generated: int  # items computed by this run (all ranks)
    reused: int  # items taken over from an earlier, interrupted run
    outputs: dict[str, Any] = field(default_factory=dict)  # key -> raw output (answer, caption, ITM record)


# ============================================================================ incremental predictions
def read_jsonl(path: Path) -> dict[str, dict[str, Any]]:
    """``{"key": ...}`` records of a predictions JSONL by key; a torn line (an interrupted write) is skipped,
    so that item is simply redone."""
    return {str(r["key"]): r for r in iter_records(path) if "key" in r}


class PredictionStore:
    """Append-only JSONL of finished items (``{"key": ..., ...}`` per line), one file per rank.

    ``load`` reads every rank's file and tolerates a torn last line (a run killed mid-write).
    Without a directory it only keeps records in memory.
    """

    def __init__(self, out_dir: Path | None, rank: int = 0):
        self.out_dir = out_dir
        self.path = None
        if out_dir is not None:
            name = PREDICTIONS_JSONL if rank == 0 else f"predictions.rank{rank}.jsonl"
            self.path = out_dir / name

    def files(self) -> list[Path]:
        if self.out_dir is None or not self.out_dir.exists():
            return []
        return sorted(self.out_dir.glob("predictions*.jsonl"))

    def load(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        for path in self.files():
            records.update(read_jsonl(path))
        return records

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        if self.path is not None:
            append_records(self.path, records)  # cuts off a torn last line (an interrupted write) first

    def clear(self) -> None:
        for path in self.files():
            path.unlink()


# ============================================================================ images
def _image_batches(paths: Sequence[Path], image_processor, batch_size: int, num_workers: int,
                   pin_memory: bool = False):
    """(positions, pixel_values) batches in order; raises a one-line error for an unreadable image."""
    from blip2cli.images import image_batches

    for positions, pixels, _ in image_batches(paths, image_processor, batch_size, num_workers, pin_memory):
        yield positions, pixels


def check_images(items: Sequence[EvalItem]) -> None:
    """Fail before any model work when image files are missing."""
    missing = [it.image for it in items if not it.image.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise Blip2Error(f"image not found: {missing[0]}{more}")


def progress_bar(enabled: bool, unit: str | None = None):
    """A rich progress bar on stderr (drawn only on a terminal); with ``unit`` (e.g. "images") it also shows
    the rate, items per second."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed or 0:.1f} {unit}/s", style="progress.data.speed")

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *([Rate()] if unit else []),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled or not console.is_terminal,
        transient=False,
    )


# ============================================================================ generation
def _generation_kwargs(settings: EvalSettings) -> dict[str, Any]:
    return dict(
        num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
        length_penalty=settings.length_penalty, repetition_penalty=settings.repetition_penalty, do_sample=False,
    )


def _prompts(data: EvalData, items: Sequence[EvalItem], settings: EvalSettings) -> list[str]:
    from blip2cli.models.text import normalize_question, question_prompts

    if data.kind in ("vqa", "gqa"):
        return question_prompts(settings.prompt, [normalize_question(it.text or "") for it in items])
    return [settings.prompt] * len(items)


@torch.inference_mode()
def _generate_outputs(
    parts: ModelParts,
    data: EvalData,
    todo: Sequence[EvalItem],
    settings: EvalSettings,
    store: PredictionStore,
    batch_size: int,
    num_workers: int,
    show_progress: bool,
) -> dict[str, str]:
    from blip2cli.models.text import generate_texts

    model, device = parts.model, parts.device
    kwargs = _generation_kwargs(settings)
    # Stop where the checkpoint's training texts ended (as `blip2 ask` does).
    end_token = (getattr(model.config, "usage", None) or {}).get("end_token")
    new: dict[str, str] = {}
    with progress_bar(show_progress) as progress:
        bar = progress.add_task(f"{data.task} {data.split}", total=len(todo))
        batches = _image_batches([it.image for it in todo], parts.image_processor, batch_size, num_workers,
                                 pin_memory=device.type == "cuda")
        for positions, pixels in batches:
            batch_items = [todo[p] for p in positions]
            outputs = generate_texts(model, parts.tokenizer, pixels.to(device), _prompts(data, batch_items, settings),
                                     end_token, **kwargs)
            records = [{"key": it.key, "output": out} for it, out in zip(batch_items, outputs)]
            store.append(records)
            new.update({r["key"]: r["output"] for r in records})
            progress.advance(bar, len(batch_items))
    return new


# ============================================================================ retrieval
def retrieval_autocast(device: torch.device):
    """The Q-Former passes of retrieval (ITC features, ITM re-ranking) under bf16 autocast on a GPU (fp16
    where bf16 is missing), as training runs them; plain fp32 on a CPU. Scores are compared in fp32."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def _features(parts: ModelParts, data: EvalData, settings: EvalSettings, batch_size: int, num_workers: int,
              show_progress: bool):
    """Text token ids/masks, normalised text features (T, D) and image query features (N, NQ, D), all ranks'
    shares gathered."""
    from blip2cli.models.text import normalize_caption

    model, device = parts.model, parts.device
    rank, world = group_rank_and_world()
    encoded = parts.tokenizer(
        [normalize_caption(t) for t in data.texts], padding="max_length", truncation=True,
        max_length=settings.text_max_length, return_tensors="pt",
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    text_rows = list(range(rank, len(data.texts), world))
    image_rows = list(range(rank, len(data.items), world))
    text_parts, image_parts = [], []
    with torch.inference_mode(), retrieval_autocast(device), progress_bar(show_progress) as progress:
        bar = progress.add_task("text features", total=len(text_rows))
        for start in range(0, len(text_rows), batch_size * 4):
            rows = text_rows[start:start + batch_size * 4]
            feats = model.text_embeddings(ids[rows].to(device), mask[rows].to(device))
            text_parts.append(feats.float().cpu())
            progress.advance(bar, len(rows))
        bar = progress.add_task("image features", total=len(image_rows))
        paths = [data.items[i].image for i in image_rows]
        for positions, pixels in _image_batches(paths, parts.image_processor, batch_size, num_workers,
                                                 pin_memory=device.type == "cuda"):
            feats, _ = model.image_embeddings(pixels.to(device))
            image_parts.append(feats.float().cpu())
            progress.advance(bar, len(positions))
    mine = (text_rows, torch.cat(text_parts) if text_parts else None,
            image_rows, torch.cat(image_parts) if image_parts else None)
    text_feats = image_feats = None
    for t_rows, t_feats, i_rows, i_feats in all_gather_objects(mine):
        if t_feats is not None:
            if text_feats is None:
                text_feats = torch.empty(len(data.texts), t_feats.shape[-1])
            text_feats[t_rows] = t_feats
        if i_feats is not None:
            if image_feats is None:
                image_feats = torch.empty(len(data.items), *i_feats.shape[1:])
            image_feats[i_rows] = i_feats
    return ids, mask, text_feats, image_feats


def _itc_candidates(model, image_feats: torch.Tensor, text_feats: torch.Tensor, k_test: int, device, chunk: int = 256):
    """Top-k ITC candidates: (i2t values, i2t indices) per image, (t2i values, t2i indices) per text."""
    k_texts = min(k_test, text_feats.shape[0])
    k_images = min(k_test, image_feats.shape[0])
    text_dev = text_feats.to(device)
    image_dev = image_feats.to(device)
    i2t_val, i2t_idx, t2i_val, t2i_idx = [], [], [], []
    for start in range(0, image_dev.shape[0], chunk):
        sim = model.itc_similarity(image_dev[start:start + chunk], text_dev).float()
        values, indices = sim.topk(k_texts, dim=1)
        i2t_val.append(values.cpu())
        i2t_idx.append(indices.cpu())
    for start in range(0, text_dev.shape[0], chunk):
        sim = model.itc_similarity(image_dev, text_dev[start:start + chunk]).float().T
        values, indices = sim.topk(k_images, dim=1)
        t2i_val.append(values.cpu())
        t2i_idx.append(indices.cpu())
    return torch.cat(i2t_val), torch.cat(i2t_idx), torch.cat(t2i_val), torch.cat(t2i_idx)


def _needed_pairs(i2t_idx: torch.Tensor, t2i_idx: torch.Tensor, num_images: int) -> list[list[int]]:
    """For each image, the texts whose ITM logit with it is needed (its own candidates, and the texts that
    have it among theirs)."""
    needed: list[set[int]] = [set(row) for row in i2t_idx.tolist()]
    for text, images in enumerate(t2i_idx.tolist()):
        for image in images:
            needed[image].add(text)
    assert len(needed) == num_images
    return [sorted(s) for s in needed]


@torch.inference_mode()
def _itm_logits(
    parts: ModelParts, data: EvalData, todo: Sequence[int], needed: Sequence[Sequence[int]], ids: torch.Tensor,
    mask: torch.Tensor, store: PredictionStore, batch_size: int, itm_batch_size: int, num_workers: int,
    show_progress: bool,
) -> dict[str, dict[str, Any]]:
    model, device = parts.model, parts.device
    new: dict[str, dict[str, Any]] = {}
    with retrieval_autocast(device), progress_bar(show_progress) as progress:
        bar = progress.add_task("ITM re-ranking", total=len(todo))
        paths = [data.items[i].image for i in todo]
        for positions, pixels in _image_batches(paths, parts.image_processor, batch_size, num_workers,
                                                 pin_memory=device.type == "cuda"):
            _, vit = model.image_embeddings(pixels.to(device))
            pairs = [(b, todo[p], t) for b, p in enumerate(positions) for t in needed[todo[p]]]
            logits: list[float] = []
            for start in range(0, len(pairs), itm_batch_size):
                chunk = pairs[start:start + itm_batch_size]
                rows = torch.tensor([b for b, _, _ in chunk], device=device)
                texts = [t for _, _, t in chunk]
                scores = model.itm_scores(vit[rows], ids[texts].to(device), mask[texts].to(device))
                logits.extend(scores[:, 1].float().cpu().tolist())
            records, offset = [], 0
            for p in positions:  # pairs are laid out image after image, in ``needed`` order
                image = todo[p]
                texts = list(needed[image])
                records.append({"key": data.items[image].key, "texts": texts,
                                "itm": logits[offset:offset + len(texts)]})
                offset += len(texts)
            store.append(records)
            new.update({r["key"]: r for r in records})
            progress.advance(bar, len(positions))
    return new


def _rankings(data: EvalData, records: dict[str, dict[str, Any]], i2t_val, i2t_idx, t2i_val, t2i_idx,
              top: int = 10) -> tuple[list[list[int]], list[list[int]]]:
    """Top-``top`` rankings from ``ITM logit + ITC similarity`` over the candidates (all others score -100,
    LAVIS' fill value); ties go to the lower index. Vectorised: one sorted table of (image, text) keys."""
    import numpy as np

    num_texts = len(data.texts)
    keys, logits = [], []
    for i, item in enumerate(data.items):
        record = records[item.key]
        keys.append(i * num_texts + np.asarray(record["texts"], dtype=np.int64))
        logits.append(np.asarray(record["itm"], dtype=np.float64))
    keys_all, logits_all = np.concatenate(keys), np.concatenate(logits)
    order = np.argsort(keys_all)
    keys_all, logits_all = keys_all[order], logits_all[order]

    def lookup(query: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(keys_all, query)
        if (pos >= len(keys_all)).any() or (keys_all[np.minimum(pos, len(keys_all) - 1)] != query).any():
            raise RuntimeError("an ITM logit needed for re-ranking is missing")  # a bug, not a user error
        return logits_all[pos]

    def ranked(candidates: np.ndarray, scores: np.ndarray, total: int) -> list[list[int]]:
        order = np.lexsort((candidates, -scores), axis=-1)  # score descending, then lower index
        sorted_candidates = np.take_along_axis(candidates, order, axis=-1)[:, :top].tolist()
        if candidates.shape[1] < top:  # fewer candidates than reported ranks: the -100 rest, lower index first
            for row in sorted_candidates:
                chosen = set(row)
                row += [x for x in range(total) if x not in chosen][: top - len(row)]
        return sorted_candidates

    i2t_c = i2t_idx.numpy().astype(np.int64)
    rows = np.arange(len(data.items), dtype=np.int64)[:, None]
    i2t_scores = lookup(rows * num_texts + i2t_c) + i2t_val.double().numpy()
    t2i_c = t2i_idx.numpy().astype(np.int64)
    cols = np.arange(num_texts, dtype=np.int64)[:, None]
    t2i_scores = lookup(t2i_c * num_texts + cols) + t2i_val.double().numpy()
    return ranked(i2t_c, i2t_scores, num_texts), ranked(t2i_c, t2i_scores, len(data.items))


def _run_retrieval(parts, data, settings, store, batch_size, itm_batch_size, num_workers, show_progress):
    rank, world = group_rank_and_world()
    check_images(data.items)
    ids, mask, text_feats, image_feats = _features(parts, data, settings, batch_size, num_workers, show_progress)
    i2t_val, i2t_idx, t2i_val, t2i_idx = _itc_candidates(parts.model, image_feats, text_feats, settings.k_test,
                                                        parts.device)
    needed = _needed_pairs(i2t_idx, t2i_idx, len(data.items))
    earlier = store.load()
    done = {}
    for i, item in enumerate(data.items):
        record = earlier.get(item.key)
        if record is not None and set(needed[i]) <= set(record.get("texts", [])):
            # keep only the pairs this run needs (a resumed record may hold more)
            lookup = dict(zip(record["texts"], record["itm"]))
            done[item.key] = {"key": item.key, "texts": needed[i], "itm": [lookup[t] for t in needed[i]]}
    todo = [i for i, item in enumerate(data.items) if item.key not in done]
    new = _itm_logits(parts, data, todo[rank::world], needed, ids, mask, store, batch_size, itm_batch_size,
                      num_workers, show_progress)
    gathered = all_gather_objects(new)
    records = dict(done)
    for part in gathered:
        records.update(part)
    generated = sum(len(p) for p in gathered)
    i2t, t2i = _rankings(data, records, i2t_val, i2t_idx, t2i_val, t2i_idx)
    return i2t, t2i, records, generated, len(done)


# ============================================================================ scoring
# Output sanity checks (``score_outputs`` -> ``metrics["output_stats"]`` and one-line notes): a note when
# more than this fraction of the outputs is empty, when more than this fraction of the captions is one
# identical caption, or when one answer is more than this fraction of the answers and more than
# ``ANSWER_BIAS_RATIO`` times its share among the ground-truth (majority) answers.
DEGENERATE_OUTPUT_FRACTION = 0.2
ANSWER_BIAS_RATIO = 1.5


def _majority_answer(answers: Sequence[str]) -> str:
    """The most frequent normalised human answer of a VQA question (like ``multiple_choice_answer``)."""
    from collections import Counter

    counts = Counter(M.normalize_vqa_answer(a) for a in answers)
    return counts.most_common(1)[0][0] if counts else ""


def output_stats(data: EvalData, outputs: dict[str, str], answers: dict[str, str] | None = None) -> dict[str, Any]:
    """Statistics of generated ``outputs`` (key -> raw text) and the warnings they call for.

    ``answers``: the VQA/GQA answers as scored (e.g. lemmatised), compared after VQA normalisation;
    captions are compared lowercased with single spaces. Returns ``num_outputs``, ``num_empty``,
    ``empty_fraction`` (empty after strip), ``top_output`` / ``top_fraction`` (the most common output),
    for answers with ground truth ``top_truth_fraction`` (that answer's share among the questions' majority
    answers), and ``warnings`` (one-line notes). The leaf names differ from every metric name, so the stats
    never shadow a metric in a flattened ``metrics.json``.
    """
    from collections import Counter

    is_answer = data.kind in ("vqa", "gqa")
    noun = "answers" if is_answer else "captions"
    n = len(outputs)
    empty = sum(1 for text in outputs.values() if not str(text).strip())
    if is_answer:
        compared = {k: M.normalize_vqa_answer(str((answers or outputs)[k])) for k in outputs}
    else:
        compared = {k: " ".join(str(v).lower().split()) for k, v in outputs.items()}
    top, top_count = Counter(compared.values()).most_common(1)[0] if n else ("", 0)
    stats: dict[str, Any] = {
        "num_outputs": n, "num_empty": empty, "empty_fraction": round(empty / n, 4) if n else 0.0,
        "top_output": top, "top_fraction": round(top_count / n, 4) if n else 0.0,
    }
    warnings: list[str] = []
    if n and empty / n > DEGENERATE_OUTPUT_FRACTION:
        warnings.append(f"{empty} of {n} {noun} ({empty / n:.0%}) are empty: the model may not have been "
                        "trained with this prompt template, or stops at once")
    # an empty top output is the empty note's business; one output alone is no repetition
    repeated = bool(top) and top_count >= 2
    if not is_answer:
        if repeated and top_count / n > DEGENERATE_OUTPUT_FRACTION:
            warnings.append(f"{json.dumps(top, ensure_ascii=False)} is {top_count / n:.0%} of the {noun}")
    else:
        if data.kind == "vqa":
            truth = {k: _majority_answer(v.get("answers") or []) for k, v in data.vqa_truth.items() if k in compared}
        else:
            truth = {k: M.normalize_vqa_answer(str(v)) for k, v in data.gqa_truth.items() if k in compared}
        if truth:
            predicted = sum(1 for k in truth if compared[k] == top) / len(truth)
            expected = sum(1 for v in truth.values() if v == top) / len(truth)
            stats["top_truth_fraction"] = round(expected, 4)
            if repeated and predicted > DEGENERATE_OUTPUT_FRACTION and predicted > ANSWER_BIAS_RATIO * expected:
                warnings.append(f"{json.dumps(top, ensure_ascii=False)} is {predicted:.0%} of the {noun} "
                                f"(ground truth: {expected:.0%})")
    stats["warnings"] = warnings
    return stats


def score_outputs(data: EvalData, outputs: dict[str, str], settings: EvalSettings,
                  use_java: bool | None = None,
                  lemmatizer: Callable[[str], str] | None = None) -> tuple[dict[str, Any], Any]:
    """Metrics and the official submission (predictions JSON) for generated outputs keyed by item key.

    The metrics carry ``output_stats`` (see ``output_stats``); its warnings are appended to ``notes``.
    VQA/GQA metrics also say whether the answers were ``lemmatized`` (OK-VQA's protocol; with
    ``settings.lemmatize``, by ``lemmatizer`` or else spaCy's, and false with a note when spaCy is missing)
    and, for GQA, the ``gqa_scoring`` used."""
    items = [it for it in data.items if it.key in outputs]
    notes: list[str] = []
    skipped: list[str] = []
    answers: dict[str, str] | None = None  # VQA/GQA answers as scored
    lemmatized = False
    if data.kind in ("vqa", "gqa"):
        answers = {it.key: outputs[it.key] for it in items}
        if settings.lemmatize:
            lemmatize, reason = (lemmatizer, "") if lemmatizer is not None else M.load_lemmatizer()
            if lemmatize is None:
                notes.append(f"answer lemmatisation skipped, so the accuracy is not comparable with the paper's: {reason}")
                skipped.append("lemmatization")
            else:
                answers = {k: lemmatize(v) for k, v in answers.items()}
                lemmatized = True
        if data.kind == "vqa":
            submission = [{"question_id": it.id, "answer": answers[it.key]} for it in items]
            metrics = M.vqa_accuracy(answers, data.vqa_truth) if data.vqa_truth else {}
        else:
            submission = [{"questionId": it.id, "prediction": answers[it.key]} for it in items]
            metrics = M.gqa_accuracy(answers, data.gqa_truth, settings.gqa_scoring) if data.gqa_truth else {}
            metrics["gqa_scoring"] = settings.gqa_scoring
        metrics["lemmatized"] = lemmatized
    elif data.kind == "caption":
        submission = [{"image_id": it.id, "caption": outputs[it.key]} for it in items]
        metrics = {}
        scored = {it.key: outputs[it.key] for it in items if it.key in data.captions}
        if scored:
            metrics = M.caption_metrics(scored, data.captions, use_java=use_java)
            skipped.extend(metrics.pop("skipped"))
            if data.domains:
                per_domain = {}
                for domain in sorted(set(data.domains.values())):
                    subset = {k: v for k, v in scored.items() if data.domains.get(k) == domain}
                    if subset:
                        dm = M.caption_metrics(subset, data.captions, use_java=use_java)
                        for key in ("skipped", "skipped_reasons", "tokenizer"):
                            dm.pop(key)
                        per_domain[domain] = dm
                metrics["per_domain"] = per_domain
    else:
        raise ValueError(f"score_outputs does not handle {data.kind}")
    if not data.has_truth:
        notes.append("no ground truth for this split: predictions written for the evaluation server")
    stats = output_stats(data, {it.key: outputs[it.key] for it in items}, answers)
    metrics["output_stats"] = stats
    notes.extend(stats["warnings"])
    metrics["skipped"] = sorted(set(skipped))
    if notes:
        metrics["notes"] = notes
    return metrics, submission


def _retrieval_metrics(data: EvalData, i2t, t2i) -> tuple[dict[str, Any], dict[str, Any]]:
    metrics = M.retrieval_metrics(i2t, t2i, data.img2txt, data.txt2img)
    metrics["num_images"] = len(data.items)
    metrics["num_texts"] = len(data.texts)
    metrics["skipped"] = []
    submission = {"image_ids": [it.id for it in data.items], "i2t": i2t, "t2i": t2i}
    return metrics, submission


# ============================================================================ runs
def _fingerprint(data: EvalData, model_name: str, settings: EvalSettings) -> dict[str, Any]:
    return {"task": data.task, "split": data.split, "model": model_name, "settings": settings.to_dict()}


# Settings that change how outputs are scored or labelled, not the outputs: a resumed run may change them.
SCORING_ONLY_SETTINGS = ("lemmatize", "gqa_scoring", "protocol")


def _comparable(fingerprint: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """``fingerprint`` without the scoring-only settings and without settings ``known`` (an earlier run's
    settings) lacks, which a run by an older version did not record."""
    settings = {k: v for k, v in fingerprint.get("settings", {}).items()
                if k not in SCORING_ONLY_SETTINGS and k in known}
    return {**fingerprint, "settings": settings}


def _prepare_out_dir(out_dir: Path, fingerprint: dict[str, Any], restart: bool, store: PredictionStore) -> None:
    run_file = out_dir / RUN_JSON
    if restart:
        store.clear()
    elif run_file.exists() and store.files():
        try:
            previous = json.loads(run_file.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous is not None:
            known = previous.get("settings", {})
            previous, fingerprint = _comparable(previous, known), _comparable(fingerprint, known)
        if previous is not None and previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            if "settings" in changed:
                old, new = previous.get("settings", {}), fingerprint["settings"]
                changed = [f"settings.{k}" for k in sorted(new) if old.get(k) != new.get(k)] + \
                          [c for c in changed if c != "settings"]
            raise Blip2Error(
                f"{out_dir} holds predictions made with different {', '.join(changed)}; "
                "pass another --out, or --restart to discard them"
            )


def write_outputs(out_dir: Path, metrics: dict[str, Any], submission: Any, run_info: dict[str, Any]) -> None:
    """``metrics.json``, ``predictions.json`` (official format) and ``run.json``, written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, payload in ((PREDICTIONS_JSON, submission), (METRICS_JSON, metrics), (RUN_JSON, run_info)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=1 if name != PREDICTIONS_JSON else None, ensure_ascii=False) + "\n")
        tmp.replace(out_dir / name)


def run_eval(
    task: str,
    model: Any,
    data: EvalData,
    *,
    settings: EvalSettings | None = None,
    out_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    itm_batch_size: int = 128,
    num_workers: int = 0,
    restart: bool = False,
    show_progress: bool = True,
    model_name: str = "",
    tokenizer: Any = None,
    image_processor: Any = None,
    use_java: bool | None = None,
) -> RunResult:
    """Evaluate ``model`` (a ``LoadedModel``, or a bare model with ``tokenizer``/``image_processor``) on
    ``data`` and, with ``out_dir``, write ``predictions.jsonl`` (incrementally), ``predictions.json``,
    ``metrics.json`` and ``run.json`` there. Returns the metrics on every rank."""
    spec = task_spec(task)
    parts = ModelParts.from_any(model, tokenizer, image_processor, model_name)
    want_stage = 1 if spec.kind == "retrieval" else 2
    if parts.stage != want_stage:
        need = "a stage-1 (Q-Former retrieval) checkpoint" if want_stage == 1 else "a stage-2 checkpoint with a language model"
        raise Blip2Error(f"{spec.name} needs {need}; {parts.name or 'this model'} is stage {parts.stage}")
    if settings is None:
        settings, _ = resolve_settings(spec.name, getattr(parts.model, "config", None),
                                       bool(getattr(parts.model, "is_encoder_decoder", False)))
    if batch_size < 1:
        raise Blip2Error("--batch-size must be at least 1")
    if spec.kind in ("vqa", "gqa") and settings.prompt.count("{}") != 1:
        raise Blip2Error(f"a VQA prompt needs exactly one '{{}}' for the question: {settings.prompt!r}")
    data = data.limited(limit)
    rank, world = group_rank_and_world()
    out = Path(out_dir) if out_dir is not None else None
    store = PredictionStore(out, rank)
    fingerprint = _fingerprint(data, parts.name, settings)
    if out is not None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _prepare_out_dir(out, fingerprint, restart, store)
        all_gather_objects(None)  # barrier: rank 0 has checked (and maybe cleared) the directory
    was_training = parts.model.training
    parts.model.eval()
    started = time.time()
    try:
        if spec.kind == "retrieval":
            i2t, t2i, outputs, generated, reused = _run_retrieval(
                parts, data, settings, store, batch_size, itm_batch_size, num_workers, show_progress
            )
        else:
            wanted = {it.key for it in data.items}
            earlier = {k: r["output"] for k, r in store.load().items() if k in wanted and "output" in r}
            todo = [it for it in data.items if it.key not in earlier]
            check_images(todo)  # on every rank, so that all of them stop together
            mine = todo[rank::world]
            new = _generate_outputs(parts, data, mine, settings, store, batch_size, num_workers, show_progress)
            gathered = all_gather_objects(new)
            outputs = dict(earlier)
            for part in gathered:
                outputs.update(part)
            generated, reused = sum(len(p) for p in gathered), len(earlier)
    finally:
        parts.model.train(was_training)

    metrics: dict[str, Any] = {}
    if rank == 0:
        if spec.kind == "retrieval":
            metrics, submission = _retrieval_metrics(data, i2t, t2i)
        else:
            metrics, submission = score_outputs(data, outputs, settings, use_java=use_java)
        metrics.update(task=spec.name, split=data.split, model=parts.name, num_items=len(data.items),
                       protocol=settings.protocol, settings=settings.to_dict())
        if out is not None:
            run_info = {"fingerprint": fingerprint, "generated": generated, "reused": reused, "limit": limit,
                        "world_size": world, "seconds": round(time.time() - started, 2)}
            write_outputs(out, metrics, submission, run_info)
    metrics = broadcast_object(metrics)
    return RunResult(metrics=metrics, out_dir=out, generated=generated, reused=reused, outputs=outputs)


def evaluate(
    task: str,
    model: Any,
    data: EvalData,
    limit: int | None = None,
    *,
    tokenizer: Any = None,
    image_processor: Any = None,
    settings: EvalSettings | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """In-loop validation for training: metrics of ``model`` on the first ``limit`` items of ``data``, in
    memory (no files, no progress bar). ``model`` is a ``LoadedModel`` or a bare stage-1/stage-2 model
    (unwrap DDP: pass ``ddp.module``) with ``tokenizer`` and ``image_processor``; its train/eval mode is
    restored afterwards. Under torchrun every rank must call it (the items are split over the ranks);
    every rank gets the metrics."""
    return run_eval(task, model, data, settings=settings, limit=limit, batch_size=batch_size,
                    show_progress=False, tokenizer=tokenizer, image_processor=image_processor).metrics


# ============================================================================ re-scoring a predictions file
def read_predictions(path: str | os.PathLike, data: EvalData) -> tuple[dict[str, Any], Any]:
    """Outputs keyed like ``data`` from an official-format predictions JSON or a ``predictions.jsonl``.

    Returns ``(outputs, retrieval)``: generated text per key, or for retrieval ``(i2t, t2i)`` rankings."""
    path = Path(path)
    if not path.is_file():
        raise Blip2Error(f"predictions file not found: {path}")
    if path.suffix == ".jsonl":
        if data.kind == "retrieval":
            raise Blip2Error(f"{path}: re-score retrieval from its predictions.json (rankings), not the JSONL")
        return {k: r["output"] for k, r in read_jsonl(path).items() if "output" in r}, None
    text = path.read_text(encoding="utf-8")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise Blip2Error(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if data.kind == "retrieval":
        if not isinstance(payload, dict) or not {"i2t", "t2i"} <= set(payload):
            raise Blip2Error(f"{path}: expected {{\"image_ids\", \"i2t\", \"t2i\"}} rankings")
        if len(payload["i2t"]) != len(data.items) or len(payload["t2i"]) != len(data.texts):
            raise Blip2Error(f"{path}: rankings for {len(payload['i2t'])} images / {len(payload['t2i'])} texts, "
                             f"but the data has {len(data.items)} / {len(data.texts)}")
        return {}, (payload["i2t"], payload["t2i"])
    if not isinstance(payload, list):
        raise Blip2Error(f"{path}: expected a JSON list of predictions")
    id_key, value_keys = {"vqa": ("question_id", ("answer",)),
                          "gqa": ("questionId", ("prediction", "answer")),
                          "caption": ("image_id", ("caption",))}[data.kind]
    outputs: dict[str, str] = {}
    for record in payload:
        if not isinstance(record, dict):
            raise Blip2Error(f"{path}: every prediction must be a JSON object")
        ident = record.get(id_key, record.get("question_id"))
        value = next((record[k] for k in value_keys if k in record), record.get("pred_ans"))
        if ident is None or value is None:
            raise Blip2Error(f"{path}: a prediction lacks {id_key!r} or {value_keys[0]!r}")
        outputs[str(ident)] = value
    return outputs, None


def rescore(
    task: str,
    data: EvalData,
    predictions: str | os.PathLike,
    *,
    settings: EvalSettings | None = None,
    out_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    use_java: bool | None = None,
) -> RunResult:
    """Score an existing predictions file against ``data`` without a model."""
    spec = task_spec(task)
    data = data.limited(limit)
    settings = settings or default_settings(spec.name)
    if not data.has_truth:
        raise Blip2Error(f"{spec.name} {data.split}: no ground truth to score against")
    outputs, rankings = read_predictions(predictions, data)
    if spec.kind == "retrieval":
        metrics, submission = _retrieval_metrics(data, *rankings)
    else:
        known = {it.key for it in data.items}
        outputs = {k: v for k, v in outputs.items() if k in known}
        if not outputs:
            raise Blip2Error(f"{predictions}: no prediction matches an item of {spec.name} {data.split}")
        metrics, submission = score_outputs(data, outputs, settings, use_java=use_java)
        missing = len(known) - len(outputs)
        if missing:
            metrics.setdefault("notes", []).append(f"{missing} items have no prediction and were not scored")
    metrics.update(task=spec.name, split=data.split, model=str(predictions), num_items=len(data.items),
                   protocol=settings.protocol, settings=settings.to_dict())
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        write_outputs(out, metrics, submission, {"fingerprint": _fingerprint(data, str(predictions), settings),
                                                 "rescored_from": str(predictions), "generated": 0, "reused": 0})
    return RunResult(metrics=metrics, out_dir=out, generated=0, reused=len(outputs), outputs=outputs)
