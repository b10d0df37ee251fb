"""Stage 2: the Q-Former speaks to a frozen LLM through 32 soft visual prompts.

image -> frozen ViT -> ln_vision -> Q-Former (queries only) -> ``language_projection`` -> prepended to
the LLM's input embeddings (decoder-only) or encoder input (encoder-decoder). Trainable: queries,
Q-Former, ``ln_vision``, projection. Frozen: ViT, LLM.

Unlike transformers' ``Blip2ForConditionalGeneration`` we never need ``<image>`` placeholder ids: the
visual prompts are concatenated in front of the text embeddings. The LLM sees exactly the same
embedding sequence, so logits and generated tokens are identical (see tests/test_interop.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Blip2QFormerModel, PreTrainedModel

from blip2cli.models.base import Blip2Base
from blip2cli.models.config import Blip2ModelConfig
from blip2cli.models.vision import build_vision_model

IGNORE_INDEX = -100

# Causal LMs whose ``forward`` computes logits as exactly ``lm_head(base_model(...).last_hidden_state)``
# (no logit scaling or soft-capping; checked in transformers 5.x): for these the training loss may apply the
# output layer to the labelled positions only.
PLAIN_OUTPUT_LAYER_FAMILIES = frozenset(
    {"opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "smollm3", "gpt2"}
)


class Blip2Stage2Model(Blip2Base):
    """Stage 2 (generative learning): frozen image encoder + Q-Former + projection, in front of a frozen LLM.

    transformers' counterpart is ``Blip2ForConditionalGeneration``, weight for weight: ``vision_model``,
    ``query_tokens``, ``qformer``, ``language_projection`` and ``language_model`` carry the same names; the
    loss (the LLM's language-modelling loss on the text after the query outputs) and greedy/beam ``generate``
    give the same numbers and tokens (``tests/test_interop.py``). transformers needs ``<image>`` tokens in the
    prompt where the query outputs go; this class prepends them itself, and ``checkpoint.py`` adds the token
    and ``num_query_tokens`` to an exported processor.
    """

    def __init__(
        self,
        config: Blip2ModelConfig,
        vision_model: nn.Module,
        qformer: Blip2QFormerModel,
        language_projection: nn.Linear,
        language_model: PreTrainedModel,
        query_tokens: torch.Tensor | None = None,
        train_vision: bool = False,
        train_language_model: bool = False,
    ):
        super().__init__(config, vision_model, qformer, query_tokens, train_vision=train_vision)
        if config.text is None:
            raise ValueError("a stage-2 model needs a language model config (config.text)")
        self.language_projection = language_projection
        self.language_model = language_model
        self.train_language_model = train_language_model
        if not train_language_model:
            for p in self.language_model.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_config(cls, config: Blip2ModelConfig, **kwargs) -> "Blip2Stage2Model":
        """Random initialisation of every part (tests, benchmarks, and the skeleton weights load into)."""
        qformer_config = config.qformer_config()
        text_config = config.text_config()
        auto = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
        return cls(
            config,
            vision_model=build_vision_model(config.vision),
            qformer=Blip2QFormerModel(qformer_config),
            language_projection=nn.Linear(qformer_config.hidden_size, text_config.hidden_size),
            language_model=auto.from_config(text_config),
            **kwargs,
        )

    def frozen_modules(self) -> list[nn.Module]:
        return [*super().frozen_modules(), *([] if self.train_language_model else [self.language_model])]

    def trainable_deep_modules(self) -> list[nn.Module]:
        return [*super().trainable_deep_modules(), *([self.language_model] if self.train_language_model else [])]

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_language_model:
            self.language_model.eval()
        return self

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.language_model.config.is_encoder_decoder)

    # ----------------------------------------------------------------- building blocks
    def visual_prompts(self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool = False,
                       vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, NQ, d_llm) soft prompts in the LLM's dtype (or from the frozen trunk's
        ``vision_features``, see ``image_features``)."""
        image_embeds = self.image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                           vision_features=vision_features)
        queries = self.query_outputs(image_embeds)
        prompts = self.language_projection(queries.to(self.language_projection.weight.dtype))
        return prompts.to(self.language_model.get_input_embeddings().weight.dtype)

    def _prepend_prompts(
        self,
        prompts: torch.Tensor,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_mask = torch.ones(prompts.shape[:2], dtype=torch.long, device=prompts.device)
        if input_ids is None:
            return prompts, prompt_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_embeds = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([prompts, text_embeds.to(prompts.dtype)], dim=1)
        return embeds, torch.cat([prompt_mask, attention_mask.to(prompt_mask.dtype)], dim=1)

    # ----------------------------------------------------------------- training / scoring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        return_logits: bool | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The LM loss when ``labels`` are given; logits when ``return_logits`` (default: without ``labels``).

        Decoder-only: ``input_ids``/``labels`` cover the text after the visual prompts, ``labels`` aligned
        with ``input_ids`` (-100 over prompt and padding); the query positions are masked here.
        Encoder-decoder: ``input_ids`` is the encoder's text prefix, ``labels`` the decoder targets.
        ``vision_features`` replaces ``pixel_values`` with the frozen trunk's output (a feature cache).
        Returned logits cover the query positions too (decoder-only), as transformers' do.

        Training asks for the loss alone. A decoder-only LLM then applies its output layer only where a label
        is (the caption), not over the 32 visual prompts, the text prompt and the padding as transformers
        does: the same loss and gradients (tests/test_llm_text.py), less time and no (B, L, vocab) tensor.
        """
        if return_logits is None:
            return_logits = labels is None
        prompts = self.visual_prompts(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                      vision_features=vision_features)
        embeds, mask = self._prepend_prompts(prompts, input_ids, attention_mask)
        if labels is not None and not return_logits and self._output_layer_is_plain():
            return {"loss": self._labelled_positions_loss(embeds, mask, prompts.shape[1], labels)}
        if self.is_encoder_decoder:
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
                return_dict=True,
            )
        else:
            full_labels = None
            if labels is not None:
                ignore = torch.full(prompts.shape[:2], IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
                full_labels = torch.cat([ignore, labels], dim=1)
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=full_labels, return_dict=True)
        result = {"logits": out.logits} if return_logits else {}
        if labels is not None:
            result["loss"] = out.loss
        return result

    def _output_layer_is_plain(self) -> bool:
        config = self.language_model.config
        return not config.is_encoder_decoder and config.model_type in PLAIN_OUTPUT_LAYER_FAMILIES

    def _labelled_positions_loss(
        self, embeds: torch.Tensor, mask: torch.Tensor, num_prompts: int, labels: torch.Tensor
    ) -> torch.Tensor:
        """transformers' causal-LM loss (mean next-token cross-entropy over the labelled positions, logits in
        fp32), with the output layer applied to the positions that predict a label and nowhere else."""
        hidden = self.language_model.base_model(inputs_embeds=embeds, attention_mask=mask, return_dict=True)[0]
        # Position p predicts token p + 1: the last visual prompt predicts labels[:, 0].
        predicting = hidden[:, num_prompts - 1 : -1]
        labelled = labels != IGNORE_INDEX
        logits = self.language_model.get_output_embeddings()(predicting[labelled])
        return F.cross_entropy(logits.float(), labels[labelled])

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generated token ids only (never the prompt), for both LLM families.

        Pass lengths as ``max_new_tokens``/``min_new_tokens``: they count generated tokens only, never the
        visual prompt (the LAVIS ``max_length`` trap, spec section (c)). With no text prompt the text is the
        LLM's start token, as in transformers and LAVIS.
        """
        if "max_length" in generate_kwargs or "min_length" in generate_kwargs:
            raise ValueError("use max_new_tokens/min_new_tokens: max_length would count the visual prompt")
        prompts = self.visual_prompts(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if input_ids is None:
            # An empty prompt tokenises to a single start token in both families: BOS for OPT-style LLMs,
            # ``</s>`` for T5 (whose tokenizer appends EOS and whose converted configs set bos = eos = 1).
            lm_config = self.language_model.config
            start = lm_config.bos_token_id if lm_config.bos_token_id is not None else lm_config.eos_token_id
            input_ids = torch.full((prompts.shape[0], 1), start, dtype=torch.long, device=prompts.device)
        embeds, mask = self._prepend_prompts(prompts, input_ids, attention_mask)
        beams = self._beams_sharing_prefill(embeds, generate_kwargs)
        if beams > 1:
            cache = self._prefill_once_for_beams(embeds, mask, beams)
            generate_kwargs = {**generate_kwargs, self._cache_argument(): cache}
        output = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
        if self.is_encoder_decoder:
            start = self.language_model.config.decoder_start_token_id
            if output.shape[1] > 0 and bool((output[:, 0] == start).all()):
                output = output[:, 1:]
        return output

    def _beams_sharing_prefill(self, embeds: torch.Tensor, generate_kwargs: dict[str, Any]) -> int:
        """The beam count when this generation can share one prefill between beams, else 1.

        transformers' beam search copies each input to every beam before the first forward pass, so the
        prompt (the visual prompts and the text) is encoded ``num_beams`` times over identical rows.
        Decoder-only LLMs with transformers' default cache share it instead (encoder-decoder ones already
        run their encoder once per input); any caller-chosen cache keeps the plain path.
        """
        lm_generation = self.language_model.generation_config
        beams = generate_kwargs.get("num_beams", lm_generation.num_beams) or 1
        plain = (
            self.is_encoder_decoder
            or beams <= 1
            or embeds.shape[1] < 2
            or generate_kwargs.get("do_sample", lm_generation.do_sample)
            or generate_kwargs.get("use_cache", lm_generation.use_cache) is False
            or any(k in generate_kwargs for k in ("cache", "past_key_values", "cache_implementation"))
            or lm_generation.cache_implementation is not None
        )
        return 1 if plain else int(beams)

    def _cache_argument(self) -> str:
        """The name under which the LLM and ``generate`` take a KV cache: transformers 5.24 renamed
        ``past_key_values`` to ``cache`` (keeping the old name as a deprecated alias)."""
        parameters = inspect.signature(self.language_model.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    def _prefill_once_for_beams(self, embeds: torch.Tensor, mask: torch.Tensor, beams: int):
        """The LLM's KV cache of every position but the last, computed once per input and copied to each of
        its ``beams`` rows; ``generate`` then runs only the last position, as it would after its own
        prefill. Same numbers as transformers' path up to float rounding across batch shapes (the tests
        compare generated tokens)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.language_model.config)
        extra = {}
        if "position_ids" in inspect.signature(self.language_model.forward).parameters:
            # the positions transformers' generate gives every LLM that takes them
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, :-1]
        # The base model (no LM head): the logits of these positions are never needed.
        extra[self._cache_argument()] = cache
        self.language_model.base_model(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], use_cache=True,
                                       **extra)
        cache.batch_repeat_interleave(beams)
        return cache
