"""Whose value is it: the BLIP-2 paper's and LAVIS's settings per kind of run, to mark a recipe's deviations.

``blip2 recipes show`` ends every key that the paper or LAVIS gives a value for with a mark such as
``# = paper; != LAVIS: [0.9, 0.999]``, and lists the deviating keys in its header. A value that matches
neither is ours. Sources (BLIP2_SPEC.md (b), (c), (e)): the paper's text, and LAVIS's configs
(``pretrain_stage1.yaml``, ``pretrain_stage2.yaml``, ``caption_coco_ft.yaml``, ``retrieval_coco_ft.yaml``)
with the code defaults they rely on (runner AdamW betas, ``get_optimizer_params``, processors). A key
missing from a table means that source states no value for it ("label smoothing: not mentioned" counts as
the paper-literal 0.0, as the spec says). Values a recipe cannot express (LAVIS's per-epoch cosine decay,
epochs instead of steps) are ``Stated`` texts, so the key is always marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from blip2cli.recipes import Recipe, _toml_value, recipe_to_toml, schema


@dataclass(frozen=True)
class Stated:
    """A source's setting that no recipe value equals (shown as its text)."""

    text: str


@dataclass(frozen=True)
class References:
    title: str  # what the recipe is compared with, for the header
    paper: Mapping[str, Any] = field(default_factory=dict)
    lavis: Mapping[str, Any] = field(default_factory=dict)


# LAVIS defaults every run shares: the runner's AdamW (torch betas), get_optimizer_params' decay rule, the
# linear-warmup cosine scheduler stepped per epoch, no clipping, fp16 AMP with a GradScaler, DDP.
_LAVIS_RUNNER = {
    "optim.betas": (0.9, 0.999), "optim.eps": 1e-8, "optim.weight_decay": 0.05, "optim.weight_decay_groups": "lavis",
    "optim.schedule": Stated("cosine per epoch"), "optim.grad_clip": 0.0, "train.precision": "fp16",
    "dist.strategy": "ddp",
}
_PAPER_OPTIM = {"optim.lr": 1e-4, "optim.betas": (0.9, 0.98), "optim.weight_decay": 0.05, "optim.warmup_steps": 2000,
                "optim.schedule": "cosine"}
_PAPER_DATA = {"data.rrc_scale": (0.5, 1.0), "data.hflip": True, "data.captions_top_k": 2}
_LAVIS_DATA = {"data.rrc_scale": (0.5, 1.0), "data.hflip": True, "data.max_txt_len": 32}
_PRETRAIN_MODEL = {"model.num_query_tokens": 32, "model.image_size": 224, "model.freeze_vision": True,
                   "model.vision_precision": "fp16"}

_STAGE1_PAPER = {
    **_PRETRAIN_MODEL, **_PAPER_OPTIM, **_PAPER_DATA, "model.qformer_init": "bert-base-uncased",
    "loss.itc": 1.0, "loss.itm": 1.0, "loss.itg": 1.0, "loss.itc_label_smoothing": 0.0, "loss.itg_label_smoothing": 0.0,
    "optim.min_lr": 1e-5, "train.max_steps": 250_000,
}
_STAGE1_LAVIS = {
    **_LAVIS_RUNNER, **_PRETRAIN_MODEL, **_LAVIS_DATA, "model.qformer_init": "bert-base-uncased",
    "loss.itc": 1.0, "loss.itm": 1.0, "loss.itg": 1.0, "loss.itc_label_smoothing": 0.1, "loss.itg_label_smoothing": 0.1,
    "loss.temp_init": 0.07, "loss.temp_clamp": None, "loss.gather_with_grad": False, "loss.itc_same_image_positives": False,
    "loss.itg_reuses_query_pass": True,
    "optim.lr": 1e-4, "optim.min_lr": 1e-5, "optim.warmup_steps": 5000, "optim.warmup_start_lr": 1e-6,
    "train.max_steps": Stated("10 epochs"),
}
_STAGE2_PAPER = {
    **_PRETRAIN_MODEL, **_PAPER_OPTIM, **_PAPER_DATA, "model.freeze_llm": True, "optim.min_lr": 5e-5,
    "train.max_steps": 80_000,
}
_STAGE2_LAVIS = {
    **_LAVIS_RUNNER, **_PRETRAIN_MODEL, **_LAVIS_DATA, "model.freeze_llm": True, "model.prompt": "",
    "optim.lr": 1e-4, "optim.min_lr": 1e-5, "optim.warmup_steps": 2000, "optim.warmup_start_lr": 1e-6,
    "data.global_batch_size": 1024, "data.micro_batch_size": 64, "train.max_steps": Stated("10 epochs"),
}
_FINETUNE_LAVIS = {
    **_LAVIS_RUNNER, **_LAVIS_DATA, "model.image_size": 364, "model.freeze_vision": False,
    "model.vision_precision": "fp32", "optim.lr": 1e-5, "optim.min_lr": 0.0, "optim.warmup_steps": 1000,
    "train.max_steps": Stated("5 epochs"),
}


