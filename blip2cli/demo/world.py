"""A synthetic image-text world: one coloured shape per picture on a textured background.

Every picture is fully described by five attributes: ``size`` (small, large), ``color`` (6), ``shape``
(4), ``position`` (left, right, top, bottom, middle) and ``background`` texture (plain, striped, dotted,
checkered). Pixels are jittered (exact place, shape size, background tint, texture phase), so no two
pictures are identical.

Held-out split: a fixed set of (colour, shape) pairs, e.g. "red circle", **never** appears in a training
picture or training text paired with an image; every colour and every shape alone does. Half of the test
pictures use those unseen pairs, half use seen pairs (new pictures). Test attribute tuples are unique, so
every test caption describes exactly one test picture and retrieval has a single right answer.

Written files (``write_world``)::

    images/train/NNNNNN.jpg, images/test/NNNNNNNNNNNN.jpg (the eval image_pattern {image_id:012d}.jpg)
    captions.csv          url (local path), caption: image-caption pairs for ``blip2 download pretrain custom``
    captions_photo.csv    the same captions behind the captioning prompt "a photo of " (stage 2)
    vqa_train.csv         url, caption: "question ... answer ..." texts about the training pictures (2 each)
    text_corpus.txt       text only, for the unimodal LM/BERT: captions, QA lines, and lines of two related
                          documents, a caption and then (after a tab, DOCUMENT_BREAK) a "a photo of"
                          paraphrase or a question it answers (so the LM learns to read its context)
    eval/coco|flickr30k|vqav2/manifest.json + annotation files in the official formats (held-out split)
    world.json            the attribute tuples of every picture and the held-out pairs
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 50, 185),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "middle")
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")
# Unseen in training: every colour and every shape still appears with other partners.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "circle"), ("green", "square"), ("blue", "triangle"),
    ("yellow", "cross"), ("purple", "circle"), ("orange", "square"),
)
RENDER_SIZE = 64  # pixels stored; the demo models look at them resized to 32
QA_PER_IMAGE = 2  # training QA texts per picture (of the 7 questions each picture has)

POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "middle": "in the middle"}
# Five phrasings; each names all five attributes, so a caption identifies its attribute tuple.
TEMPLATES = (
    "a {size} {color} {shape} {where} on a {bg} background",
    "there is a {size} {color} {shape} {where} of a {bg} picture",
    "a {bg} background with a {size} {color} {shape} {where}",
    "{where} a {size} {color} {shape} over a {bg} pattern",
    "a picture of a {color} {shape} that is {size} and {where} on a {bg} background",
)
# VQA: (question type, question, answer) generators; answer types are "yes/no" or "other".
VQA_PROMPT_TEMPLATE = "question {} answer"  # the stage-2 / eval prompt (survives caption normalisation)
# Stage 2 trains captions behind BLIP-2's captioning prompt (LAVIS prepends it to COCO captions), so that
# captioning (`blip2 eval coco`'s default prompt) and question answering ("question ...") are told apart.
CAPTION_PROMPT = "a photo of "
# Joins the documents of one text-corpus line. The LM pre-trains on such lines packed as LLM pre-training
# packs documents ("</s> caption \\n </s> question ... answer ... \\n"), so it learns to use what came
# before its "</s>": in stage 2 the visual prompts stand exactly there, in front of "</s> question ...".
DOCUMENT_BREAK = "\t"


@dataclass(frozen=True)
class Scene:
    size: str
    color: str
    shape: str
    position: str
    background: str

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)


def all_scenes() -> list[Scene]:
    return [Scene(*t) for t in itertools.product(SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS)]


def caption(scene: Scene, template: int) -> str:
    return TEMPLATES[template].format(size=scene.size, color=scene.color, shape=scene.shape,
                                      where=POSITION_PHRASES[scene.position], bg=scene.background)


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(question_type, answer_type, question, answer) about ``scene``; yes/no answers balanced by ``rng``."""
    other_color = rng.choice([c for c in COLORS if c != scene.color])
    asked_color = scene.color if rng.random() < 0.5 else other_color
    other_shape = rng.choice([s for s in SHAPES if s != scene.shape])
    asked_shape = scene.shape if rng.random() < 0.5 else other_shape
    return [
        ("what color is the", "other", "what color is the shape?", scene.color),
        ("what shape is", "other", "what shape is shown?", scene.shape),
        ("is the shape", "other", "is the shape large or small?", scene.size),
        ("where is the", "other", "where is the shape?", scene.position),
        ("what is the", "other", "what is the background?", scene.background),
        ("is there a", "yes/no", f"is there a {asked_color} shape?", "yes" if asked_color == scene.color else "no"),
        ("is the shape a", "yes/no", f"is the shape a {asked_shape}?", "yes" if asked_shape == scene.shape else "no"),
    ]


def qa_text(question: str, answer: str) -> str:
    return VQA_PROMPT_TEMPLATE.format(question) + " " + answer


