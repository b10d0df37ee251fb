"""The Q-Former's text side for stage 1: attention masks, the ITG (captioning) head, BERT initialisation.

transformers' ``Blip2QFormerModel`` runs any ``[queries ; text]`` sequence we give it (spec section (i)):
it owns no word embeddings (those live in ``Blip2TextEmbeddings``, attribute ``embeddings``), takes a 2-D
padding mask (bidirectional) or an already built 4-D mask (passed through unchanged), and routes the first
``query_length`` positions through cross-attention and the query FFN, the rest through the text FFN.
What it lacks for BLIP-2 stage 1 is built here:

- ``multimodal_causal_mask``: the ITG mask (queries see queries; text sees all queries + earlier text).
- ``text_pass_over_queries``: ITG as LAVIS computes it, a text-only pass whose self-attention also reads
  the keys and values of the ITC query pass (LAVIS reuses that pass's K/V cache), so the query path runs
  once for ITC and ITG. One joint pass under ``multimodal_causal_mask`` computes the same thing without
  dropout (the query rows never see text), at the cost of a second query path; it stays the fallback.
- ``ItgHead``: BERT's MLM prediction head, decoder tied to the word embeddings (LAVIS ``Qformer.cls``).
- ``init_qformer_from_bert``: load ``bert-base-uncased`` (or any BERT) into the Q-Former as LAVIS
  ``init_Qformer`` + the ``*_query`` copy in ``Blip2Qformer.__init__`` do, with every key accounted for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward
from transformers.pytorch_utils import apply_chunking_to_forward


# --------------------------------------------------------------------------------------------- masks
def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean "may attend" -> additive float mask: 0 where allowed, ``finfo(dtype).min`` elsewhere.

    Additive floats, not booleans: transformers' eager attention *adds* the mask, so a boolean 4-D mask
    only works under sdpa (spec section (i)).
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def multimodal_causal_mask(
    num_queries: int, text_attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ITG (UniLM-style) self-attention mask over ``[queries ; text]``: (B, 1, L, L), L = NQ + T.

    - query rows see every query column and no text column (queries must not read the caption);
    - text rows see every query column plus text columns at or before their own position that are not
      padding (``text_attention_mask`` == 1).

    Every row allows at least the NQ query columns, so no row is fully masked (no NaN from softmax), even
    for padded text rows, whose outputs the loss ignores anyway.
    """
    if text_attention_mask.dim() != 2:
        raise ValueError(f"text_attention_mask must be (B, T), got {tuple(text_attention_mask.shape)}")
    batch, text_len = text_attention_mask.shape
    length = num_queries + text_len
    device = text_attention_mask.device
    allowed = torch.zeros(batch, length, length, dtype=torch.bool, device=device)
    allowed[:, :, :num_queries] = True
    causal = torch.ones(text_len, text_len, dtype=torch.bool, device=device).tril()
    allowed[:, num_queries:, num_queries:] = causal[None] & text_attention_mask.bool()[:, None, :]
    return additive_mask(allowed[:, None], dtype)


