"""Build the model a recipe describes: image encoder, Q-Former (from BERT), LLM, tokenizers.

Names understood here (``[model]`` section of a recipe):

- ``vision``: any name ``blip2cli.models.vision_loading.load_vision_encoder`` takes.
- ``qformer_init``: a BERT hub id or local directory (weights + vocabulary).
- ``llm``: any name ``blip2cli.models.llm.load_language_model`` takes.
- A name whose prefix is registered in ``PART_RESOLVERS`` goes to that resolver instead: ``tiny``,
  ``tiny-opt``, ``tiny-t5`` are the random test/demo models of ``blip2cli.tiny`` (their vocabularies are
  trained on the run's captions, read from the ``BuildContext``'s shards).
- ``init_from``: a stage-1 checkpoint (stage 2 starts from its ViT, ``ln_vision``, queries and Q-Former
  query path) or a stage-2 checkpoint (fine-tuning continues from it); a run's ``step-N`` directory works too.

What the frozen parts expect is kept, and every choice is reported in ``BuiltModel.notes`` (printed when
training starts): the image preprocessing comes from the encoder (``encoder_preprocessing``) or the
``init_from`` checkpoint, recipe keys (``model.image_mean``...) override it with a line saying so; the
encoder layer the Q-Former reads is printed; the prompts, end token and generation settings the run uses
are stored in the model config (``Blip2ModelConfig.usage``) for ``ask`` and ``eval``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from blip2cli.checkpoint import load_model
from blip2cli.errors import Blip2Error
from blip2cli.models.config import Blip2ModelConfig, clean_config_dict
from blip2cli.models.llm import end_token, language_model_spec, load_language_model
from blip2cli.models.preprocessing import ImagePreprocessing, paper_preprocessing
from blip2cli.models.qformer_text import ItgHead, init_qformer_from_bert
from blip2cli.models.stage1 import (
    Blip2Stage1Model,
    Stage1LossConfig,
    build_text_embeddings,
    transfer_to_stage2,
)
from blip2cli.models.stage2 import Blip2Stage2Model
from blip2cli.recipes import Recipe

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Name prefix -> the module that builds such parts (functions ``vision``, ``qformer``, ``llm``), imported only
# when a recipe names one.
PART_RESOLVERS = {"tiny": "blip2cli.tiny.resolver"}


@dataclass
class BuiltModel:
    model: nn.Module
    qformer_tokenizer: Any = None
    llm_tokenizer: Any = None
    sources: dict[str, Any] = field(default_factory=dict)  # where the frozen parts came from
    notes: list[str] = field(default_factory=list)  # what was chosen for the user's parts, one line each


@dataclass
class BuildContext:
    """What a part resolver may read besides the recipe: the run's training shards, or the captions
    themselves (``corpus``, read from the shards on first use when None)."""

    shards: Sequence[str] = ()
    corpus: Sequence[str] | None = None


def build_model(recipe: Recipe, shards: Sequence[str] = (), corpus: Sequence[str] | None = None) -> BuiltModel:
    """The model to train for ``recipe``; ``shards``/``corpus`` are for resolvers that need the run's texts."""
    context = BuildContext(shards=shards, corpus=corpus)
    if recipe.model.stage == 1:
        return _stage1(recipe, context)
    return _stage2(recipe, context)


def _resolver(name: str | None):
    """The registered resolver module for ``name`` ("tiny-opt" -> prefix "tiny"), or None."""
    prefix = (name or "").split("-", 1)[0].split(":", 1)[0]
    module = PART_RESOLVERS.get(prefix)
    return importlib.import_module(module) if module else None


