"""The evaluation tasks, their default checkpoints and protocol settings, and the paper's numbers.

Everything a user could ask "which model / which prompt / which number?" about lives in the tables here
(spec sections (g) and (h)).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip2cli.errors import Blip2Error


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "vqa" | "gqa" | "caption" | "retrieval"
    default_split: str
    default_model: str  # the released checkpoint the paper reports for this task
    description: str


# Hub ids of the released checkpoints (transformers format). Zero-shot VQA: the best model of Table 2.
# Captioning: the COCO-finetuned captioners (COCO: OPT-2.7B has the best CIDEr; NoCaps: FlanT5-XL, the
# 121.6 of Table 1). Retrieval: the COCO-finetuned stage-1 model, also used zero-shot on Flickr30k.
TASKS: dict[str, TaskSpec] = {
    "vqav2": TaskSpec("vqav2", "vqa", "val", "Salesforce/blip2-flan-t5-xxl", "VQAv2 zero-shot VQA accuracy"),
    "okvqa": TaskSpec("okvqa", "vqa", "val", "Salesforce/blip2-flan-t5-xxl", "OK-VQA (val2014 = paper's test)"),
    "gqa": TaskSpec("gqa", "gqa", "testdev", "Salesforce/blip2-flan-t5-xxl", "GQA test-dev balanced, exact match"),
    "coco": TaskSpec("coco", "caption", "test", "Salesforce/blip2-opt-2.7b-coco", "COCO Karpathy test captioning"),
    "nocaps": TaskSpec("nocaps", "caption", "val", "Salesforce/blip2-flan-t5-xl-coco", "NoCaps val captioning"),
    "flickr30k": TaskSpec("flickr30k", "retrieval", "test", "Salesforce/blip2-itm-vit-g-coco",
                          "Flickr30k 1k test retrieval (zero-shot from COCO)"),
    "coco_retrieval": TaskSpec("coco_retrieval", "retrieval", "test", "Salesforce/blip2-itm-vit-g-coco",
                               "COCO 5k Karpathy test retrieval"),
}
METRICS_JSON = "metrics.json"  # what marks a `blip2 eval` output directory (written by runner.py)

_ALIASES = {"coco-retrieval": "coco_retrieval", "coco_caption": "coco", "coco-caption": "coco", "ok-vqa": "okvqa",
            "vqa": "vqav2", "flickr": "flickr30k"}


def model_folder_name(model_id: str) -> str:
    """The model part of ``blip2 eval``'s default output folder (``TASK-MODEL``): a checkpoint directory's
    name, with its run's for ``RUN/final`` and ``RUN/step-N`` (``stage2-final``); a hub id's last part."""
    path = Path(str(model_id).rstrip("/"))
    if path.name == "final" or path.name.startswith("step-"):
        return f"{path.parent.name}-{path.name}"
    return path.name or "model"


def model_label(model_id: str) -> str:
    """A model as a report shows it: the run's name for ``RUN/final`` (``stage2``), ``RUN/step-N`` for a
    step checkpoint, a hub id's or directory's last part otherwise."""
    path = Path(str(model_id).rstrip("/"))
    if path.name == "final":
        return path.parent.name or "final"
    if path.name.startswith("step-"):
        return f"{path.parent.name}/{path.name}"
    return path.name


def task_spec(name: str) -> TaskSpec:
    """The task for ``name`` (aliases such as ``coco-retrieval`` accepted), or a one-line error."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise Blip2Error(f"unknown task {name!r}; choose one of {', '.join(TASKS)} (or 'report')")
    return TASKS[key]


# ============================================================================ protocol settings
VQA_PROMPT_ENCODER_DECODER = "Question: {} Short answer:"  # FlanT5 (paper and LAVIS configs); OPT in LAVIS's configs
VQA_PROMPT_DECODER_ONLY = "Question: {} Answer:"  # the paper's OPT prompt
CAPTION_PROMPT = "a photo of"

# Whose generation settings: "paper" (the paper's text: OPT answers "Question: {} Answer:", length penalty -1
# with beam 5 for every LLM) or "lavis" (LAVIS's zero-shot VQA configs and model defaults: "Question: {} Short
# answer:" for every LLM, length penalty 0 for OPT and -1 for FlanT5). Captioning and retrieval are the same
# in both (LAVIS's release-time caption defaults, which the paper's numbers used).
PROTOCOLS = ("paper", "lavis")
# GQA exact match: "current" normalises the prediction and the ground truth (LAVIS today, so "t-shirt"
# matches "t-shirt"); "release" normalises the prediction only (LAVIS at release, when the paper's numbers
# were computed).
GQA_SCORINGS = ("current", "release")


