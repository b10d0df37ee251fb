"""AdamW parameter groups and the step-based learning-rate schedule of the BLIP-2 paper."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from blip2cli.errors import CheckpointError
from blip2cli.recipes import OptimSection, Recipe

# What the learning-rate curve is a function of: changing one of these mid-run bends the curve.
SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "warmup_start_lr", "schedule")


def parameter_groups(model: nn.Module, weight_decay: float, rule: str = "ours") -> list[dict]:
    """AdamW groups: ``[decayed, not decayed]`` (``optim.weight_decay_groups``).

    ``"lavis"``: LAVIS ``get_optimizer_params`` (``blip2.py``): ``len(shape) == 1`` or a name ending in
    ``.bias`` -> no decay, everything else decays, so the 0-dim temperature and the (1, NQ, D) query tokens
    are decayed by accident of their shapes. ``"ours"``: never decay biases, norms or other 0-/1-D tensors,
    nor the query tokens (embeddings, which BERT-style training does not decay) and the temperature (a
    scalar hyper-parameter). The paper states only the rate (0.05).
    """
    if rule not in ("ours", "lavis"):
        raise ValueError(f"weight-decay rule must be 'ours' or 'lavis', got {rule!r}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if rule == "lavis":
            exempt = param.ndim == 1 or name.endswith(".bias")
        else:
            exempt = param.ndim <= 1 or name.endswith((".bias", "query_tokens", "temp"))
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    groups = parameter_groups(model, optim.weight_decay, optim.weight_decay_groups)
    # lr is set by the schedule before every step; the value here only seeds the groups.
    # Fused (one kernel for every parameter's update) when everything is on a GPU: the same update rule.
    # (FSDP's sharded DTensor parameters keep the default implementation.)
    params = [p for g in groups for p in g["params"]]
    fused = (bool(params) and all(p.is_cuda and not hasattr(p, "full_tensor") for p in params)) or None
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused)


def learning_rate(step: int, max_steps: int, optim: OptimSection) -> float:
    """Linear warmup from ``warmup_start_lr`` to ``lr`` over ``warmup_steps``, then decay to ``min_lr``
    at ``max_steps``, per optimizer step (LAVIS decays per epoch; the paper per step)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.warmup_start_lr + (optim.lr - optim.warmup_start_lr) * step / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    if optim.schedule == "linear":
        return optim.lr + (optim.min_lr - optim.lr) * progress
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_of(recipe: Recipe) -> dict[str, object]:
    """The recipe values the learning-rate schedule depends on, as stored in step checkpoints."""
    optim = dataclasses.asdict(recipe.optim)
    return {"train.max_steps": recipe.train.max_steps, **{f"optim.{k}": optim[k] for k in SCHEDULE_KEYS}}


def check_schedule_unchanged(saved: dict[str, object] | None, current: dict[str, object], path: Path) -> None:
    """Refuse to resume under another schedule than the checkpoint's, in one line (checkpoints written
    before schedules were recorded pass)."""
    if not saved:
        return
    changed = [f"{k} {saved[k]} -> {current[k]}" for k in current if k in saved and saved[k] != current[k]]
    if changed:
        raise CheckpointError(
            f"{path} was trained with another learning-rate schedule ({'; '.join(changed)}); resuming would change "
            "the curve mid-run: restore the values, or pass --allow-schedule-change (train.allow_schedule_change=true)"
        )
