"""How stage-2 text becomes tensors (spec sections (c), (d)): pure functions of a tokenizer and strings.

- ``decoder_only_batch``: OPT-style causal LM training batches (prompt + caption + "\\n", labels masked
  over the prompt, BOS included, and over padding), fed to ``Blip2Stage2Model.forward``.
- ``prefix_lm_split`` / ``encoder_decoder_batch``: FlanT5 prefix-LM batches (encoder prefix, decoder
  suffix) or prompt -> caption batches for finetuning and VQA.
- ``question_prompts``, ``generation_batch``, ``decode_generated``: generation inputs and outputs.
- ``normalize_caption`` / ``normalize_question``: LAVIS ``blip_caption`` / ``blip_question`` cleaning.

Every batch builder passes ``padding_side`` explicitly, so a tokenizer's default (left for decoder-only
LLMs, see ``llm.py``) never decides the layout: training pads right, decoder-only generation pads left.
Labels are masked from the attention mask rather than by comparing ids with the pad id, which stays
correct for tokenizers whose pad token is their EOS.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100

# ----------------------------------------------------------------- LAVIS text processors
_BLIP_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def normalize_caption(caption: str, max_words: int = 50, prompt: str = "") -> str:
    """LAVIS ``blip_caption``: lowercase, ``.!"()*#:;~`` -> space, collapse whitespace, keep the first
    ``max_words`` words, then prepend ``prompt`` verbatim (e.g. ``"a photo of "`` for COCO finetuning).

    Whitespace runs of any length (tabs and newlines included) collapse to one space; LAVIS collapses
    only runs of two or more, an immaterial difference for real captions.
    """
    words = _BLIP_PUNCTUATION.sub(" ", caption.lower()).split()
    return prompt + " ".join(words[:max_words])


def normalize_question(question: str, max_words: int = 50) -> str:
    """LAVIS ``blip_question``: lowercase, *remove* ``.!"()*#:;~`` (no space inserted: "what's?" ->
    "what's"), keep the first ``max_words`` words (whitespace collapsed, as in ``normalize_caption``)."""
    words = _BLIP_PUNCTUATION.sub("", question.lower()).split()
    return " ".join(words[:max_words])


def question_prompts(template: str, questions: Sequence[str]) -> list[str]:
    """VQA prompts, e.g. ``"Question: {} Short answer:"`` (LAVIS configs) or ``"Question: {} Answer:"``
    (the paper's OPT prompt). The template must contain exactly one ``{}``."""
    if template.count("{}") != 1:
        raise ValueError(f"a question template needs exactly one '{{}}': {template!r}")
    return [template.format(q) for q in questions]


# ----------------------------------------------------------------- helpers
def _per_sample(value: str | Sequence[str], n: int, what: str) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what}s for {n} texts")
    return values


def _require_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token: load it with load_language_model or set tokenizer.pad_token")


def _randint(rng: Any, low: int, high: int) -> int:
    """Uniform integer in [low, high] from a ``random.Random``, a numpy ``Generator`` or None (global)."""
    if rng is None:
        return random.randint(low, high)
    if hasattr(rng, "integers"):  # numpy.random.Generator
        return int(rng.integers(low, high + 1))
    return rng.randint(low, high)


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens LAVIS masks in front of the caption: ``len(tokenizer(prompt))``, **BOS included**.

    The prompt is right-stripped first: callers write ``"a photo of "`` so that it joins the caption
    with a space, and byte-level BPE / sentencepiece attach that space to the next word, so the joint
    text starts with exactly the tokens of ``"a photo of"``. This reproduces LAVIS, whose text processor
    prepends ``"a photo of "`` while ``model.prompt = "a photo of"`` sets the masked length.
    """
    return len(tokenizer(prompt.rstrip())["input_ids"])


# ----------------------------------------------------------------- decoder-only (OPT) training
def decoder_only_batch(
    tokenizer,
    texts: Sequence[str],
    prompt: str | Sequence[str] = "",
    max_length: int = 32,
    end_token: str = "\n",
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` for a decoder-only LLM (LAVIS ``blip2_opt.forward``).

    Each text is ``prompt + text + end_token`` (concatenated verbatim; ``end_token`` is "\\n" for OPT, see
    ``llm.end_token``), right padded to the longest, truncated to ``max_length`` tokens (a truncated
    caption loses its end token, as in LAVIS). ``labels`` equal ``input_ids`` with -100 over padding and
    over the first ``prompt_length(prompt)`` tokens, BOS included: with an empty prompt only BOS is
    masked. The visual-prompt positions are masked by ``Blip2Stage2Model`` itself. ``prompt`` may be one
    string or one per text.
    """
    _require_pad(tokenizer)
    texts = list(texts)
    prompts = _per_sample(prompt, len(texts), "prompt")
    encoded = tokenizer(
        [p + t + end_token for p, t in zip(prompts, texts)],
        padding="longest",
        truncation=True,
        max_length=max_length,
        padding_side="right",
        return_tensors="pt",
    )
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    lengths: dict[str, int] = {}
    for row, p in enumerate(prompts):
        if p not in lengths:
            lengths[p] = prompt_length(tokenizer, p)
        labels[row, : lengths[p]] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------- encoder-decoder (FlanT5) training
