"""Readers for the official evaluation annotation formats, and the data-directory contract.

An evaluation data directory (default ``<workspace>/eval/<task>/``, filled by ``blip2 download eval``) may
hold ``manifest.json``::

    {"task": "vqav2",
     "splits": {"val": {"questions": "<rel path>", "annotations": "<rel path>", "images": "<rel dir>",
                        "image_pattern": "COCO_val2014_{image_id:012d}.jpg"}}}

Paths are relative to the directory. Per task:

- vqav2 / okvqa: VQA questions JSON + annotations JSON (official formats; annotations optional for
  test-dev) + COCO image dir (``COCO_val2014_%012d.jpg`` or ``%012d.jpg``, or ``image_pattern``);
- gqa: GQA questions JSON (``{id: {imageId, question, answer}}``) + image dir (``<imageId>.jpg``);
- coco / flickr30k / coco_retrieval: Karpathy ``dataset_coco.json`` / ``dataset_flickr30k.json`` as
  ``annotations`` (``captions`` accepted) + the root under which ``filepath/filename`` resolves;
- nocaps: COCO-format captions JSON (``images`` with ``file_name``/``id``/``domain``, ``annotations``) + image dir.

Explicit ``--questions/--annotations/--images`` override the manifest. Without ``--split`` the task's
default split is used (vqav2/okvqa/nocaps ``val``, gqa ``testdev``, others ``test``), or the manifest's
name for it (``test-dev``; OK-VQA's ``test``), or the manifest's only split. Errors are one line naming the
missing file or key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blip2cli.errors import Blip2Error
from blip2cli.evaluation.tasks import task_spec

MANIFEST = "manifest.json"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class EvalItem:
    """One unit of work: a question about an image (VQA/GQA) or an image to caption or to rank."""

    key: str  # unique string id; the JSONL resume key
    id: Any  # the official id (VQA question_id int, GQA questionId str, COCO image_id int)
    image: Path
    text: str | None = None  # the question (VQA/GQA)


@dataclass
class EvalData:
    """Everything an evaluation needs for one task split."""

    task: str
    split: str
    kind: str
    items: list[EvalItem]  # questions (VQA/GQA), images (captioning, retrieval)
    vqa_truth: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> answers/answer_type/question_type
    gqa_truth: dict[str, str] = field(default_factory=dict)  # key -> answer
    captions: dict[str, list[str]] = field(default_factory=dict)  # image key -> reference captions
    domains: dict[str, str] = field(default_factory=dict)  # nocaps image key -> in/near/out-domain
    texts: list[str] = field(default_factory=list)  # retrieval: all captions
    txt2img: list[int] = field(default_factory=list)  # retrieval: caption -> image index
    img2txt: list[list[int]] = field(default_factory=list)  # retrieval: image index -> caption indices

    @property
    def has_truth(self) -> bool:
        return bool(self.vqa_truth or self.gqa_truth or self.captions or self.texts)

    def limited(self, limit: int | None) -> "EvalData":
        """The first ``limit`` items (and, for retrieval, only their captions)."""
        if limit is None or limit >= len(self.items):
            return self
        if limit < 1:
            raise Blip2Error("--limit must be at least 1")
        items = self.items[:limit]
        if self.kind != "retrieval":
            keys = {it.key for it in items}
            return replace(
                self, items=items,
                vqa_truth={k: v for k, v in self.vqa_truth.items() if k in keys},
                gqa_truth={k: v for k, v in self.gqa_truth.items() if k in keys},
                captions={k: v for k, v in self.captions.items() if k in keys},
                domains={k: v for k, v in self.domains.items() if k in keys},
            )
        texts, txt2img, img2txt = [], [], []
        for i in range(limit):
            img2txt.append([])
            for t in self.img2txt[i]:
                img2txt[i].append(len(texts))
                texts.append(self.texts[t])
                txt2img.append(i)
        return replace(self, items=items, texts=texts, txt2img=txt2img, img2txt=img2txt)


@dataclass
class Sources:
    """Resolved input files of one split."""

    questions: Path | None = None
    annotations: Path | None = None
    images: Path | None = None
    image_pattern: str | None = None


# ============================================================================ locating files
def resolve_sources(
    task: str,
    data_dir: str | os.PathLike | None,
    split: str,
    questions: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    image_pattern: str | None = None,
) -> Sources:
    """Manifest entries of ``split`` in ``data_dir``, overridden by explicit paths."""
    spec = task_spec(task)
    sources = Sources()
    manifest_path = Path(data_dir) / MANIFEST if data_dir is not None else None
    if manifest_path is not None and manifest_path.exists():
        manifest = _read_json(manifest_path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
            raise Blip2Error(f"{manifest_path}: expected {{\"task\": ..., \"splits\": {{SPLIT: {{...}}}}}}")
        entry = manifest["splits"].get(split)
        if entry is None and not (questions or annotations or images):
            known = ", ".join(manifest["splits"]) or "none"
            raise Blip2Error(f"{manifest_path} has no split {split!r} (splits: {known}); pass --split")
        entry = entry or {}
        base = manifest_path.parent

        def rel(key: str, *aliases: str) -> Path | None:
            for name in (key, *aliases):
                if entry.get(name):
                    return base / entry[name]
            return None

        sources = Sources(rel("questions"), rel("annotations", "captions"), rel("images"), entry.get("image_pattern"))
    elif not (questions or annotations or images):
        where = f"{data_dir}" if data_dir is not None else "the data directory"
        raise Blip2Error(
            f"no {MANIFEST} in {where}; run `blip2 download eval {spec.name}` or pass "
            "--questions/--annotations/--images"
        )
    if questions:
        sources.questions = Path(questions)
    if annotations:
        sources.annotations = Path(annotations)
    if images:
        sources.images = Path(images)
    if image_pattern:
        sources.image_pattern = image_pattern

    needed = {"vqa": ["questions", "images"], "gqa": ["questions", "images"],
              "caption": ["annotations", "images"], "retrieval": ["annotations", "images"]}[spec.kind]
    for name in needed:
        path = getattr(sources, name)
        if path is None:
            flag = "--annotations (or --captions)" if name == "annotations" else f"--{name}"
            raise Blip2Error(f"{spec.name} {split}: no {name} given (manifest key {name!r} or {flag})")
    for name in ("questions", "annotations"):
        path = getattr(sources, name)
        if path is not None and not path.is_file():
            raise Blip2Error(f"{name} file not found: {path}")
    if not sources.images.is_dir():
        raise Blip2Error(f"image directory not found: {sources.images}")
    return sources


def load_eval_data(
    task: str,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    questions: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    image_pattern: str | None = None,
) -> EvalData:
    """Read one task split into an ``EvalData`` (default directory: ``<workspace>/eval/<task>/``)."""
    spec = task_spec(task)
    if data_dir is None and not (questions or annotations or images):
        from blip2cli.data.workspace import eval_dir

        data_dir = eval_dir(spec.name)
    split = split or _default_split(spec.name, spec.default_split, data_dir)
    sources = resolve_sources(spec.name, data_dir, split, questions, annotations, images, image_pattern)
    if spec.kind == "vqa":
        return read_vqa(spec.name, split, sources)
    if spec.kind == "gqa":
        return read_gqa(split, sources)
    if spec.name == "nocaps":
        return read_coco_captions(spec.name, split, sources)
    return read_karpathy(spec.name, split, sources)


# Other names the same split goes by (OK-VQA's "test" is its val2014 question set).
_SPLIT_ALIASES = {"testdev": ("test-dev", "test_dev", "testdev_balanced"), "val": ("test", "val2014"),
                  "test": ("karpathy_test",)}


def _default_split(task: str, default: str, data_dir) -> str:
    """The task's default split, or the manifest's name for it (an alias, or its only split)."""
    manifest_path = Path(data_dir) / MANIFEST if data_dir is not None else None
    if manifest_path is None or not manifest_path.exists():
        return default
    manifest = _read_json(manifest_path)
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict) or default in splits:
        return default
    for alias in _SPLIT_ALIASES.get(default, ()):
        if alias in splits and (task == "okvqa" or alias != "test"):
            return alias
    return next(iter(splits)) if len(splits) == 1 else default


# ============================================================================ helpers
def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise Blip2Error(f"file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise Blip2Error(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except OSError as err:
        raise Blip2Error(f"cannot read {path}: {err.strerror or err}") from None


def _require(record: dict, key: str, path: Path, what: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise Blip2Error(f"{path}: a {what} has no {key!r} key")
    return record[key]


def _list_under(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise Blip2Error(f"{path}: expected a JSON object with a {key!r} list")
    return data[key]


class ImageFinder:
    """COCO-style image file for an image id: ``image_pattern`` if given, else ``COCO_<split>_%012d.jpg``
    or ``%012d.jpg``, else any file in the directory whose name ends in the id's digits."""

    def __init__(self, directory: Path, pattern: str | None = None):
        self.directory = directory
        self.pattern = pattern
        self._prefix: str | None = None
        self._by_number: dict[int, Path] | None = None

    def __call__(self, image_id: Any) -> Path:
        if self.pattern:
            try:
                return self.directory / self.pattern.format(image_id=image_id, id=image_id)
            except (KeyError, ValueError, IndexError) as err:
                raise Blip2Error(f"bad image_pattern {self.pattern!r}: {err}") from None
        number = int(image_id)
        if self._prefix is not None:
            return self.directory / f"{self._prefix}{number:012d}.jpg"
        for prefix in ("COCO_val2014_", "", "COCO_train2014_", "COCO_test2015_"):
            candidate = self.directory / f"{prefix}{number:012d}.jpg"
            if candidate.exists():
                self._prefix = prefix
                return candidate
        if self._by_number is None:
            self._by_number = {}
            for entry in os.scandir(self.directory):
                m = re.search(r"(\d+)\.(?:jpe?g|png)$", entry.name, re.IGNORECASE)
                if m:
                    self._by_number.setdefault(int(m.group(1)), Path(entry.path))
        found = self._by_number.get(number)
        if found is None:
            return self.directory / f"COCO_val2014_{number:012d}.jpg"  # reported as missing later
        return found


