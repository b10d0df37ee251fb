"""Training checkpoints: atomic, resumable, and small (trainable weights only).

A run directory looks like::

    RUN/
      recipe.toml             the resolved recipe the run started with
      metrics.jsonl           one JSON record per logged step
      latest                  name of the newest complete checkpoint (replaced atomically)
      base/                   the model as built, a complete checkpoint written when the run starts: with it,
                              every step-N/ is a usable model (``blip2 ask/eval --model RUN/step-N``, ``--init-from``)
      step-00001000/          a training checkpoint
        trainable.safetensors   every trainable parameter (plus the ITC temperature / ITG head)
        optimizer.pt            AdamW state (tensors and numbers only: loaded with weights_only=True)
        state.json              step, data position, grad-scaler state, frozen-weights manifest
        rng.pt                  torch / CUDA / Python RNG states
      final/                  a complete model checkpoint (``blip2 ask``, ``blip2 eval``, ``blip2 export``)

Frozen weights (the image encoder and the LLM: most of the bytes) are not copied into step checkpoints.
``state.json`` holds a manifest naming where they came from and a fingerprint of their values; resuming
rebuilds them from the recipe and refuses to continue if the fingerprint differs (LAVIS #153, #114).

Under ``dist.strategy = "fsdp"`` the files are the same: every rank helps gather the full trainable weights
and optimizer state onto rank 0, which writes them (``sharding.gather_training_state``), so a checkpoint
resumes under either strategy.

Crash safety (``durable.py``): a checkpoint is written into a temporary directory, its files and the
directory are fsynced, and it is swapped into place; ``latest`` is replaced atomically only after that, so
a kill at any instant of a save leaves the previous checkpoint as the latest, never a torn one. ``latest``
never names a directory being replaced: a step that ``latest`` already names is not written again (a run
resumed at step N that stops before step N+1 has nothing new to save), and resuming an earlier step of a
run points ``latest`` back at it before any later step directory is overwritten. Leftover temporary
directories of a killed save are removed by the next save.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blip2cli.checkpoint import (
    LATEST_POINTER,
    STEP_STATE_FILENAME,
    STEP_WEIGHTS_FILENAME,
)
from blip2cli.durable import replace_directory, write_text_atomically
from blip2cli.errors import CheckpointError

LATEST = LATEST_POINTER
STEP_PREFIX = "step-"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def frozen_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of the frozen weights: names, shapes, dtypes and float64 sums."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode())
        digest.update(f"{p.detach().double().sum().item():.10e}|{p.detach().double().abs().sum().item():.10e}".encode())
    return digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
    keep_last: int,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``RUN/step-N`` atomically, point ``latest`` at it, then prune older step checkpoints.

    ``weights`` / ``optimizer_state`` replace ``trainable_state(model)`` / ``optimizer.state_dict()`` when
    the caller gathered them already (a sharded model: ``sharding.gather_training_state``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_dir_name(step)
    if latest_name(run_dir) == final.name and (final / STEP_STATE_FILENAME).exists():
        return final  # resumed at this step and not trained since: the checkpoint is this state already
    _remove_leftovers(run_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=run_dir))
    try:
        save_file(weights if weights is not None else trainable_state(model), tmp / STEP_WEIGHTS_FILENAME)
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        full_state = {**state, "step": step, "scaler": scaler.state_dict() if scaler is not None else None}
        (tmp / STEP_STATE_FILENAME).write_text(json.dumps(full_state, indent=2, sort_keys=True) + "\n")
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    point_latest_at(run_dir, final.name)
    _prune(run_dir, keep_last, keep=final.name)
    return final


def latest_name(run_dir: Path) -> str | None:
    try:
        return (run_dir / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def point_latest_at(run_dir: Path, name: str) -> None:
    write_text_atomically(run_dir / LATEST, name + "\n")


def _remove_leftovers(run_dir: Path) -> None:
    """Temporary directories of saves that were killed (``.step-N.xxxx``); the run directory's lock keeps
    other writers, whose temporary directories these could be, out."""
    for leftover in run_dir.glob(f".{STEP_PREFIX}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _prune(run_dir: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in run_dir.glob(f"{STEP_PREFIX}*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none."""
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    candidate = run_dir / pointer.read_text().strip()
    if not (candidate / STEP_STATE_FILENAME).exists():
        raise CheckpointError(f"{pointer} names {candidate.name}, which is missing or incomplete")
    return candidate


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``None``/"never": start fresh. "auto": the run's latest checkpoint if any. Otherwise a path (a step
    directory, or a run directory whose latest checkpoint is taken)."""
    if resume in (None, "", "never"):
        return None
    if resume == "auto":
        return find_checkpoint(run_dir) if run_dir.exists() else None
    path = Path(resume)
    if (path / STEP_STATE_FILENAME).exists():
        return path
    if path.is_dir():
        found = find_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint to resume from")
        return found
    raise CheckpointError(f"cannot resume from {path}: not a checkpoint or run directory")


def load_training_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    map_location: torch.device | str = "cpu",
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Restore trainable weights, optimizer and scaler; return the saved state (step, data...) with the RNG
    states under ``"rng"``, for the caller to restore with ``restore_rng_state`` once the data pipeline is
    built (building a DataLoader iterator draws from the global RNG).

    ``fingerprint``: ``frozen_fingerprint(model)`` computed by the caller (before sharding: the fingerprint
    of a sharded model would cover each rank's shards only). A sharded (FSDP) model is restored through
    ``sharding.load_training_state``, a collective every rank calls."""
    from blip2cli.training.sharding import is_sharded, load_training_state

    sharded = is_sharded(model)
    try:
        state = json.loads((path / STEP_STATE_FILENAME).read_text())
        # Sharded: every rank reads the full tensors on the CPU and keeps its own shards of them.
        device = "cpu" if sharded else map_location
        weights = load_file(path / STEP_WEIGHTS_FILENAME, device=str(device))
        optimizer_state = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(
            f"{path} does not match this model's trainable weights (missing {missing[:3]}, unexpected {extra[:3]}); "
            "was the recipe changed?"
        )
    manifest = state.get("manifest", {})
    saved = manifest.get("frozen_fingerprint")
    if saved and saved != (fingerprint if fingerprint is not None else frozen_fingerprint(model)):
        raise CheckpointError(
            f"the frozen weights differ from those {path} was trained with ({manifest.get('frozen_sources')}); "
            "resume with the same image encoder and LLM"
        )
    if sharded:
        load_training_state(model, optimizer, weights, optimizer_state)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    state["rng"] = rng
    return state