def prefix_lm_split(text: str, rng: Any = None) -> tuple[str, str]:
    """Split a caption for prefix-LM training: ``(prefix, suffix)`` with ``prefix + " " + suffix == text``
    for single-spaced text (the original whitespace at the cut is dropped).

    The BLIP-2 maintainers (#139): "we randomly sample a split point from position 1 to the midpoint of
    the sequence". The unit here is **words** (whitespace-separated): the prefix gets ``k`` words with
    ``k`` uniform in ``[1, n // 2]`` for an ``n``-word text, the suffix the rest, so the suffix is never
    shorter than the prefix and never empty. Words rather than tokens because a cut inside a word would
    be re-tokenised differently on each side (sentencepiece marks word starts), the split is independent
    of the tokenizer, and ``max_length`` truncation happens afterwards. Texts of fewer than two words get
    an empty prefix (the whole text is the target).

    ``rng``: ``random.Random``, ``numpy.random.Generator`` or None (the global ``random`` state).
    """
    text = text.strip()
    words = list(re.finditer(r"\S+", text))
    if len(words) < 2:
        return "", text
    k = _randint(rng, 1, len(words) // 2)
    cut = words[k].start()
    return text[:cut].rstrip(), text[cut:]


def encoder_decoder_batch(
    tokenizer,
    texts: Sequence[str],
    prompt: str | Sequence[str] | None = None,
    rng: Any = None,
    max_length: int = 32,
    max_target_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (encoder text, after the visual prompts), ``labels`` (decoder
    targets, padding -> -100) and ``decoder_attention_mask`` (LAVIS ``blip2_t5.forward``).

    ``prompt=None``: prefix LM, each text split by ``prefix_lm_split(text, rng)`` into encoder prefix and
    decoder suffix (stage-2 pretraining). A string (or one per text): the prompt is the encoder input and
    the whole text the target (caption finetuning with ``"a photo of"``, VQA with question prompts;
    ``""`` gives the encoder only ``</s>``). The T5 tokenizer appends ``</s>`` to both sides; truncation
    to ``max_length`` (targets: ``max_target_length``, default ``max_length``) keeps it.
    """
    _require_pad(tokenizer)
    texts = list(texts)
    if prompt is None:
        pairs = [prefix_lm_split(t, rng) for t in texts]
        inputs, targets = [p for p, _ in pairs], [s for _, s in pairs]
    else:
        inputs, targets = _per_sample(prompt, len(texts), "prompt"), texts
    common = dict(padding="longest", truncation=True, padding_side="right", return_tensors="pt")
    encoder = tokenizer(inputs, max_length=max_length, **common)
    decoder = tokenizer(targets, max_length=max_target_length or max_length, **common)
    labels = decoder["input_ids"].masked_fill(decoder["attention_mask"] == 0, IGNORE_INDEX)
    return {
        "input_ids": encoder["input_ids"],
        "attention_mask": encoder["attention_mask"],
        "labels": labels,
        "decoder_attention_mask": decoder["attention_mask"],
    }


# ----------------------------------------------------------------- generation
def generation_batch(
    tokenizer,
    prompts: Sequence[str],
    is_encoder_decoder: bool = False,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` of text prompts for ``Blip2Stage2Model.generate``.

    Decoder-only: left padded, so every row's last position is real text and new tokens follow it
    directly (an empty prompt is just BOS, as ``generate`` with no text). Encoder-decoder: right padded
    (the encoder is bidirectional; padding is masked). ``max_length`` truncates when given.
    """
    _require_pad(tokenizer)
    side = "right" if is_encoder_decoder else "left"
    encoded = tokenizer(
        list(prompts),
        padding="longest",
        truncation=max_length is not None,
        max_length=max_length,
        padding_side=side,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def decode_generated(tokenizer, ids: torch.Tensor | Sequence[Sequence[int]], stop_at_newline: bool = True) -> list[str]:
    """Generated ids -> stripped strings, special tokens skipped. With ``stop_at_newline`` (OPT-style,
    whose end of text is "\\n") everything from the first "\\n" on is dropped."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if stop_at_newline:
        # Leading whitespace first: an LLM whose text prior puts a line break after "Answer:" would
        # otherwise give an empty answer for "\nyes".
        texts = [t.lstrip().split("\n", 1)[0] for t in texts]
    return [t.strip() for t in texts]


@torch.no_grad()
def generate_texts(model, tokenizer, pixel_values: torch.Tensor, prompts: Sequence[str] | None,
                   end_token: str | None = None, **generate_kwargs: Any) -> list[str]:
    """One decoded output per image of a ``Blip2Stage2Model``: what ``blip2 ask``, ``blip2 caption`` and
    ``blip2 eval`` generate. ``prompts`` None or empty strings mean plain captioning (an empty prompt
    tokenises as training saw it: BOS for OPT, "</s>" for T5, nothing for LLMs whose tokenizer adds no
    BOS). Decoder-only generation stops at the LLM's EOS and at ``end_token``, the token the checkpoint's
    training texts ended with."""
    from blip2cli.models.llm import stop_token_ids

    device = pixel_values.device
    encoder_decoder = bool(model.is_encoder_decoder)
    batch = generation_batch(tokenizer, list(prompts or [""] * pixel_values.shape[0]), encoder_decoder)
    stop = stop_token_ids(model.language_model, tokenizer, end_token)
    if stop:
        generate_kwargs["eos_token_id"] = stop
    ids = model.generate(pixel_values, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                         **generate_kwargs)
    return decode_generated(tokenizer, ids, stop_at_newline=not encoder_decoder)