# --------------------------------------------------------------------------- parts
def _vision(recipe: Recipe, context: BuildContext) -> tuple[nn.Module, dict[str, Any], ImagePreprocessing, list[str]]:
    """The image encoder, its spec, the image preprocessing it expects (recipe overrides applied) and the
    lines that report both."""
    m = recipe.model
    resolver = _resolver(m.vision)
    if resolver is not None:
        pre, notes = _with_recipe_overrides(paper_preprocessing(m.image_size or 224), recipe)
        encoder, spec = resolver.vision(m.vision, pre.size, context)
        return encoder, spec, pre, notes
    from blip2cli.models.vision_loading import (
        describe_encoder,
        encoder_preprocessing,
        load_vision_encoder,
    )

    dtype = PRECISIONS[m.vision_precision] if m.freeze_vision else torch.float32
    try:
        pre, notes = _with_recipe_overrides(encoder_preprocessing(m.vision), recipe)
        encoder, spec = load_vision_encoder(m.vision, image_size=pre.size, dtype=dtype, feature_layer=m.vision_feature_layer)
    except (RuntimeError, OSError, ValueError) as err:
        raise Blip2Error(f"cannot load image encoder {m.vision!r}: {str(err).splitlines()[0]}") from None
    _check_patch_grid(encoder, pre.size, m.vision)
    return encoder, spec, pre, [describe_encoder(encoder, spec), *notes]


def _with_recipe_overrides(pre: ImagePreprocessing, recipe: Recipe) -> tuple[ImagePreprocessing, list[str]]:
    """``pre`` with the recipe's ``model.image_*`` keys applied; the first line says what images get."""
    m = recipe.model
    try:
        chosen, changed = pre.with_overrides(size=m.image_size, mean=m.image_mean, std=m.image_std,
                                             resize=m.image_resize, interpolation=m.image_interpolation)
    except ValueError as err:
        raise Blip2Error(f"recipe keys model.image_*: {err}") from None
    return chosen, [f"images: {chosen.describe()} ({pre.source}{', with recipe overrides' if changed else ''})",
                    *changed]


def _check_patch_grid(vision: nn.Module, image_size: int, name: str) -> None:
    from blip2cli.models.vision import vision_patch_size

    patch = vision_patch_size(vision)
    if patch and image_size % patch:
        raise Blip2Error(f"model.image_size {image_size} is not a multiple of the patch size {patch} of image encoder "
                         f"{name!r}; use {image_size // patch * patch} or {(image_size // patch + 1) * patch}")


def _preprocessing_from_checkpoint(config: Blip2ModelConfig, recipe: Recipe, source: str):
    """A warm start keeps its checkpoint's preprocessing unless recipe keys change it (fine-tuning at 364 px)."""
    pre, notes = _with_recipe_overrides(ImagePreprocessing.from_config(config, source=f"{source}'s"), recipe)
    return pre, notes