def bidirectional_mask(num_queries: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """The ITM padding mask over ``[queries ; text]``: (B, NQ + T), ones for queries then the text mask.

    A 2-D mask: ``Blip2QFormerModel`` expands it into a bidirectional mask (every position sees all
    queries and all non-pad text), exactly as transformers' ``Blip2ForImageTextRetrieval`` ITM pass does.
    """
    batch = text_attention_mask.shape[0]
    queries = torch.ones(batch, num_queries, dtype=text_attention_mask.dtype, device=text_attention_mask.device)
    return torch.cat([queries, text_attention_mask], dim=1)


# --------------------------------------------------------------------------------------------- ITG text pass
def text_pass_over_queries(
    qformer: nn.Module, text_embeds: torch.Tensor, query_states: tuple[torch.Tensor, ...], text_mask: torch.Tensor
) -> torch.Tensor:
    """The text rows of the ITG pass, reading the queries of an earlier query pass instead of recomputing them.

    ``text_embeds`` (B, T, H): ``Blip2TextEmbeddings`` of the decoder ids (positions from 0, as LAVIS).
    ``query_states``: the query pass's ``hidden_states`` (``output_hidden_states=True``), whose entry ``l`` is
    layer ``l``'s input; the queries' keys and values in layer ``l`` are computed from it, with gradient, as
    LAVIS's un-detached K/V cache. In training, the queries thus carry the query pass's dropout sample, as
    in LAVIS. ``text_mask`` (B, 1, T, NQ + T): the text rows of ``multimodal_causal_mask``.
    Text rows have no cross-attention and use the text FFN, as in ``Blip2QFormerLayer``. Returns (B, T, H).
    """
    hidden = qformer.dropout(qformer.layernorm(text_embeds.to(qformer.layernorm.weight.dtype)))
    # transformers' own test (is_activation_checkpointing, named is_gradient_checkpointing before 5.2x)
    recompute = torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in qformer.modules())
    for layer, queries_in in zip(qformer.encoder.layer, query_states):
        if recompute:
            hidden = checkpoint(_text_layer, layer, hidden, queries_in, text_mask, use_reentrant=False)
        else:
            hidden = _text_layer(layer, hidden, queries_in, text_mask)
    return hidden


def _text_layer(layer: nn.Module, text: torch.Tensor, queries_in: torch.Tensor, text_mask: torch.Tensor):
    """One ``Blip2QFormerLayer`` for the text rows, attending to ``[queries ; text]``."""
    attention = layer.attention.attention
    batch, length = text.shape[:2]
    both = torch.cat([queries_in.to(text.dtype), text], dim=1)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, x.shape[1], -1, attention.attention_head_size).transpose(1, 2)

    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    context, _ = attend(
        attention,
        heads(attention.query(text)),
        heads(attention.key(both)),
        heads(attention.value(both)),
        text_mask,
        dropout=attention.attention_dropout if attention.training else 0.0,
        scaling=attention.scaling,
    )
    attended = layer.attention.output(context.reshape(batch, length, -1).contiguous(), text)
    return apply_chunking_to_forward(layer.feed_forward_chunk, layer.chunk_size_feed_forward, layer.seq_len_dim, attended)


# --------------------------------------------------------------------------------------------- ITG head
class ItgTransform(nn.Module):
    """BERT ``BertPredictionHeadTransform``: dense H->H, activation, LayerNorm."""

    def __init__(self, hidden_size: int, layer_norm_eps: float, hidden_act: str = "gelu"):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = ACT2FN[hidden_act]
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class ItgHead(nn.Module):
    """The Q-Former LM head for image-grounded text generation (BERT's MLM head, LAVIS ``Qformer.cls``).

    The decoder matrix is tied to the Q-Former word embeddings. Rather than holding a second reference to
    that weight (which would put a duplicate key in the state dict and break safetensors), ``forward``
    takes it as an argument; only ``transform.*`` and ``bias`` belong to this module. Key names mirror
    BERT's ``cls.predictions.{transform.dense, transform.LayerNorm, bias}``.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        layer_norm_eps: float = 1e-12,
        hidden_act: str = "gelu",
        initializer_range: float = 0.02,
    ):
        super().__init__()
        self.transform = ItgTransform(hidden_size, layer_norm_eps, hidden_act)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        # BERT initialisation (transformers BertPreTrainedModel._init_weights).
        nn.init.normal_(self.transform.dense.weight, std=initializer_range)
        nn.init.zeros_(self.transform.dense.bias)

    @classmethod
    def from_qformer_config(cls, config) -> "ItgHead":
        return cls(
            config.hidden_size,
            config.vocab_size,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act=config.hidden_act,
            initializer_range=config.initializer_range,
        )

    def forward(self, hidden: torch.Tensor, word_embeddings_weight: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., vocab) logits."""
        return F.linear(self.transform(hidden), word_embeddings_weight, self.bias)