# ============================================================================ readers
def read_vqa(task: str, split: str, sources: Sources) -> EvalData:
    """VQAv2 / OK-VQA: official questions (+ annotations when available)."""
    qpath = sources.questions
    questions = _list_under(_read_json(qpath), "questions", qpath)
    find = ImageFinder(sources.images, sources.image_pattern)
    items = []
    for q in questions:
        qid = _require(q, "question_id", qpath, "question")
        items.append(EvalItem(key=str(qid), id=qid, image=find(_require(q, "image_id", qpath, "question")),
                              text=_require(q, "question", qpath, "question")))
    truth: dict[str, dict[str, Any]] = {}
    if sources.annotations is not None:
        apath = sources.annotations
        for a in _list_under(_read_json(apath), "annotations", apath):
            answers = _require(a, "answers", apath, "annotation")
            texts = [x["answer"] if isinstance(x, dict) else str(x) for x in answers]
            if any(not isinstance(t, str) for t in texts):
                raise Blip2Error(f"{apath}: answers must be strings or {{\"answer\": ...}} objects")
            truth[str(_require(a, "question_id", apath, "annotation"))] = {
                "answers": texts, "answer_type": a.get("answer_type"), "question_type": a.get("question_type"),
            }
        keys = {it.key for it in items}
        if truth and not keys & set(truth):
            raise Blip2Error(f"{apath}: no annotation matches a question of {qpath}")
    return EvalData(task=task, split=split, kind="vqa", items=items, vqa_truth=truth)


