"""The demo's own small scorer, used only when ``blip2 eval`` is not available in this installation.

``blip2 demo`` prefers the real ``blip2 eval`` command (official VQA accuracy, pycocoevalcap captioning
metrics, ITC+ITM re-ranked retrieval). Where that command does not exist, this module scores the same
held-out files so the demo still reports numbers, and the report says which scorer produced them:

- retrieval: ITC similarity only (max over queries), no ITM re-ranking; R@1/5/10 both directions;
- captioning: CIDEr-D (pycocoevalcap's pure-Python scorer) on lowercased, punctuation-stripped text;
- VQA: the official accuracy formula (min(1, matches/3) averaged over the 10 leave-one-out subsets)
  after lowercasing and stripping punctuation and articles (the demo's answers are single words).

It also computes the baselines the report compares against (constant caption, majority answers).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

_PUNCT = re.compile(r"[^\w\s']")
_ARTICLES = {"a", "an", "the"}


def _tokens(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def cider(predictions: dict[int, str], references: dict[int, list[str]]) -> float:
    """CIDEr-D x 100 of one prediction per id against its references (pycocoevalcap's scorer)."""
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(predictions)
    gts = {i: [_tokens(r) for r in references[i]] for i in ids}
    res = {i: [_tokens(predictions[i])] for i in ids}
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


def normalize_answer(answer: str) -> str:
    words = [w for w in _tokens(answer).split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(predictions: dict[int, str], annotations: Sequence[dict]) -> float:
    """Official VQA accuracy x 100 (leave-one-out over the 10 answers) with simple normalisation."""
    total = 0.0
    for ann in annotations:
        pred = normalize_answer(predictions.get(ann["question_id"], ""))
        gts = [normalize_answer(a["answer"]) for a in ann["answers"]]
        acc = 0.0
        for k in range(len(gts)):
            others = gts[:k] + gts[k + 1:]
            acc += min(1.0, sum(g == pred for g in others) / 3.0)
        total += acc / len(gts)
    return 100.0 * total / max(1, len(annotations))


def _manifest_split(data_dir: Path, split: str) -> tuple[dict, Path]:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    entry = manifest["splits"][split]
    return entry, (data_dir / entry["images"]).resolve()


def _load_images(paths: Sequence[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(img.convert("RGB"))
    return out


@torch.inference_mode()
def score_retrieval(checkpoint: Path, data_dir: Path, split: str = "test") -> dict[str, float]:
    from blip2cli.checkpoint import load_model

    entry, images_dir = _manifest_split(data_dir, split)
    karpathy = json.loads((data_dir / entry["annotations"]).read_text())
    images = [im for im in karpathy["images"] if im.get("split", split) == split]
    loaded = load_model(checkpoint)
    model, tok = loaded.model.eval(), loaded.tokenizer
    pixel = loaded.image_processor(images=_load_images([images_dir / im["filepath"] / im["filename"]
                                                        for im in images]), return_tensors="pt")["pixel_values"]
    image_feats, _ = model.image_embeddings(pixel)
    texts, owner = [], []
    for i, im in enumerate(images):
        for s in im["sentences"]:
            texts.append(s["raw"].lower())
            owner.append(i)
    enc = tok(texts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    text_feats = model.text_embeddings(enc["input_ids"], enc["attention_mask"])
    sim = model.itc_similarity(image_feats, text_feats)  # (Ni, Nt)
    owner_t = torch.tensor(owner)
    out = {}
    # image -> text: rank of the best-ranked ground-truth caption
    order = sim.argsort(dim=1, descending=True)
    ranks_i2t = torch.tensor([int((owner_t[order[i]] == i).nonzero()[0]) for i in range(len(images))])
    order_t = sim.t().argsort(dim=1, descending=True)
    ranks_t2i = torch.tensor([int((order_t[t] == owner[t]).nonzero()[0]) for t in range(len(texts))])
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * float((ranks_i2t < k).float().mean())
        out[f"img_r{k}"] = 100.0 * float((ranks_t2i < k).float().mean())
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    return out


def _generate(checkpoint: Path, images: list[Image.Image], prompts: list[str] | None, max_new_tokens: int,
              num_beams: int = 3, batch: int = 32) -> list[str]:
    from blip2cli.checkpoint import load_model
    from blip2cli.inference import Blip2Assistant, GenerationOptions

    assistant = Blip2Assistant(load_model(checkpoint))
    options = GenerationOptions(num_beams=num_beams, max_new_tokens=max_new_tokens)
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            chunk_prompts = prompts[i:i + batch] if prompts else None
            out.extend(assistant.generate(images[i:i + batch], chunk_prompts, options))
    return out


def score_captioning(checkpoint: Path, data_dir: Path, split: str = "test") -> tuple[dict[str, float], dict]:
    entry, images_dir = _manifest_split(data_dir, split)
    karpathy = json.loads((data_dir / entry["annotations"]).read_text())
    images = [im for im in karpathy["images"] if im.get("split", split) == split]
    pics = _load_images([images_dir / im["filepath"] / im["filename"] for im in images])
    from blip2cli.demo.world import CAPTION_PROMPT

    captions = _generate(checkpoint, pics, [CAPTION_PROMPT.strip()] * len(pics), max_new_tokens=30)
    preds = {im["imgid"]: c for im, c in zip(images, captions)}
    refs = {im["imgid"]: [s["raw"] for s in im["sentences"]] for im in images}
    return {"CIDEr": cider(preds, refs)}, preds


def score_vqa(checkpoint: Path, data_dir: Path, template: str, split: str = "test") -> tuple[dict[str, float], dict]:
    entry, images_dir = _manifest_split(data_dir, split)
    qs = json.loads((data_dir / entry["questions"]).read_text())["questions"]
    anns = json.loads((data_dir / entry["annotations"]).read_text())["annotations"]
    pattern = entry["image_pattern"]
    cache: dict[int, Image.Image] = {}
    pics = []
    for q in qs:
        if q["image_id"] not in cache:
            cache[q["image_id"]] = _load_images([images_dir / pattern.format(image_id=q["image_id"])])[0]
        pics.append(cache[q["image_id"]])
    answers = _generate(checkpoint, pics, [template.format(q["question"]) for q in qs], max_new_tokens=5)
    preds = {q["question_id"]: a for q, a in zip(qs, answers)}
    return {"accuracy": vqa_accuracy(preds, anns)}, preds


def caption_baseline(data_dir: Path, train_captions: Sequence[str], split: str = "test") -> float:
    """CIDEr of the most frequent training caption given for every test image."""
    entry, _ = _manifest_split(data_dir, split)
    images = json.loads((data_dir / entry["annotations"]).read_text())["images"]
    constant = Counter(train_captions).most_common(1)[0][0]
    preds = {im["imgid"]: constant for im in images}
    refs = {im["imgid"]: [s["raw"] for s in im["sentences"]] for im in images}
    return cider(preds, refs)
