"""Training recipes: a typed schema, TOML loading with ``key.sub=value`` overrides, and the shipped recipes.

A recipe is a TOML file with one table per section of :class:`Recipe` (``[model]``, ``[loss]``, ``[optim]``,
``[data]``, ``[train]``, ``[eval]``, ``[dist]``). Every key is optional in a file (absent = the schema
default) and every key is checked: an unknown key, a value of the wrong type or an out-of-range value is a
one-line :class:`Blip2Error` naming the key, never a silent default (the LAVIS ``cfg.get(...)`` trap).

TOML has no ``null``. A field typed ``X | None`` is "unset" when its key is absent; the emitter leaves it
out, and the override ``~key`` resets any key to its schema default (``None`` for those fields).

The shipped recipes live in ``recipes/`` at the repository root; ``blip2cli/recipes_data`` is a symlink to
it, so they are package data too: found from a source checkout, an editable install and an installed wheel
(which holds copies) alike. Their first comment line is a one-line description; the rest of the header gives the launch
command.

Nothing here resolves model names: ``model.vision = "tiny"`` or ``model.llm = "opt-2.7b"`` are strings that
the model builders interpret.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from blip2cli.errors import Blip2Error
from blip2cli.models.preprocessing import INTERPOLATIONS, RESIZE_MODES

RECIPES_DIR = Path(__file__).parent / "recipes_data"


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help line. ``recipe_to_toml`` writes it above the key, so ``blip2 recipes
    show`` is self-documenting. Mutable defaults (lists) are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Allowed values of the string "enums"; checked by Recipe.validate.
STAGES = (1, 2)
TASKS = ("pretrain", "caption", "vqa", "retrieval")
PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("ddp", "fsdp")
LOGGERS = ("tensorboard", "wandb")
WEIGHT_DECAY_GROUPS = ("ours", "lavis")


@dataclass
class ModelSection:
    stage: int = _f(1, "1 = Q-Former representation learning (ITC/ITM/ITG, no LLM); 2 = generative, Q-Former feeds a frozen LLM.")
    task: str = _f("pretrain", "pretrain | caption | vqa | retrieval (retrieval fine-tunes a stage-1 model; caption/vqa a stage-2 one).")
    vision: str = _f("eva-vit-g", 'Image encoder: eva-vit-g, clip-vit-l, eva-vit-g:FILE, open_clip:MODEL[:PRETRAINED], hf:ID_OR_PATH, or "tiny" (test model built from a config).')
    llm: str | None = _f(None, 'Stage 2 only: opt-2.7b, opt-6.7b, flant5-xl, flant5-xxl, a hub id or a local path, or "tiny-opt"/"tiny-t5" (test models).')
    qformer_init: str = _f("bert-base-uncased", 'Weights and vocabulary the Q-Former starts from (hub id or path; "tiny" = random tiny config).')
    init_from: str | None = _f(None, "Checkpoint to warm-start from (stage-1 run for stage 2, a BLIP-2 model for fine-tuning). Absent: the workspace's latest.")
    num_query_tokens: int = _f(32, "Learned query tokens; also the number of soft visual tokens given to the LLM.")
    image_size: int | None = _f(None, "Square input resolution in pixels; absent = the image encoder's own (224 for EVA ViT-g / CLIP ViT-L; an hf: model's preprocessor_config.json). Position embeddings are interpolated when it differs from the encoder's.")
    image_mean: tuple[float, float, float] | None = _f(None, "Per-channel normalisation mean; absent = the encoder's own (CLIP's for EVA / CLIP ViT-L, the paper's; an hf: model's image processor; an open_clip tag's).")
    image_std: tuple[float, float, float] | None = _f(None, "Per-channel normalisation std; absent = the encoder's own (as image_mean).")
    image_resize: str | None = _f(None, 'Eval-time resize: "square" (resize to image_size x image_size, nothing cut: BLIP-2) or "shortest_edge" (shorter side scaled, then center crop: CLIP/DINOv2 style); absent = the encoder\'s own. Training always uses a random resized crop.')
    image_interpolation: str | None = _f(None, "Resampling filter: nearest | bilinear | bicubic | lanczos; absent = the encoder's own (bicubic for BLIP-2).")
    vision_feature_layer: int | None = _f(None, "Hidden layer of the image encoder the Q-Former reads (-1 last block, -2 penultimate); absent = per family: -2 for EVA / CLIP (the paper), -1 for others (DINOv2, SigLIP...).")
    freeze_vision: bool = _f(True, "Keep the image encoder frozen (in eval mode, under no_grad).")
    vision_precision: str = _f("fp16", "Storage dtype of the image encoder: fp16 (LAVIS, frozen only), bf16 or fp32 (needed when it trains).")
    freeze_llm: bool = _f(True, "Keep the LLM frozen (BLIP-2 always does).")
    llm_precision: str = _f("fp16", "Storage dtype of the frozen LLM: fp16 for OPT, bf16 for FlanT5 (LAVIS).")
    qformer_text_input: bool = _f(False, "Also feed the text (the VQA question) to the Q-Former, so the queries attend to it (the paper's VQA fine-tuning). Not implemented yet: true is refused.")
    prompt: str = _f("", 'Text the LLM output continues during training and generation (captioning: "a photo of"); stored in the checkpoint as its caption prompt.')


@dataclass
class LossSection:
    itc: float = _f(1.0, "Weight of image-text contrastive loss (stage 1 and retrieval); 0 switches it off.")
    itm: float = _f(1.0, "Weight of image-text matching loss with hard negatives; 0 switches it off.")
    itg: float = _f(1.0, "Weight of image-grounded text generation loss; 0 switches it off (the paper's ITC+ITM ablation).")
    itc_label_smoothing: float = _f(0.1, "Label smoothing of both ITC cross-entropies (LAVIS 0.1; the paper does not mention it: 0.0).")
    itg_label_smoothing: float = _f(0.1, "Label smoothing of the ITG cross-entropy (LAVIS 0.1; paper-literal 0.0).")
    temp_init: float = _f(0.07, "Initial value of the learnable ITC temperature.")
    temp_clamp: tuple[float, float] | None = _f(None, "Clamp the temperature to [lo, hi] after each step, e.g. [0.001, 0.5] as BLIP/ALBEF; absent = no clamp (BLIP-2).")
    gather_with_grad: bool = _f(False, "How ITC features are gathered across ranks: false = LAVIS's no-grad concat_all_gather (a feature gets gradient only as the anchor of its own rows); true = ours, with autograd (the exact gradient of one big batch). Same loss; the paper does not say. ITM's negative images are gathered with gradient either way, as in LAVIS.")
    itg_reuses_query_pass: bool = _f(True, "ITG's text reads the queries' keys and values from the ITC query pass, as LAVIS's K/V cache does (one query path, one dropout sample, for both). false = a joint [queries ; text] pass that recomputes the query path with its own dropout sample (blip2 before this option); same loss without dropout, more Q-Former FLOPs.")
    itc_same_image_positives: bool = _f(False, "Treat every caption of the same image as a positive (soft ITC targets), as LAVIS's retrieval fine-tuning does.")


@dataclass
class OptimSection:
    lr: float = _f(1e-4, "Peak learning rate of AdamW, reached after warmup.")
    min_lr: float = _f(1e-5, "Learning rate at the end of the decay.")
    betas: tuple[float, float] = _f((0.9, 0.98), "AdamW betas; the paper uses (0.9, 0.98), LAVIS runs with the torch default (0.9, 0.999).")
    eps: float = _f(1e-8, "AdamW epsilon.")
    weight_decay: float = _f(0.05, "Decoupled weight decay; which parameters it applies to is optim.weight_decay_groups.")
    weight_decay_groups: str = _f("ours", 'Which parameters are decayed. "ours": all but biases, 0-/1-D tensors (norms), the ITC temperature and the query tokens. "lavis": LAVIS get_optimizer_params, all but 1-D tensors and biases, so the 0-D temperature and the (1, NQ, D) query tokens are decayed by accident of their shapes. The paper does not say.')
    warmup_steps: int = _f(2000, "Linear warmup steps from warmup_start_lr to lr.")
    warmup_start_lr: float = _f(1e-6, "Learning rate at step 0 of the warmup (LAVIS 1e-6).")
    schedule: str = _f("cosine", "Decay after warmup, per optimizer step: cosine | linear | constant (LAVIS decays per epoch).")
    grad_clip: float = _f(0.0, "Clip the global gradient norm to this value; 0 = off (LAVIS clips nothing).")


@dataclass
class DataSection:
    shards: list[str] = _f([], 'WebDataset shards: paths, URLs or brace patterns ("data/cc3m-{00000..00331}.tar"); empty = the workspace\'s shards.')
    weights: list[float] = _f([], "Sampling weight per entry of shards for resampled mixtures; empty = equal weights.")
    val_shards: list[str] = _f([], "Held-out shards for validation; empty = no validation loss.")
    global_batch_size: int = _f(1680, "Samples per optimizer step over all ranks; gradients are accumulated to reach it (stage 1 with ITC/ITM: refused unless train.allow_contrastive_accumulation).")
    micro_batch_size: int = _f(105, "Samples per forward pass on one device (per-rank batch). Stage 1: ITC/ITM negatives come from micro_batch_size x processes samples.")
    num_workers: int = _f(4, "DataLoader worker processes per rank.")
    shuffle_buffer: int = _f(5000, "Samples in the in-memory shuffle buffer of each worker.")
    rrc_scale: tuple[float, float] = _f((0.5, 1.0), "Random-resized-crop area range of training images.")
    hflip: bool = _f(True, "Random horizontal flip of training images.")
    max_txt_len: int = _f(32, "Text tokens at most (captions, or questions for VQA); longer texts are truncated.")
    captions_top_k: int = _f(2, "A sample carrying CapFilt captions gets one of its top-k, chosen at random each step.")
    max_image_pixels: int = _f(0, "Images with more pixels are skipped and counted as too_large, never decoded (image bombs); 0 = the default, 50 megapixels or $BLIP2_MAX_IMAGE_PIXELS.")
    feature_cache: str = _f("", "Directory of a frozen-feature cache (`blip2 cache-features`): train from the frozen image encoder's stored outputs instead of the images (frozen encoder only; the paper's fresh crop per use becomes a draw among feature_cache_views fixed views). Empty = off.")
    feature_cache_views: int = _f(4, "Augmented views per image that `blip2 cache-features` stores (random resized crop + flip, as data.rrc_scale / data.hflip).")
    feature_cache_dtype: str = _f("fp16", "Storage dtype of cached features: fp16 | bf16 (fp32 for tests).")


@dataclass
class TrainSection:
    max_steps: int = _f(250_000, "Optimizer steps to run.")
    precision: str = _f("bf16", "Mixed precision of the trainable parts: bf16 | fp16 (with loss scaling) | fp32.")
    grad_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory: the Q-Former, the image encoder when it trains (fine-tuning at 364/490 px), the LLM when it trains.")
    compile: bool = _f(False, "Wrap the whole model in torch.compile.")
    compile_vision: bool = _f(False, "torch.compile the image encoder (trunk + ln_vision) alone; the state dict is unchanged.")
    compile_qformer: bool = _f(False, "torch.compile the Q-Former alone; the state dict is unchanged.")
    seed: int = _f(42, "Seed for weights, data order and augmentation (each rank derives its own).")
    allow_contrastive_accumulation: bool = _f(False, "Stage 1 (ITC/ITM): allow gradient accumulation, where each micro-batch's contrastive batch (negatives) is micro_batch_size x processes, not data.global_batch_size. false = refuse such a launch with one line (ITG alone accumulates freely). metrics.jsonl logs contrastive_batch and itc_negatives either way.")
    deterministic: bool = _f(False, "Deterministic kernels only (torch.use_deterministic_algorithms, warn-only): bit-identical reruns; multi-threaded CPU kernels otherwise drift by float rounding within tens of steps. Somewhat slower.")
    log_every: int = _f(50, "Steps between progress lines and metrics records.")
    save_every: int = _f(5000, "Steps between checkpoints (one is always written at the end); 0 = only at the end.")
    keep_last: int = _f(3, "Step checkpoints kept on disk; older ones are deleted after a successful save.")
    allow_schedule_change: bool = _f(False, "Resume even if train.max_steps or an optim schedule key differs from the checkpoint's (the learning-rate curve then changes mid-run); also --allow-schedule-change.")
    eval_every: int = _f(0, "Steps between validation runs (held-out loss on data.val_shards, plus eval.task if set); 0 = off.")
    loggers: list[str] = _f([], "Metric loggers besides RUN_DIR/metrics.jsonl: tensorboard, wandb (each installed separately).")
    out_dir: str | None = _f(None, "Run directory; absent = runs/<recipe name> in the workspace.")


@dataclass
class EvalSection:
    num_beams: int | None = _f(None, "Beam width of in-loop eval.task generation; absent = the protocol's (5). With eval.task set, stored in the checkpoint as its default for that kind of task (VQA or captions).")
    max_new_tokens: int | None = _f(None, "Generated tokens at most; absent = the protocol's (VQA 10, captions 30). Stored like num_beams.")
    min_new_tokens: int | None = _f(None, "Generated tokens at least; absent = the protocol's (VQA 1, captions 8). Stored like num_beams.")
    length_penalty: float | None = _f(None, "Beam-search length penalty (negative favours short answers); absent = the protocol's (paper: VQA -1, captions 1; `blip2 eval --protocol lavis`: 0 for OPT VQA). Stored like num_beams.")
    prompt_template: str = _f("", 'VQA prompt with {} for the question that this model answers to, e.g. "Question: {} Short answer:"; stored in the checkpoint, so `blip2 ask` and `blip2 eval` use it. Empty = the fine-tuned checkpoint\'s, else the protocol\'s.')
    caption_prompt: str | None = _f(None, 'Text generated captions continue (`blip2 ask`, `blip2 eval coco`), stored in the checkpoint; absent = model.prompt when set, else the fine-tuned checkpoint\'s, else the protocol\'s ("a photo of" in eval, none in ask).')
    k_test: int = _f(128, "Retrieval: ITC candidates re-ranked by ITM per query.")
    max_batches: int = _f(0, "Validation batches at most; 0 = the whole validation set.")
    task: str = _f("", "In-loop `blip2 eval` task run every train.eval_every steps (vqav2, coco, flickr30k, ...); empty = held-out loss only.")
    data: str = _f("", "Data directory of eval.task (as `blip2 eval --data`); empty = the workspace's eval/<task>.")
    limit: int = _f(200, "Items of eval.task evaluated per validation run; 0 = all.")


@dataclass
class DistSection:
    strategy: str = _f("ddp", "ddp: a full replica per process. fsdp (stage 2): PyTorch FSDP2 shards the frozen LLM and image encoder block by block, the Q-Former and the rest over the processes, for LLMs too large to replicate; with one process it trains unsharded.")
    find_unused_parameters: bool = _f(False, "DDP find_unused_parameters (needed only when a loss is switched off mid-graph).")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dist: DistSection = field(default_factory=DistSection)

    def validate(self) -> "Recipe":
        """Check values that types alone cannot; raise one Blip2Error naming the key. Returns self."""
        m, lo, o, d, t, e = self.model, self.loss, self.optim, self.data, self.train, self.eval

        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise Blip2Error(f"recipe key {key}: {why}")

        check(m.stage in STAGES, "model.stage", f"must be 1 or 2, got {m.stage}")
        check(m.task in TASKS, "model.task", f"must be one of {', '.join(TASKS)}, got {m.task!r}")
        if m.task in ("caption", "vqa"):
            check(m.stage == 2, "model.stage", f"task {m.task!r} fine-tunes a stage-2 model; set model.stage=2")
        if m.task == "retrieval":
            check(m.stage == 1, "model.stage", "task 'retrieval' fine-tunes a stage-1 model; set model.stage=1")
        if m.stage == 2:
            check(bool(m.llm), "model.llm", "stage 2 needs an LLM (opt-2.7b, flant5-xl, a hub id or a path)")
        else:
            check(m.llm is None, "model.llm", "stage-1 models have no LLM; remove the key (override: ~model.llm)")
            check(lo.itc + lo.itm + lo.itg > 0, "loss", "itc, itm and itg are all 0: nothing to train")
        check(m.num_query_tokens > 0, "model.num_query_tokens", "must be positive")
        check(not m.qformer_text_input, "model.qformer_text_input",
              "feeding the question to the Q-Former is not implemented yet; the question reaches the LLM through "
              "eval.prompt_template")
        check(m.image_size is None or m.image_size > 0, "model.image_size", "must be positive")
        check(m.image_resize in (None, *RESIZE_MODES), "model.image_resize", f"must be one of {', '.join(RESIZE_MODES)}")
        check(m.image_interpolation in (None, *INTERPOLATIONS), "model.image_interpolation",
              f"must be one of {', '.join(INTERPOLATIONS)}")
        check(m.image_std is None or all(v > 0 for v in m.image_std), "model.image_std", "must be positive")
        check(m.vision_precision in PRECISIONS, "model.vision_precision", f"must be one of {', '.join(PRECISIONS)}")
        check(m.llm_precision in PRECISIONS, "model.llm_precision", f"must be one of {', '.join(PRECISIONS)}")
        if not m.freeze_vision:
            # fp16 master weights with a GradScaler give NaN/inf (LAVIS #409): a trained encoder is fp32 or bf16.
            check(m.vision_precision != "fp16", "model.vision_precision", "a trainable image encoder must be fp32 or bf16, not fp16")

        for key in ("itc", "itm", "itg"):
            check(getattr(lo, key) >= 0, f"loss.{key}", "weights must be >= 0 (0 switches the loss off)")
        for key in ("itc_label_smoothing", "itg_label_smoothing"):
            check(0 <= getattr(lo, key) < 1, f"loss.{key}", "must be in [0, 1)")
        check(lo.temp_init > 0, "loss.temp_init", "must be positive")
        if lo.temp_clamp is not None:
            check(0 < lo.temp_clamp[0] < lo.temp_clamp[1], "loss.temp_clamp", "must be [lo, hi] with 0 < lo < hi")

        check(o.lr > 0, "optim.lr", "must be positive")
        check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}]")
        check(all(0 <= b < 1 for b in o.betas), "optim.betas", "both must be in [0, 1)")
        check(o.eps > 0, "optim.eps", "must be positive")
        check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(0 <= o.warmup_steps <= t.max_steps, "optim.warmup_steps", f"must be in [0, train.max_steps={t.max_steps}]")
        check(0 <= o.warmup_start_lr <= o.lr, "optim.warmup_start_lr", "must be in [0, optim.lr]")
        check(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
        check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
        check(o.weight_decay_groups in WEIGHT_DECAY_GROUPS, "optim.weight_decay_groups",
              f"must be one of {', '.join(WEIGHT_DECAY_GROUPS)}, got {o.weight_decay_groups!r}")

        if d.weights:
            check(len(d.weights) == len(d.shards), "data.weights", f"has {len(d.weights)} entries for {len(d.shards)} shards")
            check(all(w > 0 for w in d.weights), "data.weights", "must all be positive")
        check(d.micro_batch_size > 0, "data.micro_batch_size", "must be positive")
        check(d.global_batch_size > 0, "data.global_batch_size", "must be positive")
        # Divisibility by micro_batch_size x world size is checked at launch, when the world size is known.
        check(d.global_batch_size % d.micro_batch_size == 0, "data.global_batch_size",
              f"{d.global_batch_size} is not a multiple of data.micro_batch_size={d.micro_batch_size}")
        check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        check(0 < d.rrc_scale[0] <= d.rrc_scale[1] <= 1, "data.rrc_scale", "must be [lo, hi] with 0 < lo <= hi <= 1")
        check(d.max_txt_len > 0, "data.max_txt_len", "must be positive")
        check(d.captions_top_k > 0, "data.captions_top_k", "must be positive")
        check(d.max_image_pixels >= 0, "data.max_image_pixels", "must be >= 0 (0 = the default)")
        check(d.feature_cache_views >= 1, "data.feature_cache_views", "must be >= 1")
        check(d.feature_cache_dtype in ("fp16", "bf16", "fp32"), "data.feature_cache_dtype",
              f"must be fp16, bf16 or fp32, got {d.feature_cache_dtype!r}")
        check(not d.feature_cache or m.freeze_vision, "data.feature_cache",
              "needs model.freeze_vision=true (a trainable image encoder changes its features every step)")

        check(t.max_steps > 0, "train.max_steps", "must be positive")
        check(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
        check(t.log_every > 0, "train.log_every", "must be positive")
        check(t.save_every >= 0, "train.save_every", "must be >= 0 (0 = only at the end)")
        check(t.keep_last >= 1, "train.keep_last", "must be >= 1")
        check(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = off)")
        check(not t.allow_contrastive_accumulation or m.stage == 1, "train.allow_contrastive_accumulation",
              "applies to stage 1 (ITC/ITM) only; remove it (override: ~train.allow_contrastive_accumulation)")

        check(e.num_beams is None or e.num_beams >= 1, "eval.num_beams", "must be >= 1")
        check(e.max_new_tokens is None or e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        check(e.min_new_tokens is None or 0 <= e.min_new_tokens <= (e.max_new_tokens or e.min_new_tokens),
              "eval.min_new_tokens", "must be in [0, eval.max_new_tokens]")
        check(not e.prompt_template or e.prompt_template.count("{}") == 1, "eval.prompt_template",
              f"needs exactly one {{}} for the question, got {e.prompt_template!r}")
        check(e.k_test >= 1, "eval.k_test", "must be >= 1")
        check(e.max_batches >= 0, "eval.max_batches", "must be >= 0 (0 = all)")
        check(e.limit >= 0, "eval.limit", "must be >= 0 (0 = all)")
        check(all(name in LOGGERS for name in t.loggers), "train.loggers", f"must name only {', '.join(LOGGERS)}")
        check(self.dist.strategy in STRATEGIES, "dist.strategy", f"must be one of {', '.join(STRATEGIES)}")
        if self.dist.strategy == "fsdp":
            check(m.stage == 2, "dist.strategy", "fsdp shards stage-2 models (large frozen LLMs); train stage 1 with ddp")
            # Generation under FSDP needs every rank to run the same number of forward passes; eval.task's
            # generation does not guarantee that. The held-out loss (data.val_shards) works.
            check(not (t.eval_every and e.task), "eval.task",
                  "in-loop generation is not supported with dist.strategy=fsdp; keep the held-out loss "
                  "(data.val_shards) and run `blip2 eval` on the saved checkpoint")
        return self

    @property
    def contrastive(self) -> bool:
        """Stage 1 with ITC or ITM on: losses whose negatives are the other samples of the forward pass."""
        return self.model.stage == 1 and (self.loss.itc > 0 or self.loss.itm > 0)

    def contrastive_batch(self, world_size: int) -> int | None:
        """Samples one ITC softmax (and the ITM negative pool) spans: ``micro_batch_size x processes``.
        None when there is no contrastive loss."""
        return self.data.micro_batch_size * world_size if self.contrastive else None

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on ``world_size`` processes, or a one-line error when the global
        batch is not a multiple of ``micro_batch_size x processes``, or when a stage-1 contrastive run would
        need accumulation (each micro-batch would draw negatives from itself only) without
        ``train.allow_contrastive_accumulation``."""
        d = self.data
        per_step = d.micro_batch_size * world_size
        if d.global_batch_size % per_step:
            raise Blip2Error(
                f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                f"data.micro_batch_size x processes = {d.micro_batch_size} x {world_size}"
            )
        steps = d.global_batch_size // per_step
        if steps > 1 and self.contrastive and not self.train.allow_contrastive_accumulation:
            fixes = [f"run {d.global_batch_size // d.micro_batch_size} processes"]
            if d.global_batch_size % world_size == 0:
                fixes.insert(0, f"set data.micro_batch_size={d.global_batch_size // world_size}")
            fixes += [f"set data.global_batch_size={per_step}",
                      "accept the smaller contrastive batch with train.allow_contrastive_accumulation=true"]
            raise Blip2Error(
                f"stage 1 with ITC/ITM would accumulate gradients: data.global_batch_size={d.global_batch_size} on "
                f"{world_size} process(es) takes {steps} micro-batches of {d.micro_batch_size}, each drawing its "
                f"negatives from {per_step} samples instead of {d.global_batch_size}; {', or '.join(fixes)}"
            )
        return steps


