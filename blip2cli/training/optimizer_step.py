"""One optimizer step: gradient accumulation over micro-batches, mixed precision, loss scaling, clipping.

Under several processes the gradients are synchronised once per step, on the last micro-batch (DDP's
``no_sync``, FSDP's ``set_requires_gradient_sync``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from blip2cli.distributed import DistEnv
from blip2cli.errors import Blip2Error

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision``: bf16 where supported, fp16 (with loss scaling) on GPUs
    without bf16, None for fp32."""
    dtype = AMP_DTYPES.get(precision)
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return dtype


@dataclass
class StepOutcome:
    losses: dict[str, float]  # each "loss*" output, averaged over the step's micro-batches (this rank)
    samples: int  # samples the step trained on, all ranks
    skipped: dict[str, int] = field(default_factory=dict)  # samples the data pipeline skipped, by reason (this rank)
    grad_norm: float | None = None


class OptimizerStep:
    """Callable: ``step(batches, step_index) -> StepOutcome`` trains on ``accumulation`` micro-batches drawn
    from ``batches``, then steps ``optimizer``."""

    def __init__(self, model, wrapped, optimizer, scaler, batcher, env: DistEnv, accumulation: int,
                 amp_dtype: torch.dtype | None, grad_clip: float, sharded: bool):
        self.model, self.wrapped, self.optimizer, self.scaler, self.batcher = model, wrapped, optimizer, scaler, batcher
        self.env, self.accumulation, self.amp_dtype, self.grad_clip, self.sharded = \
            env, accumulation, amp_dtype, grad_clip, sharded

    def __call__(self, batches: Iterator[dict[str, Any]], step: int) -> StepOutcome:
        outcome = StepOutcome(losses={}, samples=0)
        for micro in range(self.accumulation):
            batch = next(batches)
            for reason, n in batch.get("skipped", {}).items():
                outcome.skipped[reason] = outcome.skipped.get(reason, 0) + n
            out = self._forward_backward(batch, step * self.accumulation + micro,
                                         sync=micro == self.accumulation - 1)
            for key, value in out.items():
                if key.startswith("loss"):
                    outcome.losses[key] = outcome.losses.get(key, 0.0) + float(value.detach()) / self.accumulation
            outcome.samples += len(batch["text"]) * self.env.world_size
        if not all(math.isfinite(v) for v in outcome.losses.values()):
            raise Blip2Error(f"non-finite loss at step {step}: {outcome.losses}; "
                             "lower optim.lr or use train.precision=bf16")
        outcome.grad_norm = self._update()
        return outcome

    def _forward_backward(self, batch: dict[str, Any], micro_index: int, sync: bool) -> dict[str, torch.Tensor]:
        inputs = self.batcher(batch, step=micro_index, device=self.env.device)
        with self._gradient_sync(sync or not self.env.distributed):
            with torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.wrapped(**inputs)
            loss = out["loss"] / self.accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        return out

    def _update(self) -> float | None:
        """Unscale, clip, step, zero; returns the gradient norm before clipping (None without clipping)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.grad_clip > 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            # Under FSDP the norm is a DTensor (already the norm over every rank's shards).
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _gradient_sync(self, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on micro-batches that are not the step's last."""
        if sync:
            return nullcontext()
        if self.sharded:
            return _fsdp_no_sync(self.model)
        return self.wrapped.no_sync()


@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
