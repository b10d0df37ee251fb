"""Where training metrics go: always ``RUN_DIR/metrics.jsonl``; TensorBoard and Weights & Biases on request.

The optional loggers import their library only when asked for (``train.loggers``), so neither is a
dependency of blip2; a missing one is a one-line error at start-up, not a crash mid-run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip2cli.errors import Blip2Error


class MetricsLogger:
    """Appends each record (a flat dict with ``step``) to every configured sink. Main process only."""

    def __init__(self, run_dir: Path, loggers: list[str], run_name: str, config: dict[str, Any]):
        self.jsonl = run_dir / "metrics.jsonl"
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


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