# ------------------------------------------------------------------------------------------ schema walking


@functools.cache  # get_type_hints is slow and the schema never changes
def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe)}


@functools.cache
def schema() -> dict[str, Any]:
    """Every valid dotted key (``optim.lr``) mapped to its type annotation (read-only: cached)."""
    keys: dict[str, Any] = {}
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys[f"{section}.{f.name}"] = hints[f.name]
    return keys


def _unknown_key(key: str, source: str) -> Blip2Error:
    """An unknown-key error with the closest valid names: by spelling (``optim.lrr`` -> ``optim.lr``) and by
    leaf name in another section (``train.lr`` or ``lr`` -> ``optim.lr``)."""
    keys = list(schema())
    if "." in key:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    else:
        close = difflib.get_close_matches(key, list(_sections()), n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf + [k for k in close if k not in same_leaf]
    hint = f"; did you mean {' or '.join(close[:3])}?" if close else "; `blip2 recipes show NAME` lists the keys"
    return Blip2Error(f"{source}: unknown recipe key {key!r}{hint}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " (or absent)"
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return {int: "integer", float: "float", bool: "boolean", str: "string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` as the schema type ``tp`` or raise a one-line error. Ints widen to floats; nothing
    else is converted (a bool is not an int, a string is not a number)."""

    def bad() -> Blip2Error:
        shown = json.dumps(value) if isinstance(value, (str, list, tuple)) else repr(value)
        if isinstance(value, bool):
            shown = str(value).lower()
        return Blip2Error(f"{source}: recipe key {key} expects {_type_name(tp)}, got {shown}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):  # X | None: None only comes from defaults, never from TOML
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _coerce(value, inner, key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        try:
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
        except Blip2Error:
            raise bad() from None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        try:
            return [_coerce(v, args[0], key, source) for v in value]
        except Blip2Error:
            raise bad() from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # a bug in the schema, not user input


def _set(recipe: Recipe, key: str, value: Any, source: str) -> None:
    keys = schema()
    if key not in keys:
        raise _unknown_key(key, source)
    section, name = key.split(".", 1)
    setattr(getattr(recipe, section), name, _coerce(value, keys[key], key, source))


def _reset(recipe: Recipe, key: str, source: str) -> None:
    if key not in schema():
        raise _unknown_key(key, source)
    section, name = key.split(".", 1)
    setattr(getattr(recipe, section), name, getattr(type(getattr(recipe, section))(), name))


# ------------------------------------------------------------------------------------------ loading


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build and type-check a recipe from parsed TOML (not yet validated: overrides may still come)."""
    recipe = Recipe()
    sections = _sections()
    for section, table in data.items():
        if section not in sections:
            raise _unknown_key(section, source)
        if not isinstance(table, dict):
            raise Blip2Error(f"{source}: [{section}] must be a table, got {json.dumps(table)}")
        for name, value in table.items():
            _set(recipe, f"{section}.{name}", value, source)
    return recipe


def parse_override(text: str, tp: Any, key: str, source: str) -> Any:
    """Parse the value of ``key=value`` with TOML literal syntax (``1e-5``, ``true``, ``[0.9, 0.98]``;
    ``(0.9, 0.98)`` is accepted for tuples). Keys that expect a string take the text verbatim unless it is
    quoted, so ``model.llm=facebook/opt-2.7b`` needs no quotes and ``model.llm=1.3`` stays a string."""
    is_union = typing.get_origin(tp) in (Union, types.UnionType)
    is_str = tp is str or (is_union and str in typing.get_args(tp))
    if is_str and text[:1] not in ('"', "'"):
        return text
    if text.startswith("(") and text.endswith(")"):
        text = f"[{text[1:-1]}]"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise Blip2Error(
            f"{source}: recipe key {key} expects {_type_name(tp)}, got {text!r} (not a TOML literal)"
        ) from None


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``section.key=value`` (a leading ``--`` is accepted) and ``~section.key`` (reset to the schema
    default) in order. Modifies and returns ``recipe``; validation is the caller's (``load_recipe`` does it)."""
    keys = schema()
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if text.startswith("~"):
            _reset(recipe, text[1:].strip(), source=f"override {item!r}")
            continue
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep:
            raise Blip2Error(f"override {item!r} is not key=value (e.g. optim.lr=1e-5) or ~key")
        if key not in keys:
            raise _unknown_key(key, source=f"override {item!r}")
        value = parse_override(raw.strip(), keys[key], key, source=f"override {item!r}")
        _set(recipe, key, value, source=f"override {item!r}")
    return recipe


def find_recipe(name: str) -> Path:
    """Path of a shipped recipe by name (``pretrain_stage1_vitg``, ``.toml`` optional)."""
    stem = name[:-5] if name.endswith(".toml") else name
    path = RECIPES_DIR / f"{stem}.toml"
    if path.is_file():
        return path
    close = difflib.get_close_matches(stem, list_recipe_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see `blip2 recipes list`"
    raise Blip2Error(f"no recipe named {name!r}{hint}")


def resolve_recipe_path(path_or_name: str | Path) -> Path:
    """A path to an existing file wins; anything else is looked up among the shipped recipes."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.suffix == ".toml" and len(path.parts) > 1:  # clearly meant as a file path
        raise Blip2Error(f"recipe file {str(path)!r} does not exist")
    return find_recipe(str(path_or_name))


def load_recipe(path_or_name: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe (file path or shipped name), apply overrides, validate. Errors are one-line Blip2Errors."""
    path = resolve_recipe_path(path_or_name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise Blip2Error(f"{path}: not valid TOML: {err}") from None
    recipe = recipe_from_dict(data, source=str(path))
    apply_overrides(recipe, list(overrides or []))
    return recipe.validate()


# ------------------------------------------------------------------------------------------ TOML emitter


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-tripping form; "1e-05" and "0.1" are valid TOML floats
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string: same escapes (\" \\ \n \t \uXXXX ...).
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def recipe_to_toml(recipe: Recipe, header: str = "", comments: bool = True, marks: dict[str, str] | None = None) -> str:
    """Write ``recipe`` as TOML that ``load_recipe`` reads back equal. Unset (``None``) fields are left out,
    as TOML has no null. With ``comments``, each key gets its schema help line; ``marks`` (dotted key ->
    text, e.g. ``blip2cli.references.compare``) end the key's line as a comment."""
    lines: list[str] = [f"# {line}".rstrip() for line in header.splitlines()]
    for section in _sections():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        obj = getattr(recipe, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            mark = (marks or {}).get(f"{section}.{f.name}")
            tail = f"  # {mark}" if mark else ""
            if comments:
                lines.append(f"# {f.metadata.get('help', '')}")
            if value is None:
                lines.append(f"# {f.name} = (unset){tail}")
                continue
            lines.append(f"{f.name} = {_toml_value(value)}{tail}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ shipped recipes


@dataclass
class RecipeInfo:
    name: str
    path: Path
    description: str
    stage: int
    task: str
    vision: str
    llm: str | None


def list_recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    """Copy shipped recipe ``name`` to ``dest``: a file, or a directory (one that exists, or a path ending in
    a separator, made if needed) that gets ``NAME.toml``. An existing file is kept unless ``force``."""
    source = find_recipe(name)
    text = str(dest)
    into_directory = Path(dest).is_dir() or text.endswith(("/", os.sep))
    target = Path(dest) / source.name if into_directory else Path(dest)
    if target.is_dir():
        raise Blip2Error(f"{target} is a directory; give a file name or a directory to copy into")
    if target.exists() and not force:
        raise Blip2Error(f"{target} already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return target


def recipe_header(path: Path) -> list[str]:
    """The leading comment block of a recipe file, without the ``#``."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    return header


def list_recipes() -> list[RecipeInfo]:
    """Every shipped recipe, loaded and validated, with the first header line as its description."""
    infos = []
    for name in list_recipe_names():
        path = RECIPES_DIR / f"{name}.toml"
        recipe = load_recipe(path)
        header = recipe_header(path)
        infos.append(RecipeInfo(name, path, header[0] if header else "", recipe.model.stage, recipe.model.task,
                                recipe.model.vision, recipe.model.llm))
    return infos
