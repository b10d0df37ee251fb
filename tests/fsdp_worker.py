"""Run under torchrun by tests/test_training.py: several short stage-2 runs in one process group (one launch,
one interpreter start-up per rank), each run's metrics records written by rank 0 to OUT/<name>.json.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_worker.py OUT SHARDS_JSON GROUP

GROUP "opt": FSDP and DDP with a decoder-only LLM, FSDP interrupted and resumed (under FSDP and under DDP),
FSDP stopped by SIGTERM on one rank and rerun.
GROUP "more": FSDP (with activation checkpointing) and DDP with an encoder-decoder LLM; both with bf16 autocast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2cli.recipes import load_recipe  # noqa: E402
from blip2cli.distributed import init_distributed, shutdown  # noqa: E402
from blip2cli.training.loop import train  # noqa: E402
from blip2cli.training.run_control import TrainingStopped  # noqa: E402

STEPS = 6
BASE = ["train.log_every=1", "data.shuffle_buffer=16", "optim.warmup_steps=1", f"train.max_steps={STEPS}",
        "train.save_every=0", "data.micro_batch_size=2"]  # 8 = 2 per rank x 2 ranks x 2 accumulation steps


def main() -> None:
    out, shards, group = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    env = init_distributed("cpu")

    def run(name: str, run_dir: str, *overrides: str, **kwargs) -> None:
        recipe = load_recipe("tiny_stage2_opt", [*BASE, *overrides])
        result = train(recipe, out / run_dir, shards, device="cpu", **kwargs)
        if env.is_main:
            records = [r for r in result.history if "loss" in r or "val_loss" in r]
            (out / f"{name}.json").write_text(json.dumps(records))

    if group == "opt":
        # FSDP with a held-out validation loss every 3 steps (it must not change the training losses), and DDP.
        run("fsdp", "fsdp", "dist.strategy=fsdp", "train.eval_every=3",
            f"data.val_shards={json.dumps(shards[:1])}", "eval.max_batches=2")
        run("ddp", "ddp", "dist.strategy=ddp")
        # Interrupted after 2 steps (a step checkpoint), then resumed under FSDP; the same FSDP checkpoint
        # resumed under DDP into another run directory (the on-disk format is DDP's).
        run("fsdp_first", "fsdp_resumed", "dist.strategy=fsdp", stop_after=2)
        run("fsdp_rest", "fsdp_resumed", "dist.strategy=fsdp", resume="auto")
        run("ddp_from_fsdp", "ddp_from_fsdp", "dist.strategy=ddp",
            resume=str(out / "fsdp_resumed" / "step-00000002"))
        # SIGTERM reaches rank 1 only, during step 3: both ranks stop after step 3 (the save gathers the
        # shards, a collective), each raising TrainingStopped; the rerun continues exactly.
        def sigterm_rank1(step: int) -> None:
            if step == 3 and env.rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            run("fsdp_signal_first", "fsdp_signal", "dist.strategy=fsdp", on_step=sigterm_rank1)
        except TrainingStopped as stop:
            (out / f"stopped_rank{env.rank}.txt").write_text(f"{stop.exit_code} {stop}")
        run("fsdp_signal_rest", "fsdp_signal", "dist.strategy=fsdp")
    elif group == "more":
        # An encoder-decoder LLM (T5 blocks, shared embeddings; FSDP with the Q-Former's activation
        # checkpointing, which changes no number), and bf16 autocast (FSDP gathers the Q-Former in bf16).
        t5 = ["model.llm=tiny-t5", "model.prompt=a photo of", "train.max_steps=3"]
        run("fsdp_t5", "fsdp_t5", "dist.strategy=fsdp", "train.grad_checkpointing=true", *t5)
        run("ddp_t5", "ddp_t5", "dist.strategy=ddp", *t5)
        bf16 = ["train.precision=bf16", "train.max_steps=3"]
        run("fsdp_bf16", "fsdp_bf16", "dist.strategy=fsdp", *bf16)
        run("ddp_bf16", "ddp_bf16", "dist.strategy=ddp", *bf16)
    else:
        raise SystemExit(f"unknown group {group!r}")
    shutdown()


if __name__ == "__main__":
    main()
