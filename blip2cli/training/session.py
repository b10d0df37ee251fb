"""A training run's set-up and its saves: everything between a recipe and the first optimizer step.

``open_session`` builds the model, shards or replicates it, restores a checkpoint, prepares the run
directory and the data stream, in the order that keeps a resumed run exact (the RNG state is restored
last). ``Session.save_step`` / ``save_final`` write the checkpoints (``checkpointing.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from blip2cli.checkpoint import base_id_of, save_model, write_run_base
from blip2cli.distributed import DistEnv
from blip2cli.models.base import store_frozen_parts_in
from blip2cli.recipes import Recipe, recipe_to_toml
from blip2cli.training.builders import BuiltModel, build_model
from blip2cli.training.checkpointing import (
    frozen_fingerprint,
    latest_name,
    load_training_checkpoint,
    point_latest_at,
    resolve_resume,
    restore_rng_state,
    save_training_checkpoint,
)
from blip2cli.training.optim import build_optimizer, check_schedule_unchanged, schedule_of
from blip2cli.training.optimizer_step import OptimizerStep, autocast_dtype
from blip2cli.training.sharding import gather_training_state, is_sharded, shard_model, unsharded_copy
from blip2cli.training.text_batching import TextBatcher


@dataclass
class Session:
    recipe: Recipe
    run_dir: Path
    env: DistEnv
    built: BuiltModel
    model: torch.nn.Module  # the model being trained (sharded in place under FSDP)
    optimizer: torch.optim.Optimizer
    step_fn: OptimizerStep
    batches: Iterator[dict[str, Any]]
    batcher: TextBatcher
    accumulation: int
    manifest: dict[str, Any]
    resume_from: Path | None
    start_step: int
    fsdp: bool
    parameter_counts: dict[str, int] = field(default_factory=dict)

    def save_step(self, step: int) -> Path | None:
        """``RUN/step-N`` (every rank calls it: under FSDP the ranks gather the shards onto rank 0)."""
        gathered = {}
        if is_sharded(self.model):
            weights, optimizer_state = gather_training_state(self.model, self.optimizer)
            gathered = {"weights": weights, "optimizer_state": optimizer_state}
        if not self.env.is_main:
            return None
        state = {"manifest": self.manifest, "data": {"micro_batches_consumed": step * self.accumulation},
                 "schedule": schedule_of(self.recipe)}
        return save_training_checkpoint(self.run_dir, step, self.model, self.optimizer, self.step_fn.scaler, state,
                                        self.recipe.train.keep_last, **gathered)

    def save_final(self) -> Path | None:
        """``RUN/final`` (every rank calls it: under FSDP the ranks gather the full weights for rank 0)."""
        to_save = unsharded_copy(self.model) if self.fsdp else self.model
        if not self.env.is_main:
            return None
        return save_model(to_save, self.run_dir / "final", **tokenizers_to_save(self.recipe, self.built))


def open_session(recipe: Recipe, run_dir: Path, shards: list[str], resume: str | None, dry_run: bool,
                 env: DistEnv, say: Callable[..., None], allow_schedule_change: bool) -> Session:
    accumulation = recipe.accumulation_steps(env.world_size)  # before any model is built: a refusal costs nothing
    if recipe.train.deterministic:
        use_deterministic_kernels()
    torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
    random.seed(recipe.train.seed)
    built = build_model(recipe, shards=shards)
    for note in built.notes:
        say(note, highlight=False, soft_wrap=True)
    fsdp = _use_fsdp(recipe, env, say)
    # FSDP moves each group to the device as it shards it: the whole model never has to fit on one GPU.
    model = built.model if fsdp else built.model.to(env.device)
    counts = model.parameter_counts()
    say(f"model: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen parameters")
    amp_dtype = autocast_dtype(recipe.train.precision, env.device)
    if amp_dtype is not None and not fsdp:  # FSDP2 wants one dtype per sharded group; it casts itself
        converted = store_frozen_parts_in(model, amp_dtype)
        if converted:
            say(f"frozen parts stored in {str(amp_dtype).removeprefix('torch.')}, the compute dtype: "
                f"{converted:,} parameters")
    scaler = torch.amp.GradScaler(env.device.type) if amp_dtype is torch.float16 else None
    # Before sharding: a sharded model's parameters are each rank's shards only.
    manifest = {"frozen_sources": built.sources, "frozen_fingerprint": frozen_fingerprint(model)}
    resume_from = resolve_resume(resume, run_dir)
    if env.is_main and not dry_run:
        # Before sharding and before any step: every step-N/ becomes a usable model on top of RUN/base.
        manifest["base_id"] = write_run_base(run_dir, model, **tokenizers_to_save(recipe, built),
                                             keep_id=None if resume_from is None else base_id_of(resume_from))
    if fsdp:
        shard_model(model, env.device, env.world_size, amp_dtype)
    optimizer = build_optimizer(model, recipe.optim)  # after sharding: it holds the parameter shards

    start_step, rng_state = 0, None
    if resume_from is not None:
        state = load_training_checkpoint(resume_from, model, optimizer, scaler, map_location=env.device,
                                         fingerprint=manifest["frozen_fingerprint"])
        start_step, rng_state = int(state["step"]), state["rng"]
        if not allow_schedule_change:
            check_schedule_unchanged(state.get("schedule"), schedule_of(recipe), resume_from)
        say(f"resumed from {resume_from} at step {start_step}")
    if env.is_main and not dry_run:
        _prepare_run_dir(recipe, run_dir, resume_from, say)

    batches = iter(_train_loader(recipe, shards, env, skip_batches=start_step * accumulation, model=built.model))
    wrapped = _wrap(model, recipe, env)
    batcher = TextBatcher(recipe, built)
    if rng_state is not None:
        restore_rng_state(rng_state)  # last, so the RNG stream continues exactly where the checkpoint left it
    step_fn = OptimizerStep(model, wrapped, optimizer, scaler, batcher, env, accumulation, amp_dtype,
                            recipe.optim.grad_clip, sharded=fsdp)
    return Session(recipe, run_dir, env, built, model, optimizer, step_fn, batches, batcher, accumulation, manifest,
                   resume_from, start_step, fsdp, counts)


def use_deterministic_kernels() -> None:
    """Deterministic kernels only, for the rest of this process (``train.deterministic``).

    Some multi-threaded CPU kernels accumulate in a varying order: two runs of the demo's stage 1 on 2
    threads drifted apart by float rounding within 5-40 steps, and bit-identically with this (or with one
    thread). cuBLAS needs a fixed workspace for the same guarantee. Ops that have no deterministic version
    warn instead of failing.
    """
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def tokenizers_to_save(recipe: Recipe, built: BuiltModel) -> dict[str, Any]:
    """``save_model``'s tokenizer arguments: the LLM's (and the Q-Former's aside) for stage 2, the Q-Former's for stage 1."""
    if recipe.model.stage == 2:
        return {"tokenizer": built.llm_tokenizer, "qformer_tokenizer": built.qformer_tokenizer}
    return {"tokenizer": built.qformer_tokenizer, "qformer_tokenizer": None}


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resume_from: Path | None, say) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)  # also when resuming another run's checkpoint into a new one
    if resume_from is None or not (run_dir / "recipe.toml").exists():
        (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    if resume_from is not None and resume_from.parent.resolve() == run_dir.resolve() \
            and latest_name(run_dir) != resume_from.name:
        # Rewinding the run: ``latest`` follows, so it never names a later step that is about to be overwritten.
        point_latest_at(run_dir, resume_from.name)
        say(f"rewound {run_dir} to {resume_from.name}; later steps will be overwritten")


def _use_fsdp(recipe: Recipe, env: DistEnv, say) -> bool:
    """``dist.strategy = "fsdp"`` under several processes. With one process there is nothing to shard over:
    the model trains unsharded (as with ddp), and the run says so."""
    if recipe.dist.strategy != "fsdp":
        return False
    if not env.distributed:
        say("dist.strategy=fsdp with one process: nothing to shard over, training unsharded")
        return False
    return True


def _wrap(model, recipe: Recipe, env: DistEnv):
    t = recipe.train
    if t.grad_checkpointing:
        model.enable_gradient_checkpointing()
    if t.compile_vision or t.compile_qformer:
        model.compile_parts(vision=t.compile_vision, qformer=t.compile_qformer)
    wrapped = model
    if env.distributed and recipe.dist.strategy != "fsdp":  # an FSDP model is sharded in place already
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model,
            device_ids=[env.device] if env.device.type == "cuda" else None,
            find_unused_parameters=recipe.dist.find_unused_parameters,
        )
    if recipe.train.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _train_loader(recipe: Recipe, shards: list[str], env: DistEnv, skip_batches: int, model):
    d = recipe.data
    preprocessing = model.config.preprocessing
    pin_memory = env.device.type == "cuda"
    if d.feature_cache:
        from blip2cli.data.feature_cache import CachedFeatureLoader, check_cache_fits, open_feature_cache

        check_cache_fits(open_feature_cache(d.feature_cache), model.vision_model, preprocessing.size, d.feature_cache)
        return CachedFeatureLoader(d.feature_cache, d.micro_batch_size, rank=env.rank, world_size=env.world_size,
                                   seed=recipe.train.seed, captions_top_k=d.captions_top_k, skip_batches=skip_batches,
                                   pin_memory=pin_memory)
    from blip2cli.data.training import make_train_loader

    return make_train_loader(
        shards, weights=d.weights or None, micro_batch_size=d.micro_batch_size, image_size=preprocessing.size,
        preprocessing=preprocessing, rrc_scale=tuple(d.rrc_scale), hflip=d.hflip, captions_top_k=d.captions_top_k,
        rank=env.rank, world_size=env.world_size, num_workers=d.num_workers, seed=recipe.train.seed,
        shuffle_buffer=d.shuffle_buffer, skip_batches=skip_batches, max_image_pixels=d.max_image_pixels or None,
        pin_memory=pin_memory,
    )
