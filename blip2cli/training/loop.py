"""The training loop shared by ``blip2 pretrain --stage 1|2`` and ``blip2 finetune``.

One function, ``train``: set up (process group, model, optimizer, data, resume) -> loop over optimizer
steps (gradient accumulation up to the global batch, mixed precision, clipping, schedule) -> checkpoints
and metrics. It runs unchanged in one CPU process without ``torch.distributed`` and under torchrun, where
the model is replicated (DDP) or, with ``dist.strategy = "fsdp"``, sharded (``sharding.py``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from blip2cli.checkpoint import CONFIG_FILENAME, base_id_of, save_model, write_run_base
from blip2cli.errors import Blip2Error
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
from blip2cli.training.distributed import (
    DistEnv,
    barrier,
    init_distributed,
    mean_across_ranks,
    sum_counts_across_ranks,
)
from blip2cli.training.loggers import MetricsLogger
from blip2cli.training.optim import (
    build_optimizer,
    check_schedule_unchanged,
    learning_rate,
    schedule_of,
    set_learning_rate,
)
from blip2cli.training.run_control import (
    RunLock,
    StopSignals,
    TrainingStopped,
    signal_name,
)
from blip2cli.training.sharding import (
    gather_training_state,
    is_sharded,
    shard_model,
    unsharded_copy,
)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    run_dir: Path
    final_checkpoint: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics records of this process
    parameter_counts: dict[str, int] = field(default_factory=dict)


def use_deterministic_kernels() -> None:
    """Deterministic kernels only, for the rest of this process (``train.deterministic``).

    Some multi-threaded CPU kernels accumulate in a varying order: two runs of the demo's stage 1 on 2
    threads drifted apart by float rounding within 5-40 steps, and bit-identically with this (or with one
    thread). cuBLAS needs a fixed workspace for the same guarantee. Ops that have no deterministic version
    warn instead of failing.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


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
        return _train(recipe, run_dir, shards, resume, dry_run, env, say, stop_after,
                      allow_schedule_change or recipe.train.allow_schedule_change, on_step, signals)