def references_for(recipe: Recipe) -> References:
    """The paper's and LAVIS's values for the kind of run ``recipe`` describes."""
    m = recipe.model
    if m.task == "pretrain" and m.stage == 1:
        if m.vision == "clip-vit-l":  # LAVIS has no stage-1 ViT-L config (LAVIS#420): runner defaults only
            return References("stage-1 pretraining with ViT-L (the paper; LAVIS: no ViT-L config, runner defaults)",
                              {**_STAGE1_PAPER, "model.vision": "clip-vit-l", "data.global_batch_size": 2320},
                              {k: v for k, v in _STAGE1_LAVIS.items() if not k.startswith("data.")})
        return References("stage-1 pretraining with ViT-g (the paper; LAVIS pretrain_stage1.yaml)",
                          {**_STAGE1_PAPER, "model.vision": "eva-vit-g", "data.global_batch_size": 1680},
                          {**_STAGE1_LAVIS, "model.vision": "eva-vit-g", "data.global_batch_size": 1600,
                           "data.micro_batch_size": 100})
    if m.task == "pretrain":
        t5 = "t5" in (m.llm or "").lower()
        family = "FlanT5" if t5 else "OPT"
        precision = "bf16" if t5 else "fp16"
        return References(f"stage-2 pretraining with {family} (the paper; LAVIS pretrain_stage2.yaml)",
                          {**_STAGE2_PAPER, "data.global_batch_size": 1520 if t5 else 1920, "model.llm_precision": precision},
                          {**_STAGE2_LAVIS, "model.llm_precision": precision})
    if m.task == "caption":
        return References("COCO caption fine-tuning (LAVIS caption_coco_ft.yaml; the paper's values are not in the spec)",
                          {}, {**_FINETUNE_LAVIS, "model.prompt": "a photo of", "train.grad_checkpointing": True,
                               "data.micro_batch_size": 16, "eval.num_beams": 5, "eval.max_new_tokens": 30,
                               "eval.min_new_tokens": 8})
    if m.task == "retrieval":
        return References("COCO retrieval fine-tuning (LAVIS retrieval_coco_ft.yaml; the paper's values are not in the spec)",
                          {}, {**_FINETUNE_LAVIS, "data.micro_batch_size": 14, "eval.k_test": 128,
                               "loss.itc_label_smoothing": 0.1, "loss.itg_label_smoothing": 0.1,
                               "loss.gather_with_grad": False, "loss.itc_same_image_positives": True})
    return References("VQA fine-tuning (LAVIS ships no BLIP-2 VQA config: its runner defaults only)", {}, _LAVIS_RUNNER)


def _value(recipe: Recipe, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(recipe, section), name)


def _shown(value: Any) -> str:
    if isinstance(value, Stated):
        return value.text
    return "absent" if value is None else _toml_value(value)


def _same(value: Any, reference: Any) -> bool:
    if isinstance(reference, Stated):
        return False
    if isinstance(value, (list, tuple)) and isinstance(reference, (list, tuple)):
        return tuple(value) == tuple(reference)
    return value == reference


@dataclass
class Comparison:
    references: References
    marks: dict[str, str]  # dotted key -> "= paper; != LAVIS: [0.9, 0.999]"
    from_paper: list[str]  # keys whose value differs from the paper's
    from_lavis: list[str]  # keys whose value differs from LAVIS's


def compare(recipe: Recipe) -> Comparison:
    """Mark every key of ``recipe`` the paper or LAVIS states a value for."""
    refs = references_for(recipe)
    marks: dict[str, str] = {}
    from_paper: list[str] = []
    from_lavis: list[str] = []
    for key in schema():  # schema order: the order the keys are shown in
        parts = []
        for source, table, deviating in (("paper", refs.paper, from_paper), ("LAVIS", refs.lavis, from_lavis)):
            if key not in table:
                continue
            if _same(_value(recipe, key), table[key]):
                parts.append(f"= {source}")
            else:
                parts.append(f"!= {source}: {_shown(table[key])}")
                deviating.append(key)
        if parts:
            marks[key] = "; ".join(parts)
    return Comparison(refs, marks, from_paper, from_lavis)


def marked_toml(recipe: Recipe, header: str = "") -> str:
    """``recipe_to_toml`` with comments, every referenced key marked, and the deviations listed in the header."""
    result = compare(recipe)
    lines = [header] if header else []
    lines.append(f"marks compare with: {result.references.title}")
    if result.references.paper:
        lines.append("deviations from the paper: " + (", ".join(result.from_paper) or "none"))
    else:
        lines.append("deviations from the paper: not marked (no paper values for this kind of run in the spec)")
    lines.append("deviations from LAVIS: " + (", ".join(result.from_lavis) or "none"))
    lines.append("a value that matches neither is ours")
    return recipe_to_toml(recipe, header="\n".join(lines), comments=True, marks=result.marks)
