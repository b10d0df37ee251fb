"""The training loop shared by ``blip2 pretrain --stage 1|2`` and ``blip2 finetune``.

``train``: set up (``session.open_session``: process group, model, optimizer, data, resume) -> optimizer
steps (``optimizer_step``: accumulation up to the global batch, mixed precision, clipping) on the
learning-rate schedule (``optim``), with records (``progress``), validation (``validation``) and step
checkpoints -> the final checkpoint. It runs unchanged in one CPU process without ``torch.distributed`` and
under torchrun, where the model is replicated (DDP) or, with ``dist.strategy = "fsdp"``, sharded
(``sharding.py``). Stopping (``run_control``): the run directory is locked for one writer; SIGTERM/SIGUSR1
save after the current step on every rank; Ctrl-C saves at once (not under FSDP).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from blip2cli.distributed import barrier, init_distributed
from blip2cli.models.config import CONFIG_FILENAME
from blip2cli.recipes import Recipe
from blip2cli.training.optim import learning_rate, set_learning_rate
from blip2cli.training.progress import Progress
from blip2cli.training.run_control import RunLock, StopSignals, TrainingStopped, signal_name
from blip2cli.training.session import Session, open_session
from blip2cli.training.validation import Validation


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics records of this process
    parameter_counts: dict[str, int] = field(default_factory=dict)


def train(
    recipe: Recipe,
    run_dir: Path,
    shards: list[str],
    resume: str | None = "auto",
    dry_run: bool = False,
    device: str = "auto",
    console: Console | None = None,
    stop_after: int | None = None,
    allow_schedule_change: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``recipe`` on ``shards`` into ``run_dir``.

    ``resume``: "auto" continues the run's latest checkpoint if there is one, "never" starts fresh, or a
    checkpoint path. ``stop_after`` ends the process after that many optimizer steps of *this* invocation
    (after saving a checkpoint), as an interrupted job would; used by tests and time-limited jobs.
    ``allow_schedule_change``: resume although ``train.max_steps`` or the schedule changed (also the recipe
    key ``train.allow_schedule_change``). ``on_step(step)`` runs after every optimizer step.

    The main process holds the run directory's lock throughout (``run_control.RunLock``); SIGTERM or
    SIGUSR1 saves a checkpoint after the current step and raises ``TrainingStopped`` on every rank.
    """
    env = init_distributed(device)
    console = console or Console(stderr=True)
    say = console.print if env.is_main else (lambda *a, **k: None)
    lock = RunLock(run_dir, say=say) if env.is_main and not dry_run else nullcontext()
    with lock, StopSignals() as signals:
        session = open_session(recipe, run_dir, shards, resume, dry_run, env, say,
                               allow_schedule_change or recipe.train.allow_schedule_change)
        if dry_run:
            return _dry_run(session, say)
        return _run(session, say, signals, stop_after, on_step)


def _run(s: Session, say, signals: StopSignals, stop_after: int | None, on_step) -> TrainResult:
    recipe, env, max_steps = s.recipe, s.env, s.recipe.train.max_steps
    contrastive = recipe.contrastive_batch(env.world_size)  # stage 1: the samples one ITC softmax spans
    progress = Progress(s.run_dir, env, max_steps, recipe.train.log_every, s.start_step, recipe.train.loggers,
                        dataclasses.asdict(recipe), say,
                        {} if contrastive is None else {"contrastive_batch": contrastive, "itc_negatives": contrastive - 1})
    validation = Validation(recipe, s.built, s.batcher, env)
    step = s.start_step
    s.model.train()
    try:
        while step < max_steps:
            lr = learning_rate(step, max_steps, recipe.optim)
            set_learning_rate(s.optimizer, lr)
            outcome = s.step_fn(s.batches, step)
            step += 1
            progress.step_done(step, lr, outcome)
            if validation.due(step):
                progress.validation_done(step, validation.run(s.model))
            if on_step is not None:
                on_step(step)
            if step < max_steps and _stop_here(s, step, step - s.start_step, signals, stop_after, progress, say):
                return TrainResult(s.run_dir, None, step, progress.history, s.parameter_counts)
    except KeyboardInterrupt:
        _save_on_interrupt(s, step, progress, say)
        raise
    s.save_step(step)
    progress.close()
    return _finish(s, step, progress.history, say)


def _stop_here(s: Session, step: int, steps_this_run: int, signals: StopSignals, stop_after: int | None,
               progress: Progress, say) -> bool:
    """Save a step checkpoint when one is due; True when the run ends here (``stop_after``). A stop signal
    (the same decision on every rank) saves and raises ``TrainingStopped``."""
    every = s.recipe.train.save_every
    stopping = stop_after is not None and steps_this_run >= stop_after
    signalled = signals.agreed(s.env.device, s.env.distributed)
    if not (stopping or signalled or (every and step % every == 0)):
        return False
    path = s.save_step(step)
    if signalled:
        progress.close()
        barrier(s.env)  # rank 0 has saved: nobody tears the process group down under it
        where = f"saved {path}" if s.env.is_main else f"rank 0 saved step {step}"
        raise TrainingStopped(f"{signal_name(signalled)} after step {step}: {where}; "
                              "rerun the same command to continue", signalled)
    if stopping:
        say(f"stopped after step {step}; continue with --resume auto")
        progress.close()
    return stopping


def _save_on_interrupt(s: Session, step: int, progress: Progress, say) -> None:
    """Ctrl-C: keep what the finished steps learned. Not under FSDP: saving gathers shards from every rank,
    which cannot be relied on once ranks are interrupted at different points (it would hang); the last step
    checkpoint is the one to resume from (SIGTERM, which the ranks agree on first, does save)."""
    progress.close()
    if s.fsdp:
        say("interrupted: dist.strategy=fsdp saves only at step checkpoints; continue with --resume auto")
    elif step > s.start_step:
        path = s.save_step(step)
        say(f"interrupted: saved {path}; continue with --resume auto")


def _finish(s: Session, step: int, history: list[dict[str, Any]], say) -> TrainResult:
    final = s.run_dir / "final"
    if step == s.start_step and s.resume_from is not None and (final / CONFIG_FILENAME).exists():
        say(f"the run is complete at step {step}; {final} is up to date")  # a rerun rewrites nothing
        return TrainResult(s.run_dir, final, step, history, s.parameter_counts)
    saved = s.save_final()
    if saved is not None:
        say(f"final checkpoint: {saved}")
    return TrainResult(s.run_dir, saved, step, history, s.parameter_counts)


def _dry_run(s: Session, say) -> TrainResult:
    from blip2cli.training.feature_cache import feature_cache_cost

    batch = next(s.batches)
    s.batcher(batch, step=s.start_step, device=s.env.device)
    what = "cached images" if "vision_features" in batch else "images"
    say(f"dry run: one batch of {len(batch['text'])} {what} loaded; {s.accumulation} micro-batches of "
        f"{s.recipe.data.micro_batch_size} per step on {s.env.world_size} process(es)")
    if not s.model.train_vision:
        say(feature_cache_cost(s.recipe, s.model), highlight=False, soft_wrap=True)
    return TrainResult(s.run_dir, None, s.start_step, parameter_counts=s.parameter_counts)