# --------------------------------------------------------------------------------------------- BERT init
# Source (BERT) key patterns, after stripping a leading "bert.", and the target keys they fill. Every FFN
# goes to both the text FFN and its ``*_query`` copy (LAVIS blip2_qformer.py L75-79).
_BERT_KEY_MAP: list[tuple[str, tuple[str, ...]]] = [
    (r"embeddings\.word_embeddings\.weight", ("embeddings.word_embeddings.weight",)),
    (r"embeddings\.position_embeddings\.weight", ("embeddings.position_embeddings.weight",)),
    # BERT's embedding LayerNorm is the one applied to [queries ; text] inside Blip2QFormerModel.
    (r"embeddings\.LayerNorm\.(weight|bias)", (r"qformer.layernorm.\1",)),
    (
        r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
        (r"qformer.encoder.layer.\1.attention.attention.\2.\3",),
    ),
    (r"encoder\.layer\.(\d+)\.attention\.output\.(.+)", (r"qformer.encoder.layer.\1.attention.output.\2",)),
    (
        r"encoder\.layer\.(\d+)\.intermediate\.(.+)",
        (r"qformer.encoder.layer.\1.intermediate.\2", r"qformer.encoder.layer.\1.intermediate_query.\2"),
    ),
    (
        r"encoder\.layer\.(\d+)\.output\.(.+)",
        (r"qformer.encoder.layer.\1.output.\2", r"qformer.encoder.layer.\1.output_query.\2"),
    ),
    (r"cls\.predictions\.transform\.(.+)", (r"itg_head.transform.\1",)),
    (r"cls\.predictions\.bias", ("itg_head.bias",)),
]

# BERT keys the Q-Former has no place for. token_type_embeddings: the Q-Former adds no segment embedding
# (LAVIS loads BERT with strict=False and drops it too). decoder.*: tied to the word embeddings / bias.
_BERT_IGNORED = re.compile(
    r"^(embeddings\.token_type_embeddings\.weight|embeddings\.position_ids|pooler\..+"
    r"|cls\.predictions\.decoder\..+|cls\.seq_relationship\..+)$"
)

# Keys whose first rows come from BERT and whose extra rows (the [DEC] token) keep their initial values.
_VOCAB_ROWS = {"embeddings.word_embeddings.weight", "itg_head.bias"}


@dataclass
class BertInitReport:
    """What ``init_qformer_from_bert`` did, key by key."""

    used: list[str] = field(default_factory=list)  # BERT keys copied somewhere
    unused: list[str] = field(default_factory=list)  # BERT keys with no Q-Former slot (all expected)
    loaded: list[str] = field(default_factory=list)  # our keys written from BERT
    left_random: list[str] = field(default_factory=list)  # our keys BERT has nothing for (cross-attention...)
    extra_rows: dict[str, int] = field(default_factory=dict)  # key -> number of trailing rows kept ([DEC])


def _target_tensors(target: Any) -> dict[str, torch.Tensor]:
    """Our keys -> tensors sharing storage with the parameters (so ``copy_`` writes into the model)."""
    tensors: dict[str, torch.Tensor] = {}
    modules = [("embeddings.", target.embeddings), ("qformer.", target.qformer)]
    itg_head = getattr(target, "itg_head", None)
    if itg_head is not None:
        modules.append(("itg_head.", itg_head))
    for prefix, module in modules:
        for name, tensor in module.state_dict().items():
            tensors[prefix + name] = tensor
    return tensors