def _train(recipe: Recipe, run_dir: Path, shards: list[str], resume: str | None, dry_run: bool, env: DistEnv,
           say, stop_after: int | None, allow_schedule_change: bool, on_step, signals: StopSignals) -> TrainResult:
    accumulation = _accumulation_steps(recipe, env)  # before any model is built: a refusal costs nothing
    if recipe.train.deterministic:
        use_deterministic_kernels()
    torch.manual_seed(recipe.train.seed)  # identical initial weights on every rank
    random.seed(recipe.train.seed)

    from blip2cli.data.training import read_captions

    corpus = read_captions(shards, limit=5000) if _needs_corpus(recipe) else []
    built = build_model(recipe, corpus)
    for note in built.notes:
        say(note, highlight=False, soft_wrap=True)
    fsdp = _use_fsdp(recipe, env, say)
    # FSDP moves each group to the device as it shards it: the whole model never has to fit on one GPU.
    model = built.model if fsdp else built.model.to(env.device)
    counts = model.parameter_counts()
    say(f"model: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen parameters")

    amp_dtype = AMP_DTYPES.get(recipe.train.precision)
    if amp_dtype is torch.bfloat16 and env.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        amp_dtype = torch.float16  # bf16 where supported, fp16 with loss scaling otherwise
    scaler = torch.amp.GradScaler(env.device.type) if amp_dtype is torch.float16 else None
    # Before sharding: a sharded model's parameters are each rank's shards only.
    manifest = {"frozen_sources": built.sources, "frozen_fingerprint": frozen_fingerprint(model)}
    resume_from = resolve_resume(resume, run_dir)
    if env.is_main and not dry_run:
        # Before sharding and before any step: every step-N/ becomes a usable model on top of RUN/base.
        manifest["base_id"] = write_run_base(run_dir, model, **_tokenizers(recipe, built),
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
        run_dir.mkdir(parents=True, exist_ok=True)  # also when resuming another run's checkpoint into a new one
        if resume_from is None or not (run_dir / "recipe.toml").exists():
            (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
        if resume_from is not None and resume_from.parent.resolve() == run_dir.resolve() \
                and latest_name(run_dir) != resume_from.name:
            # Rewinding the run: ``latest`` follows, so it never names a later step that is about to be overwritten.
            point_latest_at(run_dir, resume_from.name)
            say(f"rewound {run_dir} to {resume_from.name}; later steps will be overwritten")

    loader = _train_loader(recipe, shards, env, skip_batches=start_step * accumulation,
                           preprocessing=built.model.config.preprocessing)
    batches = iter(loader)
    trained = _wrap(model, recipe, env)
    batcher = TextBatcher(recipe, built)
    if rng_state is not None:
        restore_rng_state(rng_state)  # last, so the RNG stream continues exactly where the checkpoint left it

    if dry_run:
        batch = next(batches)
        inputs = batcher(batch, step=start_step, device=env.device)
        say(f"dry run: one batch of {batch['pixel_values'].shape[0]} images loaded; "
            f"{accumulation} micro-batches of {recipe.data.micro_batch_size} per step on {env.world_size} process(es)")
        return TrainResult(run_dir, None, start_step, parameter_counts=counts)

    history: list[dict[str, Any]] = []
    skipped_total: dict[str, int] = {}
    # On resume the records after the resumed step (logged before a kill, never checkpointed) are dropped first.
    logger = MetricsLogger(run_dir, recipe.train.loggers, run_dir.name, dataclasses.asdict(recipe),
                           keep_through_step=start_step) if env.is_main else None
    validation = Validation(recipe, built, batcher, env)
    step = start_step
    run_start = last_log_time = time.perf_counter()
    samples_since_log = 0
    steps_this_run = 0
    model.train()
    try:
        while step < recipe.train.max_steps:
            lr = learning_rate(step, recipe.train.max_steps, recipe.optim)
            set_learning_rate(optimizer, lr)
            sums: dict[str, float] = {}
            for micro in range(accumulation):
                batch = next(batches)
                for reason, n in batch.get("skipped", {}).items():
                    skipped_total[reason] = skipped_total.get(reason, 0) + n
                inputs = batcher(batch, step=step * accumulation + micro, device=env.device)
                sync = micro == accumulation - 1 or not env.distributed
                with _gradient_sync(trained, model, sync, fsdp):
                    with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = trained(**inputs)
                    loss = out["loss"] / accumulation
                    (scaler.scale(loss) if scaler else loss).backward()
                for key, value in out.items():
                    if key.startswith("loss"):
                        sums[key] = sums.get(key, 0.0) + float(value.detach()) / accumulation
                samples_since_log += batch["pixel_values"].shape[0] * env.world_size
            if not all(math.isfinite(v) for v in sums.values()):
                raise Blip2Error(f"non-finite loss at step {step}: {sums}; lower optim.lr or use train.precision=bf16")
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = None
            if recipe.optim.grad_clip > 0:
                params = [p for p in model.parameters() if p.requires_grad]
                norm = torch.nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip)
                # Under FSDP the norm is a DTensor (already the norm over every rank's shards).
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_run += 1

            if step % recipe.train.log_every == 0 or step == recipe.train.max_steps:
                now = time.perf_counter()
                record = {"step": step, "lr": lr, **mean_across_ranks(sums, env), **_contrastive(recipe, env)}
                record["samples_per_s"] = samples_since_log / max(now - last_log_time, 1e-9)
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                skipped = sum_counts_across_ranks(skipped_total, env)
                if skipped:
                    record["skipped"] = skipped
                if env.device.type == "cuda":
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                record["eta_s"] = (now - run_start) / steps_this_run * (recipe.train.max_steps - step)
                history.append(record)
                if logger:
                    logger.log(record)
                    say(_format_record(record, recipe.train.max_steps), highlight=False, soft_wrap=True)
                last_log_time, samples_since_log = now, 0

            if validation.due(step):
                record = {"step": step, **validation.run(model)}
                history.append(record)
                if logger:
                    logger.log(record)
                    say("validation: " + " ".join(f"{k}={v:.4f}" for k, v in record.items()
                                                  if k != "step" and isinstance(v, float)), highlight=False)

            if on_step is not None:
                on_step(step)
            at_save = recipe.train.save_every and step % recipe.train.save_every == 0
            stopping = stop_after is not None and steps_this_run >= stop_after
            signalled = signals.agreed(env.device, env.distributed)  # the same answer on every rank
            if (at_save or stopping or signalled) and step < recipe.train.max_steps:
                path = _save_step(run_dir, step, model, optimizer, scaler, manifest, accumulation, recipe, env)
            if signalled and step < recipe.train.max_steps:
                if logger:
                    logger.close()
                barrier(env)  # rank 0 has saved: nobody tears the process group down under it
                name = signal_name(signalled)
                where = f"saved {path}" if env.is_main else f"rank 0 saved step {step}"
                raise TrainingStopped(f"{name} after step {step}: {where}; "
                                      "rerun the same command to continue", signalled)
            if stopping and step < recipe.train.max_steps:
                say(f"stopped after step {step}; continue with --resume auto")
                if logger:
                    logger.close()
                return TrainResult(run_dir, None, step, history, counts)
    except KeyboardInterrupt:
        if logger:
            logger.close()
        # No lost work: keep what the finished steps learned, then let the interrupt propagate. Not under
        # FSDP: saving gathers shards from every rank, which cannot be relied on once ranks are interrupted
        # at different points (it would hang); the last step checkpoint is the one to resume from.
        if fsdp:
            say("interrupted: dist.strategy=fsdp saves only at step checkpoints; continue with --resume auto")
        elif step > start_step:
            path = _save_step(run_dir, step, model, optimizer, scaler, manifest, accumulation, recipe, env)
            say(f"interrupted: saved {path}; continue with --resume auto")
        raise

    _save_step(run_dir, step, model, optimizer, scaler, manifest, accumulation, recipe, env)
    if logger:
        logger.close()
    final = run_dir / "final"
    if step == start_step and resume_from is not None and (final / CONFIG_FILENAME).exists():
        say(f"the run is complete at step {step}; {final} is up to date")  # a rerun rewrites nothing
        return TrainResult(run_dir, final, step, history, counts)
    # FSDP: every rank helps gather the full weights into an unsharded copy on rank 0.
    to_save = unsharded_copy(model) if fsdp else model
    if env.is_main:
        final = save_model(to_save, final, **_tokenizers(recipe, built))
        say(f"final checkpoint: {final}")
    return TrainResult(run_dir, final if env.is_main else None, step, history, counts)


def _tokenizers(recipe: Recipe, built: BuiltModel) -> dict[str, Any]:
    """``save_model``'s tokenizer arguments: the LLM's (and the Q-Former's aside) for stage 2, the Q-Former's for stage 1."""
    if recipe.model.stage == 2:
        return {"tokenizer": built.llm_tokenizer, "qformer_tokenizer": built.qformer_tokenizer}
    return {"tokenizer": built.qformer_tokenizer, "qformer_tokenizer": None}


def _needs_corpus(recipe: Recipe) -> bool:
    m = recipe.model
    return (m.qformer_init == "tiny" and not m.init_from) or (m.stage == 2 and (m.llm or "").startswith("tiny"))


def _accumulation_steps(recipe: Recipe, env: DistEnv) -> int:
    return recipe.accumulation_steps(env.world_size)  # refuses stage-1 contrastive accumulation unless allowed


def _contrastive(recipe: Recipe, env: DistEnv) -> dict[str, int]:
    """Stage 1: the samples each ITC softmax / ITM negative pool spans, and the ITC negatives per sample."""
    batch = recipe.contrastive_batch(env.world_size)
    return {} if batch is None else {"contrastive_batch": batch, "itc_negatives": batch - 1}


def _use_fsdp(recipe: Recipe, env: DistEnv, say) -> bool:
    """``dist.strategy = "fsdp"`` under several processes. With one process there is nothing to shard over:
    the model trains unsharded (as with ddp), and the run says so."""
    if recipe.dist.strategy != "fsdp":
        return False
    if not env.distributed:
        say("dist.strategy=fsdp with one process: nothing to shard over, training unsharded")
        return False
    return True


def _gradient_sync(wrapped, model, sync: bool, sharded: bool):
    """Skip the gradient all-reduce / reduce-scatter on micro-batches that are not the step's last."""
    if sync:
        return nullcontext()
    if sharded:
        return _fsdp_no_sync(model)
    return wrapped.no_sync()


@contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _wrap(model, recipe: Recipe, env: DistEnv):
    if recipe.train.grad_checkpointing:
        model.qformer.gradient_checkpointing_enable()
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


def _train_loader(recipe: Recipe, shards: list[str], env: DistEnv, skip_batches: int, preprocessing):
    from blip2cli.data.training import make_train_loader

    d = recipe.data
    return make_train_loader(
        shards,
        weights=d.weights or None,
        micro_batch_size=d.micro_batch_size,
        image_size=preprocessing.size,
        preprocessing=preprocessing,
        rrc_scale=tuple(d.rrc_scale),
        hflip=d.hflip,
        captions_top_k=d.captions_top_k,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=d.num_workers,
        seed=recipe.train.seed,
        shuffle_buffer=d.shuffle_buffer,
        skip_batches=skip_batches,
        max_image_pixels=d.max_image_pixels or None,
    )


def _save_step(run_dir, step, model, optimizer, scaler, manifest, accumulation, recipe, env) -> Path | None:
    gathered = {}
    if is_sharded(model):  # every rank takes part in gathering the full tensors onto rank 0
        weights, optimizer_state = gather_training_state(model, optimizer)
        gathered = {"weights": weights, "optimizer_state": optimizer_state}
    if not env.is_main:
        return None
    state = {"manifest": manifest, "data": {"micro_batches_consumed": step * accumulation},
             "schedule": schedule_of(recipe)}
    return save_training_checkpoint(run_dir, step, model, optimizer, scaler, state, recipe.train.keep_last,
                                    **gathered)


def _format_record(record: dict[str, Any], max_steps: int) -> str:
    losses = " ".join(f"{k.removeprefix('loss_')}={v:.4f}" for k, v in record.items() if k.startswith("loss_"))
    line = f"step {record['step']}/{max_steps} loss={record['loss']:.4f} {losses} lr={record['lr']:.2e} " \
           f"{record['samples_per_s']:.1f} samples/s"
    if "skipped" in record:
        line += f" skipped={sum(record['skipped'].values())}"
    if "peak_memory_gb" in record:
        line += f" mem={record['peak_memory_gb']:.1f}GiB"
    minutes, seconds = divmod(int(record["eta_s"]), 60)
    return line + f" eta {minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


class TextBatcher:
    """Turns a data batch (images + texts, and questions for question-answer samples) into the model's
    keyword arguments.

    Stage 2: a caption is the LLM's target after ``model.prompt``; a question-answer sample's target is its
    answer after the model's VQA prompt (``usage["vqa_prompt_template"]``, e.g. "Question: {} Answer:"),
    which is masked from the loss like any prompt: the LLM learns to answer, not to repeat questions, and
    answers through the same template in ``ask`` and ``eval``. Stage 1 reads a question-answer sample as one
    text, "question answer"."""

    def __init__(self, recipe: Recipe, built: BuiltModel):
        self.recipe = recipe
        self.built = built
        if recipe.model.stage == 2:
            from blip2cli.models.llm import end_token

            self.end_token = end_token(built.model.language_model, built.llm_tokenizer)
            self.template = built.model.config.stored_generation("vqa").get("prompt")

    def __call__(self, batch: dict[str, Any], step: int, device: torch.device) -> dict[str, torch.Tensor]:
        m, d = self.recipe.model, self.recipe.data
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        texts = list(batch["text"])
        questions = list(batch.get("question") or [None] * len(texts))
        if m.stage == 1:
            texts = [t if q is None else f"{q} {t}" for t, q in zip(texts, questions)]
            tokens = self.built.qformer_tokenizer(
                texts, padding="max_length", truncation=True, max_length=d.max_txt_len, return_tensors="pt"
            )
            return {"pixel_values": pixel_values, "input_ids": tokens["input_ids"].to(device),
                    "attention_mask": tokens["attention_mask"].to(device)}
        from blip2cli.models.text import (
            decoder_only_batch,
            encoder_decoder_batch,
            prefix_lm_split,
        )

        tokenizer = self.built.llm_tokenizer
        asked = any(q is not None for q in questions)
        if self.built.model.is_encoder_decoder:
            # The prefix-LM split point is drawn from a generator seeded by the step: resumable exactly.
            rng = random.Random(self.recipe.train.seed * 1_000_003 + step)
            if not asked:
                tokens = encoder_decoder_batch(tokenizer, texts, prompt=m.prompt or None, rng=rng,
                                               max_length=d.max_txt_len)
            else:  # per sample: the question's prompt, the recipe's prompt, or a prefix-LM split
                pairs = [(self.template.format(q), t) if q is not None else (m.prompt, t) if m.prompt
                         else prefix_lm_split(t, rng) for t, q in zip(texts, questions)]
                tokens = encoder_decoder_batch(tokenizer, [t for _, t in pairs], prompt=[p for p, _ in pairs],
                                               max_length=max(d.max_txt_len, *(len(tokenizer(p)["input_ids"]) for p, _ in pairs)),
                                               max_target_length=d.max_txt_len)
            keys = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")
        else:
            max_length = d.max_txt_len
            prompts: str | list[str] = m.prompt
            if asked:
                prompts = [self.template.format(q) + " " if q is not None else m.prompt for q in questions]
                # data.max_txt_len bounds the answer, not the question in front of it (else a long question
                # would cut the answer, the only labelled part, away)
                max_length += max(len(tokenizer(p)["input_ids"]) for p in prompts)
            tokens = decoder_only_batch(tokenizer, texts, prompt=prompts, max_length=max_length,
                                        end_token=self.end_token)
            keys = ("input_ids", "attention_mask", "labels")
        return {"pixel_values": pixel_values, **{k: tokens[k].to(device) for k in keys}}


class Validation:
    """Every ``train.eval_every`` steps: the loss on ``data.val_shards`` (eval transform, at most
    ``eval.max_batches`` batches) and, when ``eval.task`` is set, that ``blip2 eval`` task on the first
    ``eval.limit`` items of its data. Runs on every rank (collectives inside the model and the eval
    stay matched) and forks the RNG, so validating never changes the training run itself."""

    def __init__(self, recipe: Recipe, built: BuiltModel, batcher: TextBatcher, env: DistEnv):
        self.recipe, self.built, self.batcher, self.env = recipe, built, batcher, env
        self.every = recipe.train.eval_every
        self._eval_data = None
        if self.every and recipe.eval.task:
            from blip2cli.evaluation.datasets import load_eval_data

            self._eval_data = load_eval_data(recipe.eval.task, recipe.eval.data or None)

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.recipe.train.max_steps)

    def run(self, model) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                metrics = self._held_out_loss(model) if self.recipe.data.val_shards else {}
                if self._eval_data is not None:
                    metrics.update(self._task_metrics(model))
        finally:
            model.train(was_training)
        return metrics

    @torch.no_grad()
    def _held_out_loss(self, model) -> dict[str, float]:
        from blip2cli.data.training import make_eval_loader

        r = self.recipe
        pre = self.built.model.config.preprocessing
        loader = make_eval_loader(r.data.val_shards, r.data.micro_batch_size, pre.size, preprocessing=pre,
                                  max_image_pixels=r.data.max_image_pixels or None)
        sums: dict[str, float] = {}
        samples = 0
        for index, batch in enumerate(loader):
            if r.eval.max_batches and index >= r.eval.max_batches:
                break
            out = model(**self.batcher(batch, step=index, device=self.env.device))
            size = batch["pixel_values"].shape[0]
            for key, value in out.items():
                if key.startswith("loss"):
                    sums[key] = sums.get(key, 0.0) + float(value) * size
            samples += size
        if not samples:
            raise Blip2Error(f"data.val_shards {r.data.val_shards} hold no readable sample")
        return mean_across_ranks({f"val_{k}": v / samples for k, v in sums.items()}, self.env)

    def _task_metrics(self, model) -> dict[str, Any]:
        from blip2cli.checkpoint import make_image_processor
        from blip2cli.evaluation.runner import evaluate
        from blip2cli.evaluation.tasks import resolve_settings

        r = self.recipe
        tokenizer = self.built.llm_tokenizer if r.model.stage == 2 else self.built.qformer_tokenizer
        # The same prompts and generation settings `blip2 eval` will use on the saved checkpoint.
        settings, _ = resolve_settings(r.eval.task, model.config, bool(getattr(model, "is_encoder_decoder", False)))
        metrics = evaluate(r.eval.task, model, self._eval_data, limit=r.eval.limit or None, tokenizer=tokenizer,
                           image_processor=make_image_processor(model.config), batch_size=r.data.micro_batch_size,
                           settings=settings)
        return {f"{r.eval.task}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
