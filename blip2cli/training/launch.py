"""From command-line choices to a resolved recipe, run directory and shard list (what ``pretrain`` and
``finetune`` do before ``train``), including the workspace chaining between the stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blip2cli.data.workspace import capfilt_dir, runs_dir, workspace_root
from blip2cli.errors import Blip2Error
from blip2cli.models.llm import LLM_PRESETS
from blip2cli.recipes import Recipe, load_recipe

STAGE1_RECIPES = {"eva-vit-g": "pretrain_stage1_vitg", "clip-vit-l": "pretrain_stage1_vitl"}
STAGE2_RECIPES = {
    "opt-2.7b": "pretrain_stage2_opt2.7b",
    "opt-6.7b": "pretrain_stage2_opt6.7b",
    "flant5-xl": "pretrain_stage2_flant5xl",
    "flant5-xxl": "pretrain_stage2_flant5xxl",
}
FINETUNE_RECIPES = {
    "caption": "finetune_caption_coco",
    "vqa": "finetune_vqa_vqav2",
    "retrieval": "finetune_retrieval_coco",
}


@dataclass
class LaunchPlan:
    recipe: Recipe
    recipe_name: str
    run_dir: Path
    shards: list[str]  # as given: paths, brace patterns, directories, URLs
    notes: list[str]
    shard_files: int = 0  # the shards those expand to


def default_recipe_name(stage: int, vision: str | None, llm: str | None) -> str:
    if stage == 1:
        return STAGE1_RECIPES.get(vision or "eva-vit-g", "pretrain_stage1_vitg")
    if llm and llm not in LLM_PRESETS:
        # Any other LLM: OPT's paper settings (decoder-only) or FlanT5's (encoder-decoder, by name).
        return "pretrain_stage2_flant5xl" if "t5" in llm.lower() else "pretrain_stage2_opt2.7b"
    return STAGE2_RECIPES.get(llm or "opt-2.7b", "pretrain_stage2_opt2.7b")


def plan_pretrain(
    stage: int | None,
    recipe: str | None,
    overrides: list[str],
    vision: str | None = None,
    llm: str | None = None,
    init_from: str | None = None,
    out: Path | None = None,
    root: str | Path | None = None,
) -> LaunchPlan:
    """``stage`` may be None when ``recipe`` is given: the recipe's ``model.stage`` is the stage then."""
    notes: list[str] = []
    if stage is None and recipe is None:
        raise Blip2Error("give --stage 1 or --stage 2, or --recipe NAME_OR_FILE (whose model.stage is the stage)")
    name = recipe or default_recipe_name(stage, vision, llm)
    flag_overrides = []
    if vision:
        flag_overrides.append(f"model.vision={vision}")
    if llm:
        flag_overrides.append(f"model.llm={llm}")
    if init_from:
        flag_overrides.append(f"model.init_from={init_from}")
    resolved = load_recipe(name, flag_overrides + list(overrides))
    if stage is not None and stage != resolved.model.stage:
        raise Blip2Error(f"--stage {stage}, but recipe {name} trains stage {resolved.model.stage}; drop --stage "
                         f"(the recipe sets it) or pick a stage-{stage} recipe")
    if resolved.model.stage == 2 and not resolved.model.init_from:
        latest = latest_final_checkpoint(1, root)
        if latest is not None:
            resolved.model.init_from = str(latest)
            notes.append(f"stage 2 starts from the latest stage-1 checkpoint in the workspace: {latest}")
        else:
            notes.append("no stage-1 checkpoint given or found: stage 2 starts from a fresh Q-Former "
                         "(the paper's no-stage-1 ablation)")
    return _finish(resolved, name, out, root, notes)


def plan_finetune(task: str, recipe: str | None, overrides: list[str], init_from: str | None,
                  out: Path | None = None, root: str | Path | None = None) -> LaunchPlan:
    if task not in FINETUNE_RECIPES:
        raise Blip2Error(f"unknown fine-tuning task {task!r}; use one of {', '.join(FINETUNE_RECIPES)}")
    name = recipe or FINETUNE_RECIPES[task]
    extra = [f"model.init_from={init_from}"] if init_from else []
    resolved = load_recipe(name, extra + list(overrides))
    if not resolved.model.init_from:
        raise Blip2Error("fine-tuning needs --init-from CHECKPOINT (or model.init_from in the recipe)")
    return _finish(resolved, name, out, root, [])


def training_device(device: str) -> str:
    """``--device`` for training: each process takes its local rank's GPU (``init_distributed``), so a GPU
    other than the first is chosen with CUDA_VISIBLE_DEVICES; ``cuda:N`` with N > 0 says so in one line."""
    kind, _, index = device.partition(":")
    if kind == "cuda" and index not in ("", "0"):
        raise Blip2Error(f"--device {device}: training uses each process's own GPU; to train on GPU {index}, "
                         f"run CUDA_VISIBLE_DEVICES={index} blip2 ... --device cuda")
    return device


def run_name(recipe: str) -> str:
    """A run directory's name: the recipe's, whole (``pretrain_stage2_opt2.7b``); a file's without ``.toml``."""
    name = Path(recipe).name
    return name[: -len(".toml")] if name.endswith(".toml") else name


def _finish(recipe: Recipe, name: str, out: Path | None, root: str | Path | None, notes: list[str]) -> LaunchPlan:
    recipe_name = run_name(name)
    run_dir = Path(out) if out else Path(recipe.train.out_dir) if recipe.train.out_dir else runs_dir(recipe_name, root)
    shards = list(recipe.data.shards) or workspace_shards(root)
    if not shards:
        raise Blip2Error(
            f"no training shards: set data.shards=... or download data into the workspace "
            f"({workspace_root(root)}) with `blip2 download pretrain`"
        )
    from blip2cli.data.training import expand_shards
    from blip2cli.hub import recipe_targets, require_all

    # Expanding now turns a missing shard into a one-line error before any model is built; so does a part
    # that is neither on a reachable hub nor in the cache.
    shard_files = sum(len(expand_shards(spec)) for spec in shards)
    require_all(recipe_targets(recipe))
    return LaunchPlan(recipe, recipe_name, run_dir, shards, notes, shard_files)


def workspace_shards(root: str | None = None) -> list[str]:
    """CapFilt shards where they exist (they carry the better captions), else the downloaded ones."""
    base = workspace_root(root)
    found: list[str] = []
    for folder in ("capfilt", "pretrain"):
        directory = base / folder
        if directory.is_dir():
            for dataset in sorted(p for p in directory.iterdir() if p.is_dir()):
                if folder == "pretrain" and capfilt_dir(dataset.name, root).is_dir():
                    continue
                found += [str(p) for p in sorted(dataset.glob("*.tar"))]
    return found


def latest_final_checkpoint(stage: int, root: str | None = None) -> Path | None:
    """The newest ``runs/*/final`` checkpoint of the given stage in the workspace."""
    import json

    from blip2cli.models.config import CONFIG_FILENAME

    candidates = []
    for final in runs_dir(None, root).glob("*/final"):
        config_file = final / CONFIG_FILENAME
        if config_file.exists():
            try:
                if json.loads(config_file.read_text()).get("stage") == stage:
                    candidates.append(final)
            except (OSError, ValueError):
                continue
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
