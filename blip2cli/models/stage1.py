"""Stage 1: vision-language representation learning with a frozen image encoder (spec section (b)).

image -> frozen ViT -> ln_vision -> Q-Former, trained with three objectives that share the Q-Former:

- ITC (image-text contrastive): query-only pass and text-only pass; similarity = max over the queries;
- ITM (image-text matching): one bidirectional ``[queries ; text]`` pass per pair, with hard negatives
  drawn from the ITC similarities of the whole (gathered) batch;
- ITG (image-grounded text generation): a text pass under the multimodal-causal mask that reads the
  queries' keys and values of the ITC query pass (LAVIS's K/V-cache reuse, ``text_pass_over_queries``),
  text predicted by the ``ItgHead`` with ``[DEC]`` in place of ``[CLS]``. Without an ITC pass to reuse
  (ITC weight 0), one joint ``[queries ; text]`` pass computes it.

Attribute names are those of transformers' ``Blip2ForImageTextRetrieval`` (``vision_model, query_tokens,
embeddings, qformer, vision_projection, text_projection, itm_head``), so our state dict minus
``EXTRA_STATE_PREFIXES`` loads into it key for key (tests/test_stage1.py checks ITM/ITC parity).
transformers has no slot for the temperature and the ITG head: the checkpoint code keeps them aside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from blip2cli.models.base import Blip2Base
from blip2cli.models.config import Blip2ModelConfig
from blip2cli.models.losses import (
    ItcOutput,
    at_least_fp32,
    gather_no_grad,
    gather_padded,
    gather_with_grad,
    itc_loss,
    query_max_similarity,
    same_image,
    sample_hard_negatives,
)
from blip2cli.models.qformer_text import ItgHead, bidirectional_mask, multimodal_causal_mask, text_pass_over_queries
from blip2cli.models.vision import build_vision_model

IGNORE_INDEX = -100


@dataclass
class Stage1LossConfig:
    """How the stage-1 loss is put together. Defaults reproduce LAVIS ``Blip2Qformer`` (label smoothing
    0.1, no temperature clamp, no-grad ITC gather, ITM negative images gathered with gradient)."""

    # Total loss = Σ weight·loss. A weight of 0 switches that objective off and skips its computation
    # (ITC similarities are still computed, without gradient, when ITM needs them for hard negatives).
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    itg_weight: float = 1.0
    # LAVIS uses 0.1 in both; the paper mentions none (0.0 = paper-literal).
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    # (min, max) clamp applied in place to the temperature before each forward, as BLIP/ALBEF do with
    # (0.001, 0.5). None = no clamp, as in BLIP-2.
    temp_clamp: tuple[float, float] | None = None
    # How other ranks' ITC features are gathered. False (LAVIS, the default): ``concat_all_gather``, no
    # gradient, so a feature gets gradient only as the anchor of its own rows. True (ours): with autograd,
    # giving the exact gradient of one big batch of B·W. Same loss either way; the gradients differ under
    # W > 1. ITM's negative images are gathered *with* gradient in both modes, as LAVIS does
    # (``all_gather_with_grad``); ITM's negative texts are token ids, gathered as constants.
    gather_with_grad: bool = False
    # Retrieval finetuning (LAVIS commit 93e0179): samples with equal ``image_ids`` are all positives for
    # ITC (soft targets) and never drawn as ITM negatives. Needs ``image_ids`` in ``forward``; without this
    # flag ``image_ids`` is ignored (LAVIS switched on the mere presence of the key).
    image_id_positives: bool = False
    # ITG reads the queries' keys and values from the ITC query pass (LAVIS's un-detached K/V cache: one
    # query path and one dropout sample for both). False: a joint pass recomputes the query path for ITG,
    # with its own dropout sample; the same loss and gradients without dropout, more Q-Former FLOPs.
    itg_reuses_query_pass: bool = True

    def __post_init__(self):
        weights = (self.itc_weight, self.itm_weight, self.itg_weight)
        if min(weights) < 0 or max(weights) <= 0:
            raise ValueError(f"loss weights must be >= 0 with at least one > 0, got itc/itm/itg = {weights}")
        for name in ("itc_label_smoothing", "itg_label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.temp_clamp is not None:
            self.temp_clamp = tuple(float(x) for x in self.temp_clamp)
            if len(self.temp_clamp) != 2 or not 0.0 < self.temp_clamp[0] < self.temp_clamp[1]:
                raise ValueError(f"temp_clamp must be (min, max) with 0 < min < max, got {self.temp_clamp}")


def build_text_embeddings(qformer_config: Blip2QFormerConfig) -> Blip2TextEmbeddings:
    """Word + position embeddings, BERT-initialised (N(0, initializer_range), zero padding row).

    Built outside a ``PreTrainedModel`` they would get PyTorch's N(0, 1) default, 50x BERT's scale.
    """
    embeddings = Blip2TextEmbeddings(qformer_config)
    std = qformer_config.initializer_range
    with torch.no_grad():
        for table in (embeddings.word_embeddings, embeddings.position_embeddings):
            table.weight.normal_(0.0, std)
        if embeddings.word_embeddings.padding_idx is not None:
            embeddings.word_embeddings.weight[embeddings.word_embeddings.padding_idx].zero_()
    return embeddings


class Blip2Stage1Model(Blip2Base):
    """Stage 1 (representation learning): frozen image encoder + Q-Former trained with ITC, ITM and ITG.

    transformers' counterpart is ``Blip2ForImageTextRetrieval``, weight for weight: ``vision_model``,
    ``query_tokens``, ``qformer`` (its ``embeddings`` here, ``qformer.embeddings`` there), ``vision_projection``,
    ``text_projection`` and ``itm_head`` carry the same names and values (``checkpoint.py`` converts in both
    directions). What transformers has no slot for: the ITC temperature ``temp`` and the ITG language-model
    head ``itg_head`` (a checkpoint keeps them in a sidecar file), and the training losses themselves
    (transformers computes ITM/ITC scores only, no loss).
    """

    # Weights transformers' Blip2ForImageTextRetrieval has no slot for (kept in a sidecar by checkpoints).
    EXTRA_STATE_PREFIXES = ("temp", "itg_head.")

    def __init__(
        self,
        config: Blip2ModelConfig,
        vision_model: nn.Module,
        qformer: Blip2QFormerModel,
        embeddings: Blip2TextEmbeddings,
        vision_projection: nn.Linear,
        text_projection: nn.Linear,
        itm_head: nn.Linear,
        itg_head: ItgHead | None = None,
        *,
        loss_config: Stage1LossConfig | None = None,
        dec_token_id: int | None = None,
        pad_token_id: int | None = None,
        query_tokens: torch.Tensor | None = None,
        temp: float = 0.07,
        train_vision: bool = False,
    ):
        super().__init__(config, vision_model, qformer, query_tokens, train_vision=train_vision)
        if not qformer.config.use_qformer_text_input:
            raise ValueError("a stage-1 Q-Former needs use_qformer_text_input=True (text positions need an FFN)")
        self.loss_config = loss_config or Stage1LossConfig()
        if self.loss_config.itg_weight > 0 and dec_token_id is None:
            raise ValueError("ITG needs dec_token_id (the [DEC] token that replaces [CLS])")
        self.dec_token_id = dec_token_id
        self.pad_token_id = qformer.config.pad_token_id if pad_token_id is None else pad_token_id
        self.embeddings = embeddings
        self.vision_projection = vision_projection
        self.text_projection = text_projection
        self.itm_head = itm_head
        # ITC temperature: a 0-dim parameter from 0.07, as LAVIS ``self.temp``.
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.itg_head = itg_head if itg_head is not None else ItgHead.from_qformer_config(qformer.config)

    @classmethod
    def from_config(
        cls,
        config: Blip2ModelConfig,
        loss_config: Stage1LossConfig | None = None,
        dec_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> "Blip2Stage1Model":
        """Random initialisation of every part (then ``init_qformer_from_bert`` and the ViT weights)."""
        qformer_config = config.qformer_config()
        hidden, width = qformer_config.hidden_size, config.image_text_hidden_size
        return cls(
            config,
            vision_model=build_vision_model(config.vision),
            qformer=Blip2QFormerModel(qformer_config),
            embeddings=build_text_embeddings(qformer_config),
            # LAVIS leaves these at PyTorch's default Linear init.
            vision_projection=nn.Linear(hidden, width),
            text_projection=nn.Linear(hidden, width),
            itm_head=nn.Linear(hidden, 2),
            itg_head=ItgHead.from_qformer_config(qformer_config),
            loss_config=loss_config,
            dec_token_id=dec_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    # ----------------------------------------------------------------- Q-Former passes
    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass (unimodal, bidirectional over non-pad text, text FFN): (B, T, H)."""
        return self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids),
            query_length=0,
            attention_mask=attention_mask,
            return_dict=True,
        ).last_hidden_state

    def joint_hidden(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """One ``[queries ; text]`` pass, queries cross-attending to ``image_embeds``: (B, NQ + T, H).

        ``attention_mask`` is either 2-D (B, NQ + T) padding (bidirectional, ITM) or a 4-D additive mask
        (B, 1, L, L) such as ``multimodal_causal_mask`` (ITG), which the Q-Former uses unchanged.
        """
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=self.num_query_tokens,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,  # no image mask: see Blip2Base.query_outputs
            return_dict=True,
        ).last_hidden_state

    # ----------------------------------------------------------------- features and scores (also for eval)
    def image_feats(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """ln_vision features -> normalised projected query outputs (B, NQ, D)."""
        return self._project_queries(self.query_outputs(image_embeds))

    def _project_queries(self, queries: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_projection(queries.to(self.vision_projection.weight.dtype)), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised projected ``[CLS]`` output of the text-only pass: (B, D)."""
        cls = self.text_hidden(input_ids, attention_mask)[:, 0, :]
        return F.normalize(self.text_projection(cls.to(self.text_projection.weight.dtype)), dim=-1)

    def image_embeddings(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (normalised projected queries (B, NQ, D), ln_vision features (B, tokens, width)).

        The second element is what ``itm_scores`` cross-attends to (retrieval re-ranking keeps it).
        Not wrapped in ``no_grad``: callers doing inference should use ``torch.inference_mode()``.
        """
        image_embeds = self.image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.image_feats(image_embeds), image_embeds

    @staticmethod
    def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """(Ni, NQ, D) x (Nt, D) -> (Ni, Nt): max over queries of the cosine similarity, no temperature
        (transformers' ``logits_per_image`` with ``use_image_text_matching_head=False``)."""
        return query_max_similarity(image_feats, text_feats)

    def itm_scores(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Matching logits (B, 2) of paired images and texts; column 1 = "matches".

        ``itm_head`` on every query output of the bidirectional joint pass, averaged over the queries
        (head then mean, in transformers' order).
        """
        hidden = self.multimodal_embeddings(image_embeds, input_ids, attention_mask)
        return self.itm_head(hidden.to(self.itm_head.weight.dtype)).mean(dim=1)

    def multimodal_embeddings(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The query outputs of the bidirectional ``[queries ; text]`` pass (B, NQ, H): the reference feature
        extractor's ``multimodal_embeds`` (queries that have seen the image and the text), what ITM reads."""
        mask = bidirectional_mask(self.num_query_tokens, attention_mask)
        return self.joint_hidden(image_embeds, input_ids, mask)[:, : self.num_query_tokens, :]

    # ----------------------------------------------------------------- losses
    def itc(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> ItcOutput:
        return self._itc(image_embeds, input_ids, attention_mask, image_ids)[0]

    def _itc(self, image_embeds, input_ids, attention_mask, image_ids=None, keep_query_states: bool = False):
        """ITC, and with ``keep_query_states`` the query pass's per-layer inputs, for ITG to reuse."""
        cfg = self.loss_config
        batch = image_embeds.shape[0]
        query_pass = self.qformer(
            query_embeds=self.query_tokens.expand(batch, -1, -1),
            encoder_hidden_states=image_embeds,  # no image mask: see Blip2Base.query_outputs
            output_hidden_states=keep_query_states,
            return_dict=True,
        )
        itc = itc_loss(
            self._project_queries(query_pass.last_hidden_state),
            self.text_embeddings(input_ids, attention_mask),
            self.temp,
            label_smoothing=cfg.itc_label_smoothing,
            gather_with_grad=cfg.gather_with_grad,
            image_ids=image_ids,
        )
        return itc, query_pass.hidden_states if keep_query_states else None

    def itm_loss(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        itc: ItcOutput,
        image_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM with hard negatives from the global batch: pairs (text, image) for the B positives (label 1),
        each local text with a drawn negative image and each local image with a drawn negative text
        (label 0); plain cross-entropy.

        A negative that does not exist (global batch of 1) still runs, with weight 0: no host sync, and
        the shapes stay static.
        """
        batch = input_ids.shape[0]
        # With gradient whatever loss_config.gather_with_grad says: LAVIS gathers the ITM images with
        # ``all_gather_with_grad``, so an image drawn as another rank's negative sends its gradient home
        # (into ln_vision, and into the ViT when it trains).
        image_all = gather_with_grad(image_embeds)
        ids_all = gather_padded(input_ids, self.pad_token_id)
        mask_all = gather_padded(attention_mask, 0)
        # Ranks may pad their text differently; bring the local text to the gathered length.
        input_ids = _pad_right(input_ids, ids_all.shape[1], self.pad_token_id)
        attention_mask = _pad_right(attention_mask, ids_all.shape[1], 0)

        positives = same_image(image_ids, gather_no_grad(image_ids)) if image_ids is not None else None
        neg = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, positives)

        pair_images = torch.cat([image_embeds, image_all[neg.image_index], image_embeds])
        pair_ids = torch.cat([input_ids, input_ids, ids_all[neg.text_index]])
        pair_mask = torch.cat([attention_mask, attention_mask, mask_all[neg.text_index]])
        labels = torch.cat(
            [torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]
        ).to(input_ids.device)
        logits = at_least_fp32(self.itm_scores(pair_images, pair_ids, pair_mask))
        weights = torch.cat([torch.ones_like(neg.image_valid), neg.image_valid, neg.text_valid]).to(logits.dtype)
        per_pair = F.cross_entropy(logits, labels, reduction="none")
        return (per_pair * weights).sum() / weights.sum()

    def itg_loss(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_states: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """Image-grounded captioning: ``[DEC]`` replaces ``[CLS]``; every later token (``[SEP]`` included)
        is predicted from the queries and the earlier text.

        ``query_states``: the ITC query pass's per-layer inputs; the text then reads the queries' keys and
        values from them (LAVIS) instead of a joint pass recomputing the query path.
        """
        if self.dec_token_id is None:
            raise ValueError("ITG needs dec_token_id (the [DEC] token that replaces [CLS])")
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.dec_token_id
        labels = decoder_ids.masked_fill((attention_mask == 0) | (decoder_ids == self.pad_token_id), IGNORE_INDEX)
        nq = self.num_query_tokens
        mask = multimodal_causal_mask(nq, attention_mask, dtype=self.qformer.layernorm.weight.dtype)
        if query_states is None:
            hidden = self.joint_hidden(image_embeds, decoder_ids, mask)[:, nq:, :]
        else:
            text_embeds = self.embeddings(input_ids=decoder_ids)
            hidden = text_pass_over_queries(self.qformer, text_embeds, query_states, mask[:, :, nq:, :])
        # Shift: the output at position t predicts the token at t + 1. The head (vocabulary-sized) runs only
        # where that token is a label, not over the padding: LAVIS's loss, without its padded logits.
        targets = labels[:, 1:]
        labelled = targets != IGNORE_INDEX
        logits = at_least_fp32(self.itg_head(hidden[:, :-1][labelled], self.embeddings.word_embeddings.weight))
        return F.cross_entropy(logits, targets[labelled], label_smoothing=self.loss_config.itg_label_smoothing)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        vision_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The stage-1 losses: ``loss`` (weighted sum) and ``loss_itc``, ``loss_itm``, ``loss_itg``.

        ``input_ids`` are Q-Former (BERT) tokens starting with ``[CLS]``; ``image_ids`` (B,) are used only
        with ``loss_config.image_id_positives``. A switched-off loss is returned as 0 (not computed).
        ``vision_features`` replaces ``pixel_values`` with the frozen trunk's output (a feature cache).
        """
        if input_ids is None:
            raise ValueError("stage 1 needs input_ids")
        cfg = self.loss_config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cfg.image_id_positives:
            if image_ids is None:
                raise ValueError("loss_config.image_id_positives needs image_ids")
        else:
            image_ids = None
        if cfg.temp_clamp is not None:
            with torch.no_grad():
                self.temp.clamp_(*cfg.temp_clamp)

        image_embeds = self.image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                           vision_features=vision_features)
        zero = torch.zeros((), dtype=torch.float32, device=image_embeds.device)
        out = {"loss_itc": zero, "loss_itm": zero, "loss_itg": zero}
        total = zero

        itc, query_states = None, None
        if cfg.itc_weight > 0 or cfg.itm_weight > 0:
            # With ITC off, ITM still needs the similarities to draw negatives, but no gradient; ITG then
            # cannot reuse that pass (its gradient must reach the query path) and runs a joint pass.
            reuse = cfg.itg_reuses_query_pass and cfg.itc_weight > 0 and cfg.itg_weight > 0
            with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.itc_weight > 0):
                itc, query_states = self._itc(image_embeds, input_ids, attention_mask, image_ids, reuse)
            if cfg.itc_weight > 0:
                out["loss_itc"] = itc.loss
                total = total + cfg.itc_weight * itc.loss
        if cfg.itm_weight > 0:
            out["loss_itm"] = self.itm_loss(image_embeds, input_ids, attention_mask, itc, image_ids)
            total = total + cfg.itm_weight * out["loss_itm"]
        if cfg.itg_weight > 0:
            out["loss_itg"] = self.itg_loss(image_embeds, input_ids, attention_mask, query_states)
            total = total + cfg.itg_weight * out["loss_itg"]
        out["loss"] = total
        return out


def _pad_right(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if tensor.shape[1] >= length:
        return tensor
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value)


# --------------------------------------------------------------------------------------------- stage 1 -> 2
# Keys a stage-2 model takes from stage 1: the frozen ViT with ln_vision, the queries, and the query path
# of the Q-Former (LAVIS blip2_opt.py L78-83 drops the rest).
_STAGE2_PREFIXES = ("vision_model.", "query_tokens", "qformer.")
_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
# ... and exactly these are left behind.
_STAGE2_UNUSED = re.compile(
    r"^(embeddings\.|vision_projection\.|text_projection\.|itm_head\.|itg_head\.|temp$"
    r"|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)


class Stage2Transfer(NamedTuple):
    loaded: list[str]  # stage-1 keys copied into stage 2
    unused: list[str]  # stage-1 keys stage 2 has no use for (all expected ones)


def stage2_state_from_stage1(stage1_state: dict[str, torch.Tensor]) -> Stage2Transfer:
    """Split a stage-1 state dict into what stage 2 loads and what it drops; raise on anything unforeseen."""
    loaded = [k for k in stage1_state if k.startswith(_STAGE2_PREFIXES) and not _TEXT_FFN.match(k)]
    kept = set(loaded)
    unused = [k for k in stage1_state if k not in kept]
    unexpected = [k for k in unused if not _STAGE2_UNUSED.match(k)]
    if unexpected:
        raise ValueError(f"stage-1 keys with no place in stage 2: {unexpected}")
    return Stage2Transfer(loaded, unused)


@torch.no_grad()
def transfer_to_stage2(stage1_model: Blip2Stage1Model, stage2_model: nn.Module) -> Stage2Transfer:
    """Copy vision model (incl. ``post_layernorm``), query tokens and the Q-Former query path from a stage-1
    model into a ``Blip2Stage2Model`` (Q-Former with ``use_qformer_text_input=False``), in place.

    Asserts that every vision/query/Q-Former weight of stage 2 is filled and that exactly the text FFNs,
    text embeddings, projections, ``itm_head``, ``temp`` and ``itg_head`` are left unused.
    """
    state = stage1_model.state_dict()
    transfer = stage2_state_from_stage1(state)
    result = stage2_model.load_state_dict({k: state[k] for k in transfer.loaded}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"stage 2 has no place for stage-1 keys: {result.unexpected_keys}")
    missing = [k for k in result.missing_keys if k.startswith(_STAGE2_PREFIXES)]
    if missing:
        raise ValueError(f"stage-1 model lacks stage-2 keys: {missing}")
    return transfer