@torch.no_grad()
def init_qformer_from_bert(target: Any, bert_state_dict: dict[str, torch.Tensor]) -> BertInitReport:
    """Initialise the Q-Former text/query path from a transformers BERT state dict, in place.

    ``target`` is a ``Blip2Stage1Model`` or any object with ``embeddings`` (``Blip2TextEmbeddings``),
    ``qformer`` (``Blip2QFormerModel`` with ``use_qformer_text_input=True``) and optionally ``itg_head``.
    ``bert_state_dict`` comes from ``BertModel`` or ``BertForMaskedLM`` (keys with or without ``bert.``).

    - word + position embeddings -> ``embeddings``; embedding LayerNorm -> ``qformer.layernorm``;
    - self-attention and FFN of each layer; every FFN is also copied into ``intermediate_query`` /
      ``output_query``;
    - the MLM head (``cls.predictions``), when present and ``target`` has one, -> ``itg_head``;
    - a larger vocabulary (BERT + ``[DEC]``): BERT fills the first rows, the extra rows keep their
      current (random) values; position embeddings may be truncated to ours;
    - cross-attention has no BERT counterpart and stays as it is.

    Raises ``ValueError`` on any shape mismatch, on a BERT key with no place (another architecture, or more
    layers than the Q-Former), or when a Q-Former key other than cross-attention would stay uninitialised.
    """
    targets = _target_tensors(target)
    report = BertInitReport()
    for raw_key, source in bert_state_dict.items():
        key = raw_key[len("bert.") :] if raw_key.startswith("bert.") else raw_key
        # Original Google-converted checkpoints name LayerNorm parameters gamma/beta.
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        destinations: tuple[str, ...] = ()
        for pattern, replacements in _BERT_KEY_MAP:
            match = re.fullmatch(pattern, key)
            if match:
                destinations = tuple(match.expand(r) for r in replacements)
                break
        if destinations and destinations[0].startswith("itg_head.") and "itg_head.bias" not in targets:
            destinations = ()  # an MLM head but no ItgHead to receive it
        if not destinations:
            if _BERT_IGNORED.match(key) or key.startswith("cls.predictions."):
                report.unused.append(raw_key)
                continue
            raise ValueError(f"BERT key {raw_key!r} has no place in the Q-Former (different architecture?)")
        for dest in destinations:
            if dest not in targets:
                raise ValueError(
                    f"BERT key {raw_key!r} maps to {dest!r}, which the Q-Former lacks "
                    "(more BERT layers than Q-Former layers, or use_qformer_text_input=False?)"
                )
            _copy_into(targets[dest], source, dest, report)
            report.loaded.append(dest)
        report.used.append(raw_key)

    loaded = set(report.loaded)
    report.left_random = [k for k in targets if k not in loaded]
    has_mlm_head = any(k.removeprefix("bert.").startswith("cls.predictions.transform.") for k in report.used)
    unexpected = [
        k
        for k in report.left_random
        if ".crossattention." not in k and not (k.startswith("itg_head.") and not has_mlm_head)
    ]
    if unexpected:
        raise ValueError(f"BERT state dict leaves Q-Former keys uninitialised: {unexpected}")
    return report


def _copy_into(dest: torch.Tensor, source: torch.Tensor, name: str, report: BertInitReport) -> None:
    if name in _VOCAB_ROWS:
        rows = source.shape[0]
        if rows > dest.shape[0] or source.shape[1:] != dest.shape[1:]:
            raise ValueError(f"{name}: BERT shape {tuple(source.shape)} does not fit ours {tuple(dest.shape)}")
        dest[:rows].copy_(source)
        if dest.shape[0] > rows:
            report.extra_rows[name] = dest.shape[0] - rows
    elif name == "embeddings.position_embeddings.weight":
        # Fewer positions than BERT's 512 is fine: learned absolute positions, take the first ones.
        if source.shape[0] < dest.shape[0] or source.shape[1:] != dest.shape[1:]:
            raise ValueError(f"{name}: BERT shape {tuple(source.shape)} does not fit ours {tuple(dest.shape)}")
        dest.copy_(source[: dest.shape[0]])
    else:
        if source.shape != dest.shape:
            raise ValueError(f"{name}: BERT shape {tuple(source.shape)} != ours {tuple(dest.shape)}")
        dest.copy_(source)
