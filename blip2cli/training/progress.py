"""What a run reports as it goes: one metrics record per logged step (to ``metrics.jsonl`` and the
configured loggers, main process only) and a progress line on the console."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from blip2cli.distributed import DistEnv, mean_across_ranks, sum_counts_across_ranks
from blip2cli.errors import Blip2Error
from blip2cli.training.loggers import MetricsLogger
from blip2cli.training.optimizer_step import StepOutcome


class Progress:
    """Collects step outcomes between log steps and writes the records. Every rank calls it (the averages
    over ranks are collectives); only the main process writes. ``history`` keeps this process's records."""

    def __init__(self, run_dir: Path, env: DistEnv, max_steps: int, log_every: int, start_step: int,
                 loggers: list[str], config: dict[str, Any], say: Callable[..., None],
                 constant_fields: dict[str, Any] | None = None):
        self.env, self.max_steps, self.log_every, self.say = env, max_steps, log_every, say
        self.constant_fields = constant_fields or {}
        self.history: list[dict[str, Any]] = []
        # On resume the records after the resumed step (logged before a kill, never checkpointed) are dropped first.
        self.logger = MetricsLogger(run_dir, loggers, run_dir.name, config,
                                    keep_through_step=start_step) if env.is_main else None
        self._skipped: dict[str, int] = {}
        self._samples = 0
        self._steps = 0
        self._run_start = self._last_log = time.perf_counter()

    def step_done(self, step: int, lr: float, outcome: StepOutcome) -> None:
        self._steps += 1
        self._samples += outcome.samples
        for reason, n in outcome.skipped.items():
            self._skipped[reason] = self._skipped.get(reason, 0) + n
        if step % self.log_every and step != self.max_steps:
            return
        now = time.perf_counter()
        # The only read of the losses from the device: once per logged step. Averaged over ranks first, so
        # that a non-finite loss on any rank stops every rank at the same step.
        losses, grad_norm = outcome.values()
        losses = mean_across_ranks(losses, self.env)
        if not all(math.isfinite(v) for v in losses.values()):
            raise Blip2Error(f"non-finite loss at step {step} (losses are read every train.log_every = "
                             f"{self.log_every} steps): {losses}; lower optim.lr or use train.precision=bf16")
        record = {"step": step, "lr": lr, **losses, **self.constant_fields}
        record["samples_per_s"] = self._samples / max(now - self._last_log, 1e-9)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        skipped = sum_counts_across_ranks(self._skipped, self.env)
        if skipped:
            record["skipped"] = skipped
        if self.env.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        record["eta_s"] = (now - self._run_start) / self._steps * (self.max_steps - step)
        self.log(record, format_record(record, self.max_steps))
        self._last_log, self._samples = now, 0

    def validation_done(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        self.log(record, "validation: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    def log(self, record: dict[str, Any], line: str) -> None:
        self.history.append(record)
        if self.logger:
            self.logger.log(record)
            self.say(line, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.logger:
            self.logger.close()


def format_record(record: dict[str, Any], max_steps: int) -> str:
    losses = " ".join(f"{k.removeprefix('loss_')}={v:.4f}" for k, v in record.items() if k.startswith("loss_"))
    line = f"step {record['step']}/{max_steps} loss={record['loss']:.4f} {losses} lr={record['lr']:.2e} " \
           f"{record['samples_per_s']:.1f} samples/s"
    if "skipped" in record:
        line += f" skipped={sum(record['skipped'].values())}"
    if "peak_memory_gb" in record:
        line += f" mem={record['peak_memory_gb']:.1f}GiB"
    minutes, seconds = divmod(int(record["eta_s"]), 60)
    return line + f" eta {minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