@dataclass
class EvalSettings:
    """How predictions are produced; recorded with every result and part of a run's resume fingerprint."""

    prompt: str = ""  # VQA: template with one "{}"; captioning: the text the caption continues
    num_beams: int = 5
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    lemmatize: bool = False  # OK-VQA: spaCy lemmatisation of predicted nouns and verbs
    protocol: str = "paper"  # whose generation defaults these are (PROTOCOLS)
    gqa_scoring: str = "current"  # GQA: which side(s) of the exact match are normalised (GQA_SCORINGS)
    k_test: int = 128  # retrieval: ITC candidates re-ranked by ITM
    text_max_length: int = 35  # retrieval: Q-Former text length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def default_settings(task: str, is_encoder_decoder: bool = False, protocol: str = "paper") -> EvalSettings:
    """The ``protocol``'s settings for ``task`` and the LLM family (spec (g), ``PROTOCOLS``).

    VQA: beam 5, 1-10 new tokens; "paper": the prompt per family and length penalty -1; "lavis":
    "Question: {} Short answer:" and length penalty -1 for FlanT5, 0 for OPT. OK-VQA lemmatises answers.
    Captioning: prompt "a photo of", beam 5, 8-30 new tokens, length and repetition penalty 1.0.
    Retrieval: k_test 128, texts of 35 tokens.
    """
    if protocol not in PROTOCOLS:
        raise Blip2Error(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    spec = task_spec(task)
    if spec.kind in ("vqa", "gqa"):
        if protocol == "paper":
            prompt = VQA_PROMPT_ENCODER_DECODER if is_encoder_decoder else VQA_PROMPT_DECODER_ONLY
            length_penalty = -1.0
        else:
            prompt = VQA_PROMPT_ENCODER_DECODER
            length_penalty = -1.0 if is_encoder_decoder else 0.0
        return EvalSettings(prompt=prompt, num_beams=5, max_new_tokens=10, min_new_tokens=1,
                            length_penalty=length_penalty, lemmatize=spec.name == "okvqa", protocol=protocol)
    if spec.kind == "caption":
        return EvalSettings(prompt=CAPTION_PROMPT, num_beams=5, max_new_tokens=30, min_new_tokens=8, protocol=protocol)
    return EvalSettings(prompt="", num_beams=0, max_new_tokens=0, min_new_tokens=0, protocol=protocol)


def check_gqa_scoring(scoring: str) -> str:
    """``scoring`` if it is one of ``GQA_SCORINGS``, else a one-line error."""
    if scoring not in GQA_SCORINGS:
        raise Blip2Error(f"unknown GQA scoring {scoring!r}; choose one of {', '.join(GQA_SCORINGS)}")
    return scoring


def generation_kind(task: str) -> str | None:
    """"vqa" or "caption": which of a checkpoint's stored usage applies to ``task`` (None for retrieval)."""
    kind = task_spec(task).kind
    return "caption" if kind == "caption" else "vqa" if kind in ("vqa", "gqa") else None


def resolve_settings(
    task: str, config: Any = None, is_encoder_decoder: bool = False, overrides: dict[str, Any] | None = None,
    protocol: str = "paper",
) -> tuple[EvalSettings, list[str]]:
    """The settings ``task`` runs with: the ``protocol``'s defaults, then what the checkpoint was trained with
    (``config.stored_generation``: its prompt and generation settings), then ``overrides`` (command-line
    flags; None = not given). Returns one line per flag that replaces a value the checkpoint stored."""
    settings = default_settings(task, is_encoder_decoder, protocol)
    kind = generation_kind(task)
    stored = config.stored_generation(kind) if (config is not None and kind) else {}
    for key, value in stored.items():
        if hasattr(settings, key):
            setattr(settings, key, value)
    notes = []
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in stored and stored[key] != value:
            notes.append(f"{FLAG_NAMES.get(key, key)} {value!r} replaces the checkpoint's {stored[key]!r}")
        setattr(settings, key, value)
    return settings, notes


# Command-line flags of the settings, for messages.
FLAG_NAMES = {"prompt": "--prompt", "num_beams": "--num-beams", "max_new_tokens": "--max-new-tokens",
              "min_new_tokens": "--min-new-tokens", "length_penalty": "--length-penalty",
              "repetition_penalty": "--repetition-penalty"}


# ============================================================================ the paper's numbers
# Rows of the paper's tables (spec (h)); keys are the metric names of metrics.json.
PAPER_MODELS = {
    "vitl-opt2.7b": "ViT-L + OPT-2.7B",
    "vitg-opt2.7b": "ViT-g + OPT-2.7B",
    "vitg-opt6.7b": "ViT-g + OPT-6.7B",
    "vitl-flant5xl": "ViT-L + FlanT5-XL",
    "vitg-flant5xl": "ViT-g + FlanT5-XL",
    "vitg-flant5xxl": "ViT-g + FlanT5-XXL",
    "vitl-qformer": "ViT-L (stage 1, COCO-finetuned)",
    "vitg-qformer": "ViT-g (stage 1, COCO-finetuned)",
}
PAPER_NUMBERS: dict[str, dict[str, dict[str, float]]] = {
    # Table 2, zero-shot VQA (VQAv2 val; OK-VQA test; GQA test-dev).
    "vqav2": {
        "vitl-opt2.7b": {"accuracy": 50.1}, "vitg-opt2.7b": {"accuracy": 53.5}, "vitg-opt6.7b": {"accuracy": 54.3},
        "vitl-flant5xl": {"accuracy": 62.6}, "vitg-flant5xl": {"accuracy": 63.1}, "vitg-flant5xxl": {"accuracy": 65.2},
    },
    "okvqa": {
        "vitl-opt2.7b": {"accuracy": 30.2}, "vitg-opt2.7b": {"accuracy": 31.7}, "vitg-opt6.7b": {"accuracy": 36.4},
        "vitl-flant5xl": {"accuracy": 39.4}, "vitg-flant5xl": {"accuracy": 40.7}, "vitg-flant5xxl": {"accuracy": 45.9},
    },
    "gqa": {
        "vitl-opt2.7b": {"accuracy": 33.9}, "vitg-opt2.7b": {"accuracy": 34.6}, "vitg-opt6.7b": {"accuracy": 36.4},
        "vitl-flant5xl": {"accuracy": 44.4}, "vitg-flant5xl": {"accuracy": 44.2}, "vitg-flant5xxl": {"accuracy": 44.7},
    },
    # COCO-finetuned captioners: COCO Karpathy test, NoCaps val overall.
    "coco": {
        "vitg-opt2.7b": {"BLEU-4": 43.7, "CIDEr": 145.8},
        "vitg-opt6.7b": {"BLEU-4": 43.5, "CIDEr": 145.2},
        "vitg-flant5xl": {"BLEU-4": 42.4, "CIDEr": 144.5},
    },
    "nocaps": {
        "vitg-opt2.7b": {"CIDEr": 119.7, "SPICE": 15.4},
        "vitg-opt6.7b": {"CIDEr": 121.0, "SPICE": 15.3},
        "vitg-flant5xl": {"CIDEr": 121.6, "SPICE": 15.8},
    },
    # Retrieval: stage-1 model finetuned on COCO; Flickr30k zero-shot.
    "flickr30k": {
        "vitl-qformer": {"txt_r1": 96.9, "txt_r5": 100.0, "txt_r10": 100.0, "img_r1": 88.6, "img_r5": 97.6, "img_r10": 98.9},
        "vitg-qformer": {"txt_r1": 97.6, "txt_r5": 100.0, "txt_r10": 100.0, "img_r1": 89.7, "img_r5": 98.1, "img_r10": 98.9},
    },
    "coco_retrieval": {
        "vitl-qformer": {"txt_r1": 83.5, "txt_r5": 96.0, "txt_r10": 98.0, "img_r1": 66.3, "img_r5": 86.5, "img_r10": 91.8},
        "vitg-qformer": {"txt_r1": 85.4, "txt_r5": 97.0, "txt_r10": 98.5, "img_r1": 68.3, "img_r5": 87.7, "img_r10": 92.6},
    },
}
# The metrics a report shows per task kind, in order.
HEADLINE_METRICS = {
    "vqa": ["accuracy"],
    "gqa": ["accuracy"],
    "caption": ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"],
    "retrieval": ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"],
}
# Released hub checkpoints -> paper rows.
HUB_TO_PAPER_MODEL = {
    "blip2-opt-2.7b": "vitg-opt2.7b", "blip2-opt-2.7b-coco": "vitg-opt2.7b",
    "blip2-opt-6.7b": "vitg-opt6.7b", "blip2-opt-6.7b-coco": "vitg-opt6.7b",
    "blip2-flan-t5-xl": "vitg-flant5xl", "blip2-flan-t5-xl-coco": "vitg-flant5xl",
    "blip2-flan-t5-xxl": "vitg-flant5xxl",
    "blip2-itm-vit-g": "vitg-qformer", "blip2-itm-vit-g-coco": "vitg-qformer",
}


def paper_model_key(model: str | None) -> str | None:
    """The paper row a model name or path corresponds to (released checkpoints only)."""
    if not model:
        return None
    name = str(model).rstrip("/").split("/")[-1].lower()
    return HUB_TO_PAPER_MODEL.get(name)


def paper_numbers(task: str, model: str | None) -> dict[str, float]:
    """The paper's numbers for ``task`` and ``model`` (empty when the model is not one of the paper's)."""
    key = paper_model_key(model)
    return dict(PAPER_NUMBERS.get(task_spec(task).name, {}).get(key or "", {}))