def _qformer_from_bert(init: str, vision_width: int, context: BuildContext):
    """(Blip2QFormerConfig, tokenizer with [DEC], BERT state dict or None) for stage-1-shaped Q-Formers."""
    resolver = _resolver(init)
    if resolver is not None:
        return resolver.qformer(init, vision_width, context)
    from transformers import AutoTokenizer, BertForMaskedLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(init)
        bert = BertForMaskedLM.from_pretrained(init)
    except Exception as err:
        raise Blip2Error(f"cannot load the Q-Former's BERT {init!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # LAVIS init_tokenizer
    b = bert.config
    config = Blip2QFormerConfig(
        vocab_size=len(tokenizer), hidden_size=b.hidden_size, num_hidden_layers=b.num_hidden_layers,
        num_attention_heads=b.num_attention_heads, intermediate_size=b.intermediate_size, hidden_act=b.hidden_act,
        hidden_dropout_prob=b.hidden_dropout_prob, attention_probs_dropout_prob=b.attention_probs_dropout_prob,
        max_position_embeddings=b.max_position_embeddings, layer_norm_eps=b.layer_norm_eps,
        pad_token_id=tokenizer.pad_token_id, encoder_hidden_size=vision_width, use_qformer_text_input=True,
        cross_attention_frequency=2,
        # The fresh parts (cross-attention, queries, heads) start at the BERT's own init scale (0.02 for real
        # BERTs, so unchanged there); a narrow BERT may use a wider one (blip2 demo: see demo/unimodal.py).
        initializer_range=b.initializer_range,
    )
    return config, tokenizer, bert.state_dict()


def _loss_config(recipe: Recipe) -> Stage1LossConfig:
    loss = recipe.loss
    return Stage1LossConfig(
        itc_weight=loss.itc, itm_weight=loss.itm, itg_weight=loss.itg,
        itc_label_smoothing=loss.itc_label_smoothing, itg_label_smoothing=loss.itg_label_smoothing,
        temp_clamp=tuple(loss.temp_clamp) if loss.temp_clamp else None, gather_with_grad=loss.gather_with_grad,
        image_id_positives=loss.itc_same_image_positives, itg_reuses_query_pass=loss.itg_reuses_query_pass,
    )


def _stage1(recipe: Recipe, context: BuildContext) -> BuiltModel:
    m = recipe.model
    if m.init_from:  # retrieval fine-tuning continues a stage-1 model
        loaded = load_model(m.init_from)
        if loaded.stage != 1:
            raise Blip2Error(f"{m.init_from} is a stage-{loaded.stage} checkpoint; this recipe trains stage 1")
        model = loaded.model
        _check_query_tokens(recipe, loaded.config, m.init_from)
        pre, notes = _preprocessing_from_checkpoint(loaded.config, recipe, m.init_from)
        _check_patch_grid(model.vision_model, pre.size, m.init_from)
        model.config = dataclasses.replace(model.config, **pre.config_fields())
        model.loss_config = _loss_config(recipe)
        _set_vision_trainable(model, not m.freeze_vision)
        return BuiltModel(model, qformer_tokenizer=loaded.tokenizer, sources={"init_from": m.init_from}, notes=notes)
    vision, vision_spec, pre, notes = _vision(recipe, context)
    width = vision.post_layernorm.normalized_shape[0]
    qformer_config, tokenizer, bert_state = _qformer_from_bert(m.qformer_init, width, context)
    config = Blip2ModelConfig(
        vision=vision_spec, qformer=clean_config_dict(qformer_config.to_dict()),
        num_query_tokens=m.num_query_tokens, stage=1, **pre.config_fields(),
    )
    hidden = qformer_config.hidden_size
    model = Blip2Stage1Model(
        config,
        vision_model=vision,
        qformer=Blip2QFormerModel(qformer_config),
        embeddings=build_text_embeddings(qformer_config),
        vision_projection=nn.Linear(hidden, config.image_text_hidden_size),
        text_projection=nn.Linear(hidden, config.image_text_hidden_size),
        itm_head=nn.Linear(hidden, 2),
        itg_head=ItgHead.from_qformer_config(qformer_config),
        loss_config=_loss_config(recipe),
        dec_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        temp=recipe.loss.temp_init,
        train_vision=not m.freeze_vision,
    )
    if bert_state is not None:
        init_qformer_from_bert(model, bert_state)
    return BuiltModel(model, qformer_tokenizer=tokenizer, sources={"vision": m.vision, "qformer_init": m.qformer_init},
                      notes=notes)


def _check_query_tokens(recipe: Recipe, config: Blip2ModelConfig, source: str) -> None:
    if recipe.model.num_query_tokens != config.num_query_tokens:
        raise Blip2Error(f"model.num_query_tokens = {recipe.model.num_query_tokens}, but {source} was trained with "
                         f"{config.num_query_tokens} query tokens; set model.num_query_tokens={config.num_query_tokens}")


def _llm(recipe: Recipe, context: BuildContext):
    m = recipe.model
    resolver = _resolver(m.llm)
    if resolver is not None:
        return resolver.llm(m.llm, context)
    try:
        return load_language_model(m.llm, dtype=PRECISIONS[m.llm_precision])
    except OSError as err:
        raise Blip2Error(str(err).splitlines()[0]) from None


def _stage2(recipe: Recipe, context: BuildContext) -> BuiltModel:
    m = recipe.model
    if m.init_from:
        loaded = load_model(m.init_from)
        _check_query_tokens(recipe, loaded.config, m.init_from)
        pre, notes = _preprocessing_from_checkpoint(loaded.config, recipe, m.init_from)
        _check_patch_grid(loaded.model.vision_model, pre.size, m.init_from)
        if loaded.stage == 2:  # fine-tuning: everything comes from the checkpoint
            model = loaded.model
            _set_vision_trainable(model, not m.freeze_vision)
            end = end_token(model.language_model, loaded.tokenizer)
            model.config = dataclasses.replace(model.config, **pre.config_fields(),
                                               usage=run_usage(recipe, model.config.usage, end, model.is_encoder_decoder))
            return BuiltModel(model, qformer_tokenizer=loaded.qformer_tokenizer, llm_tokenizer=loaded.tokenizer,
                              sources={"init_from": m.init_from}, notes=[*notes, *usage_notes(model.config.usage)])
        stage1, qformer_tokenizer = loaded.model, loaded.tokenizer
        sources: dict[str, Any] = {"init_from": m.init_from, "llm": m.llm}
    else:
        # Stage 2 without stage 1 (the paper's Figure 5 ablation): a fresh, BERT-initialised Q-Former.
        built = _stage1(recipe, context)
        stage1, qformer_tokenizer = built.model, built.qformer_tokenizer
        sources = {**built.sources, "llm": m.llm}
        pre, notes = built.model.config.preprocessing, built.notes
    language_model, llm_tokenizer = _llm(recipe, context)
    qformer_config = Blip2QFormerConfig(**{**stage1.qformer.config.to_dict(), "use_qformer_text_input": False})
    usage = run_usage(recipe, {}, end_token(language_model, llm_tokenizer), language_model.config.is_encoder_decoder)
    config = Blip2ModelConfig(
        vision=stage1.config.vision, qformer=clean_config_dict(qformer_config.to_dict()),
        num_query_tokens=stage1.config.num_query_tokens, text=language_model_spec(language_model), stage=2,
        usage=usage, **pre.config_fields(),
    )
    model = Blip2Stage2Model(
        config,
        vision_model=stage1.vision_model,
        qformer=Blip2QFormerModel(qformer_config),
        language_projection=nn.Linear(qformer_config.hidden_size, language_model.config.hidden_size),
        language_model=language_model,
        train_vision=not m.freeze_vision,
    )
    transfer_to_stage2(stage1, model)
    return BuiltModel(model, qformer_tokenizer=qformer_tokenizer, llm_tokenizer=llm_tokenizer, sources=sources,
                      notes=[*notes, *usage_notes(usage)])


GENERATION_KEYS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty")


def run_usage(recipe: Recipe, inherited: dict[str, Any], end: str | None, is_encoder_decoder: bool) -> dict[str, Any]:
    """``Blip2ModelConfig.usage`` for a stage-2 run: the recipe's prompts and in-loop generation settings over
    those of the checkpoint it fine-tunes (``inherited``), plus the end token its texts are trained with. The
    VQA template is always recorded (the protocol's when nothing else says): question-answer training samples
    are prompted with it."""
    from blip2cli.evaluation.tasks import (
        VQA_PROMPT_DECODER_ONLY,
        VQA_PROMPT_ENCODER_DECODER,
    )

    m, e = recipe.model, recipe.eval
    usage = {k: (dict(v) if isinstance(v, dict) else v) for k, v in inherited.items()}
    if e.prompt_template:
        usage["vqa_prompt_template"] = e.prompt_template
    usage.setdefault("vqa_prompt_template", VQA_PROMPT_ENCODER_DECODER if is_encoder_decoder else VQA_PROMPT_DECODER_ONLY)
    caption = e.caption_prompt if e.caption_prompt is not None else (m.prompt.strip() or None)
    if caption is not None:
        usage["caption_prompt"] = caption.strip()
    if end is not None:
        usage["end_token"] = end
    generation = {k: getattr(e, k) for k in GENERATION_KEYS if getattr(e, k) is not None}
    if generation and e.task:  # the settings of the in-loop task, stored for that kind of generation
        from blip2cli.evaluation.tasks import generation_kind

        kind = generation_kind(e.task)
        if kind is not None:
            stored = usage.setdefault("generation", {})
            stored[kind] = {**stored.get(kind, {}), **generation}
    return usage


def usage_notes(usage: dict[str, Any]) -> list[str]:
    """One line on what the checkpoint will remember about its use."""
    parts = []
    if usage.get("vqa_prompt_template"):
        parts.append(f"VQA prompt {usage['vqa_prompt_template']!r}")
    if usage.get("caption_prompt") is not None:
        parts.append(f"caption prompt {usage['caption_prompt']!r}")
    if usage.get("end_token") is not None:
        parts.append(f"texts end with {usage['end_token']!r}")
    for kind, values in usage.get("generation", {}).items():
        parts.append(f"{kind} generation " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return ["checkpoints will remember: " + "; ".join(parts)] if parts else []


def _set_vision_trainable(model, trainable: bool) -> None:
    from blip2cli.models.vision import trunk_parameters

    model.train_vision = trainable
    for p in trunk_parameters(model.vision_model):
        p.requires_grad_(trainable)
