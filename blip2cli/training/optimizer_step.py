"""One optimizer step: gradient accumulation over micro-batches, mixed precision, loss scaling, clipping.

Under several processes the gradients are synchronised once per step, on the last micro-batch (DDP's
``no_sync``, FSDP's ``set_requires_gradient_sync``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from blip2cli.distributed import DistEnv

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
    """What a step leaves behind. Losses and the gradient norm stay on the device (reading them waits for the
    GPU): ``values()`` reads them, once per logged step."""

    losses: dict[str, torch.Tensor]  # each "loss*" output, averaged over the step's micro-batches (this rank)
    samples: int  # samples the step trained on, all ranks
    skipped: dict[str, int] = field(default_factory=dict)  # samples the data pipeline skipped, by reason (this rank)
    grad_norm: torch.Tensor | None = None

    def values(self) -> tuple[dict[str, float], float | None]:
        """(losses, gradient norm) as floats, read from the device in one transfer."""
        keys = sorted(self.losses)
        scalars = [self.losses[k].float().reshape(()) for k in keys]
        if self.grad_norm is not None:
            scalars.append(self.grad_norm.float().reshape(()).to(scalars[0].device if scalars else self.grad_norm.device))
        read = torch.stack(scalars).tolist() if scalars else []
        return dict(zip(keys, read[:len(keys)])), (read[-1] if self.grad_norm is not None else None)


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
                if key.startswith("loss"):  # summed on the device: no wait for the GPU per micro-batch
                    share = value.detach().float() / self.accumulation
                    outcome.losses[key] = outcome.losses[key] + share if key in outcome.losses else share
            outcome.samples += len(batch["text"]) * self.env.world_size
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

    def _update(self) -> torch.Tensor | None:
        """Unscale, clip, step, zero; returns the gradient norm before clipping (None without clipping), on
        the device."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.grad_clip > 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            # Under FSDP the norm is a DTensor (already the norm over every rank's shards).
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()
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
