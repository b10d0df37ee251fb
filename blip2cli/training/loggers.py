"""Where training metrics go: always ``RUN_DIR/metrics.jsonl``; TensorBoard and Weights & Biases on request.

The optional loggers import their library only when asked for (``train.loggers``), so neither is a
dependency of blip2; a missing one is a one-line error at start-up, not a crash mid-run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip2cli.durable import write_text_atomically
from blip2cli.errors import Blip2Error


class MetricsLogger:
    """Appends each record (a flat dict with ``step``) to every configured sink. Main process only.

    ``keep_through_step``: the step the run starts from. ``metrics.jsonl`` first keeps only the records up to
    it (atomically), so a run resumed after a kill logs each step once, not again after the duplicates of
    the steps it lost; a torn last line is dropped too."""

    def __init__(self, run_dir: Path, loggers: list[str], run_name: str, config: dict[str, Any],
                 keep_through_step: int = 0):
        self.jsonl = run_dir / "metrics.jsonl"
        trim_records(self.jsonl, keep_through_step)
        self._tensorboard = self._wandb = None
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise Blip2Error("train.loggers names tensorboard but it is not installed: pip install tensorboard") from None
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise Blip2Error("train.loggers names wandb but it is not installed: pip install wandb") from None
            # resume="allow" with the run directory's name: a resumed run continues the same W&B run.
            self._wandb = wandb.init(name=run_name, id=run_name.replace("/", "-"), resume="allow", config=config,
                                     dir=str(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float)) and k != "step"}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, record["step"])
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def trim_records(jsonl: Path, last_step: int) -> int:
    """Keep the records of ``jsonl`` with ``step <= last_step`` (replaced atomically); returns how many went."""
    if not jsonl.exists():
        return 0
    kept, dropped = [], 0
    for line in jsonl.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill mid-write
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomically(jsonl, "".join(line + "\n" for line in kept))
    return dropped


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