def read_gqa(split: str, sources: Sources) -> EvalData:
    """GQA questions JSON: ``{questionId: {"imageId", "question", "answer"}}`` (a list with ``questionId``
    fields is accepted too)."""
    qpath = sources.questions
    data = _read_json(qpath)
    if isinstance(data, list):
        data = {str(_require(q, "questionId", qpath, "question")): q for q in data}
    if not isinstance(data, dict):
        raise Blip2Error(f"{qpath}: expected a JSON object mapping question ids to questions")
    items, truth = [], {}
    for qid, q in data.items():
        image_id = _require(q, "imageId", qpath, "question")
        name = (sources.image_pattern or "{image_id}.jpg").format(image_id=image_id, id=image_id)
        items.append(EvalItem(key=str(qid), id=str(qid), image=sources.images / name,
                              text=_require(q, "question", qpath, "question")))
        if q.get("answer") is not None:
            truth[str(qid)] = str(q["answer"])
    return EvalData(task="gqa", split=split, kind="gqa", items=items, gqa_truth=truth)


def read_karpathy(task: str, split: str, sources: Sources) -> EvalData:
    """Karpathy ``dataset_coco.json`` / ``dataset_flickr30k.json``: the images of ``split`` with their raw
    captions (captioning references, and the retrieval gallery)."""
    apath = sources.annotations
    images = _list_under(_read_json(apath), "images", apath)
    spec = task_spec(task)
    items: list[EvalItem] = []
    captions: dict[str, list[str]] = {}
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    splits_seen = set()
    for record in images:
        record_split = _require(record, "split", apath, "image")
        splits_seen.add(record_split)
        if record_split != split:
            continue
        filename = _require(record, "filename", apath, "image")
        image_id = record.get("cocoid", record.get("imgid"))
        if image_id is None:
            raise Blip2Error(f"{apath}: image {filename} has neither 'cocoid' nor 'imgid'")
        path = sources.images / record["filepath"] / filename if record.get("filepath") else sources.images / filename
        if record.get("filepath") and not path.exists() and (sources.images / filename).exists():
            path = sources.images / filename
        sentences = _require(record, "sentences", apath, "image")
        raws = [s["raw"] if "raw" in s else " ".join(s.get("tokens", [])) for s in sentences]
        key = str(image_id)
        items.append(EvalItem(key=key, id=image_id, image=path))
        captions[key] = raws
        img2txt.append([])
        for raw in raws:
            img2txt[-1].append(len(texts))
            texts.append(raw)
            txt2img.append(len(items) - 1)
    if not items:
        raise Blip2Error(f"{apath}: no image in split {split!r} (splits present: {', '.join(sorted(splits_seen)) or 'none'})")
    if spec.kind == "caption":
        return EvalData(task=task, split=split, kind="caption", items=items, captions=captions)
    return EvalData(task=task, split=split, kind="retrieval", items=items, texts=texts, txt2img=txt2img, img2txt=img2txt)


def read_coco_captions(task: str, split: str, sources: Sources) -> EvalData:
    """COCO-format captions (NoCaps): ``images`` [{id, file_name, domain?}], ``annotations`` [{image_id, caption}]."""
    apath = sources.annotations
    data = _read_json(apath)
    images = _list_under(data, "images", apath)
    annotations = data.get("annotations") or []
    items, captions, domains = [], {}, {}
    for record in images:
        image_id = _require(record, "id", apath, "image")
        key = str(image_id)
        items.append(EvalItem(key=key, id=image_id, image=sources.images / _require(record, "file_name", apath, "image")))
        if record.get("domain"):
            domains[key] = record["domain"]
    for a in annotations:
        key = str(_require(a, "image_id", apath, "annotation"))
        captions.setdefault(key, []).append(_require(a, "caption", apath, "annotation"))
    return EvalData(task=task, split=split, kind="caption", items=items, captions=captions, domains=domains)