# ----------------------------------------------------------------- rendering
def _tint(rng: random.Random) -> tuple[int, int, int]:
    base = rng.randint(150, 215)
    return tuple(max(0, min(255, base + rng.randint(-18, 18))) for _ in range(3))  # type: ignore[return-value]


def render(scene: Scene, rng: random.Random, size: int = RENDER_SIZE) -> Image.Image:
    """A ``size`` x ``size`` RGB picture of ``scene`` with random jitter from ``rng``."""
    bg = _tint(rng)
    ink = tuple(max(0, c - rng.randint(35, 55)) for c in bg)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    period, phase = max(4, size // 8), rng.randint(0, 7)
    if scene.background == "striped":
        for x in range(-size, 2 * size, period):
            d.line([(x + phase, 0), (x + phase + size // 2, size)], fill=ink, width=max(1, size // 32))
    elif scene.background == "dotted":
        r = max(1, size // 28)
        for y in range(phase % period, size, period):
            for x in range(phase % period, size, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif scene.background == "checkered":
        cell = period
        for y in range(0, size, cell):
            for x in range(0, size, cell):
                if ((x + y) // cell) % 2:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=ink)
    radius = (0.11 if scene.size == "small" else 0.22) * size * rng.uniform(0.9, 1.1)
    anchors = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
               "middle": (0.5, 0.5)}
    ax, ay = anchors[scene.position]
    jitter = 0.05 * size
    cx, cy = ax * size + rng.uniform(-jitter, jitter), ay * size + rng.uniform(-jitter, jitter)
    color = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[scene.color])
    r = radius
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif scene.shape == "square":
        s = r * 0.88
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif scene.shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    else:  # cross
        w = r * 0.38
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    return img


# ----------------------------------------------------------------- splits
@dataclass
class WorldSizes:
    train_images: int
    test_images: int
    text_lines: int


SIZES_BY_NAME = {
    "full": WorldSizes(train_images=3000, test_images=100, text_lines=12000),
    "small": WorldSizes(train_images=1200, test_images=60, text_lines=6000),
}


def split_scenes(n_train: int, n_test: int, seed: int) -> tuple[list[Scene], list[Scene]]:
    """Training scenes (seen pairs only, with repeats) and unique test scenes (half unseen pairs)."""
    rng = random.Random(seed)
    scenes = all_scenes()
    held = set(HELD_OUT_PAIRS)
    seen = [s for s in scenes if s.pair not in held]
    unseen = [s for s in scenes if s.pair in held]
    n_unseen = n_test // 2
    test = rng.sample(unseen, n_unseen) + rng.sample(seen, n_test - n_unseen)
    rng.shuffle(test)
    train = [rng.choice(seen) for _ in range(n_train)]
    return train, test


@dataclass
class World:
    root: Path
    captions_csv: Path
    vqa_csv: Path
    text_corpus: Path
    eval_dirs: dict[str, Path]  # task -> data dir with manifest.json
    train: list[Scene]
    test: list[Scene]
    train_answers: Counter  # answer -> count over training QA pairs (majority baseline)
    train_answers_by_type: dict[str, Counter]  # question type -> answer counts
    captions_photo_csv: Path | None = None

    def baselines(self) -> dict[str, float]:
        """Chance / majority baselines on the test split, in percent (computed, not assumed)."""
        qa = [q for i, s in enumerate(self.test) for q in questions(s, random.Random(1000 + i))]
        majority = self.train_answers.most_common(1)[0][0]
        by_type = {t: c.most_common(1)[0][0] for t, c in self.train_answers_by_type.items()}
        return {
            "retrieval_chance_r1": 100.0 / len(self.test),
            "vqa_majority": 100.0 * sum(a == majority for _, _, _, a in qa) / len(qa),
            "vqa_type_majority": 100.0 * sum(a == by_type[t] for t, _, _, a in qa) / len(qa),
        }


def write_world(root: Path, size: str = "full", seed: int = 0) -> World:
    """Generate and write the world (see the module docstring) under ``root``."""
    sizes = SIZES_BY_NAME[size]
    root = Path(root)
    train, test = split_scenes(sizes.train_images, sizes.test_images, seed)
    img_train, img_test = root / "images" / "train", root / "images" / "test"
    img_train.mkdir(parents=True, exist_ok=True)
    img_test.mkdir(parents=True, exist_ok=True)

    answers: Counter = Counter()
    by_type: dict[str, Counter] = {}
    captions_csv, vqa_csv = root / "captions.csv", root / "vqa_train.csv"
    photo_csv = root / "captions_photo.csv"
    with captions_csv.open("w", newline="") as fc, vqa_csv.open("w", newline="") as fq, \
            photo_csv.open("w", newline="") as fp:
        wc, wq, wp = csv.writer(fc), csv.writer(fq), csv.writer(fp)
        for w in (wc, wq, wp):
            w.writerow(["url", "caption"])
        for i, scene in enumerate(train):
            rng = random.Random(seed * 1_000_003 + i)
            path = img_train / f"{i:06d}.jpg"
            render(scene, rng).save(path, quality=95)
            text = caption(scene, rng.randrange(len(TEMPLATES)))
            wc.writerow([str(path), text])
            wp.writerow([str(path), CAPTION_PROMPT + text])
            qa = questions(scene, rng)
            for qtype, _, q, a in qa:
                answers[a] += 1
                by_type.setdefault(qtype, Counter())[a] += 1
            for qtype, _, q, a in rng.sample(qa, QA_PER_IMAGE):
                wq.writerow([str(path), qa_text(q, a)])

    test_records = []
    for i, scene in enumerate(test):
        image_id = i + 1
        render(scene, random.Random(seed * 7_000_003 + i)).save(img_test / f"{image_id:012d}.jpg", quality=95)
        test_records.append((image_id, scene))

    eval_dirs = _write_eval(root, test_records, img_test)
    text_corpus = root / "text_corpus.txt"
    _write_text_corpus(text_corpus, sizes.text_lines, seed)
    (root / "world.json").write_text(json.dumps({
        "seed": seed, "size": size, "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "train": [asdict(s) for s in train], "test": [asdict(s) for s in test],
        "vqa_prompt_template": VQA_PROMPT_TEMPLATE,
    }))
    return World(root, captions_csv, vqa_csv, text_corpus, eval_dirs, train, test, answers, by_type, photo_csv)


def _write_eval(root: Path, records: list[tuple[int, Scene]], img_test: Path) -> dict[str, Path]:
    karpathy = {"images": [
        {"filepath": "", "filename": f"{image_id:012d}.jpg", "split": "test", "imgid": image_id,
         "cocoid": image_id, "sentids": [image_id * 10 + k for k in range(len(TEMPLATES))],
         "sentences": [{"raw": caption(scene, k), "tokens": caption(scene, k).split(),
                        "imgid": image_id, "sentid": image_id * 10 + k} for k in range(len(TEMPLATES))]}
        for image_id, scene in records
    ], "dataset": "shapes"}
    vqa_q, vqa_a = [], []
    for image_id, scene in records:
        for k, (qtype, atype, q, a) in enumerate(questions(scene, random.Random(1000 + image_id - 1))):
            qid = image_id * 100 + k
            vqa_q.append({"image_id": image_id, "question": q, "question_id": qid})
            vqa_a.append({"question_id": qid, "image_id": image_id, "answer_type": atype, "question_type": qtype,
                          "multiple_choice_answer": a,
                          "answers": [{"answer": a, "answer_id": j + 1, "answer_confidence": "yes"} for j in range(10)]})
    images_rel = str(Path("..", "..", img_test.relative_to(root)))
    out = {}
    for task, files in {
        "coco": {"questions": "karpathy_test.json", "annotations": "karpathy_test.json"},
        "flickr30k": {"questions": "karpathy_test.json", "annotations": "karpathy_test.json"},
        "vqav2": {"questions": "questions_test.json", "annotations": "annotations_test.json"},
    }.items():
        d = root / "eval" / task
        d.mkdir(parents=True, exist_ok=True)
        if task == "vqav2":
            (d / files["questions"]).write_text(json.dumps({"questions": vqa_q, "task_type": "Open-Ended",
                                                            "data_type": "shapes", "data_subtype": "test"}))
            (d / files["annotations"]).write_text(json.dumps({"annotations": vqa_a, "data_type": "shapes",
                                                              "data_subtype": "test"}))
        else:
            (d / files["annotations"]).write_text(json.dumps(karpathy))
        split = {**files, "images": images_rel, "image_pattern": "{image_id:012d}.jpg"}
        (d / "manifest.json").write_text(json.dumps({"task": task, "splits": {"test": split}}, indent=1))
        out[task] = d
    return out


def _write_text_corpus(path: Path, n_lines: int, seed: int) -> None:
    """Text-only data for the unimodal LM and BERT, about random scenes of *all* attribute tuples (language
    knows every phrase; only the image-text pairs hold pairs out). A quarter each: a caption, a QA line,
    a caption and then a "a photo of" paraphrase of it, a caption and then a question it answers (two
    documents joined by ``DOCUMENT_BREAK``)."""
    rng = random.Random(seed + 99)
    scenes = all_scenes()
    lines = []
    for _ in range(n_lines):
        scene = rng.choice(scenes)
        cap = caption(scene, rng.randrange(len(TEMPLATES)))
        _, _, q, a = rng.choice(questions(scene, rng))
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(cap)
        elif kind == 1:
            lines.append(qa_text(q, a))
        elif kind == 2:
            lines.append(cap + DOCUMENT_BREAK + CAPTION_PROMPT + caption(scene, rng.randrange(len(TEMPLATES))))
        else:
            lines.append(cap + DOCUMENT_BREAK + qa_text(q, a))
    path.write_text("\n".join(lines) + "\n")
