"""Loading the frozen language model of stage 2, with BLIP-2's adjustments (spec sections (c), (i)).

``load_language_model`` takes a preset name (``opt-2.7b``...), a hub id or a local directory and returns
a frozen, eval-mode ``(model, tokenizer)`` pair. Decoder-only vs encoder-decoder is read from the config
(``is_encoder_decoder``), so OPT, Llama/Qwen/SmolLM-style causal LMs and T5/FlanT5 all load the same way.

Adjustments, all applied to the *config* so that ``language_model_spec`` carries them into checkpoints:

- **OPT end of text is "\\n".** BLIP-2 trains OPT to end captions with "\\n" and stops generation on it
  (LAVIS ``blip2_opt.py``; the hub ``Salesforce/blip2-opt-*`` text configs store ``eos_token_id=50118``).
  The family is detected from ``config.model_type == "opt"``, not from the tokenizer: GPT-2-BPE models
  (GPT-2, GPT-J) share OPT's vocabulary but not BLIP-2's convention. Other causal LMs keep their
  own EOS unless ``newline_eos=True``. ``end_token(model, tokenizer)`` gives the text to append to
  training captions so training and generation agree.
- **T5 exact GELU.** FlanT5 (and T5 v1.1) configs say ``feed_forward_proj="gated-gelu"``, which
  transformers maps to ``dense_act_fn="gelu_new"`` (tanh approximation). LAVIS ``blip2_t5.py`` overrides
  it with ``"gelu"`` (exact erf GELU) and transformers' BLIP-2 converter does the same, so the released
  FlanT5 BLIP-2 Q-Formers were trained against exact GELU. We therefore switch any gated-GELU T5-family
  config to ``"gelu"`` (``t5_exact_gelu=False`` keeps the stock activation). The numeric effect is small
  (the two GELUs differ by at most ~5e-4) but it is needed for parity with LAVIS and hub checkpoints.
  Original T5 (``"relu"``) is left alone.
- **T5 ``bos_token_id``.** v5 ``T5Config`` has no such field, but transformers' Blip2 ``generate`` builds
  ``[<image>]*NQ + [bos]`` when given no text and fails without it. We set it to the EOS id (1), as the
  converter does (hub ``blip2-flan-t5-xl``: bos 1): an empty T5 encoder text is exactly ``"</s>"``.
- **Tokenizers.** Decoder-only tokenizers default to ``padding_side="left"`` (batched generation). The
  batch builders in ``blip2cli.models.text`` pass the padding side explicitly on every call (right for
  training, left for generation), so the default never leaks into training batches. A tokenizer without
  a pad token (Llama-style) gets its EOS as pad; labels are masked from the attention mask, never by
  comparing ids with the pad id, so pad == EOS is safe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedConfig

from blip2cli import hub
from blip2cli.models.config import clean_config_dict

# Short names for the LLMs BLIP-2 was released with. Anything else is passed through as a hub id or path.
LLM_PRESETS: dict[str, str] = {
    "opt-2.7b": "facebook/opt-2.7b",
    "opt-6.7b": "facebook/opt-6.7b",
    "flant5-xl": "google/flan-t5-xl",
    "flant5-xxl": "google/flan-t5-xxl",
}

# LAVIS's precisions for the frozen LLM (spec (c)); a recipe may pass them as ``dtype``.
LAVIS_DTYPES: dict[str, torch.dtype] = {"opt": torch.float16, "t5": torch.bfloat16}

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


class LanguageModelUnavailable(OSError):
    """The language model's files cannot be found (offline, missing directory, unknown id)."""


def resolve_language_model(name_or_path: str | os.PathLike) -> str:
    """Preset name -> hub id; hub ids and paths unchanged."""
    name = str(name_or_path)
    return LLM_PRESETS.get(name, name)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """``None``/"auto" -> "auto" (the checkpoint's stored dtype, transformers v5's default)."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPE_NAMES))} or 'auto'") from None


def is_opt_family(config: PreTrainedConfig) -> bool:
    return getattr(config, "model_type", None) == "opt"


def newline_token_id(tokenizer) -> int:
    """The id of "\\n" (50118 for OPT). It must be a single token for the end-of-text convention."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"'\\n' is not a single token for this tokenizer ({ids}); it cannot end captions")
    return ids[0]


def end_token(model_or_config, tokenizer) -> str:
    """Text appended to training captions: "\\n" when generation stops on "\\n" (OPT), else the EOS token."""
    config = getattr(model_or_config, "config", model_or_config)
    if config.is_encoder_decoder:
        return ""  # the T5 tokenizer appends </s> itself
    generation = getattr(model_or_config, "generation_config", None)
    eos = generation.eos_token_id if generation is not None else config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    try:
        if newline_token_id(tokenizer) in eos_ids:
            return "\n"
    except ValueError:
        pass
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token and generation does not stop on '\\n'")
    return tokenizer.eos_token


def stop_token_ids(language_model, tokenizer, end: str | None) -> list[int] | None:
    """Token ids that end generation: the LLM's own EOS ids plus the token its stage-2 training texts ended
    with (``end``, stored in the checkpoint). Without the latter, a model trained to end with its tokenizer's
    EOS, where the LLM's generation config names another one (chat models), would never stop. None for
    encoder-decoder LLMs (their EOS is their own)."""
    if language_model.config.is_encoder_decoder:
        return None
    eos = language_model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if end:
        encoded = tokenizer(end, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(ids) or None


def adjust_language_config(
    config: PreTrainedConfig,
    tokenizer=None,
    newline_eos: bool | None = None,
    t5_exact_gelu: bool = True,
) -> PreTrainedConfig:
    """Apply BLIP-2's config adjustments in place (see the module docstring) and return ``config``.

    ``newline_eos``: None -> only for OPT; True/False forces it (needs ``tokenizer``).
    """
    if config.is_encoder_decoder:
        feed_forward = getattr(config, "feed_forward_proj", None)
        if t5_exact_gelu and feed_forward and feed_forward.endswith("gelu") and config.dense_act_fn == "gelu_new":
            config.dense_act_fn = "gelu"
        if getattr(config, "bos_token_id", None) is None:
            config.bos_token_id = config.eos_token_id
    else:
        if newline_eos is None:
            newline_eos = is_opt_family(config)
        if newline_eos:
            if tokenizer is None:
                raise ValueError("setting the end-of-text token to '\\n' needs the tokenizer")
            config.eos_token_id = newline_token_id(tokenizer)
    return config


def _prepare_tokenizer(tokenizer, config: PreTrainedConfig):
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    if not config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # generation default; training batches ask for right padding
    return tokenizer


def _sync_generation_config(model, tokenizer, newline_eos: bool) -> None:
    """A checkpoint's generation_config.json may still say eos </s>: make it follow the adjusted config.
    EOS is only touched when we changed it (OPT "\\n"): other models may list several EOS ids there."""
    generation, config = model.generation_config, model.config
    if newline_eos:
        generation.eos_token_id = config.eos_token_id
    if generation.bos_token_id is None and getattr(config, "bos_token_id", None) is not None:
        generation.bos_token_id = config.bos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _unavailable(name: str, target: str, error: Exception) -> LanguageModelUnavailable:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    shown = name if name == target else f"{name} ({target})"
    offline = " (offline mode: only local directories and models already in the Hugging Face cache load)" if (
        os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    ) else ""
    return LanguageModelUnavailable(f"cannot load language model {shown}{offline}: {reason}")


def load_language_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    newline_eos: bool | None = None,
    t5_exact_gelu: bool = True,
) -> tuple[torch.nn.Module, Any]:
    """Frozen, eval-mode ``(model, tokenizer)`` with BLIP-2's adjustments.

    ``name_or_path``: a key of ``LLM_PRESETS``, a hub id or a local directory.
    ``dtype``: torch dtype or name ("fp16", "bfloat16"...); None/"auto" keeps the checkpoint's dtype.
    (transformers keeps a few modules in fp32 regardless, e.g. T5's ``wo`` under fp16; LAVIS runs
    FlanT5 in bf16, see ``LAVIS_DTYPES``.)
    ``newline_eos``: None -> "\\n" ends text for OPT only; True/False forces it for a causal LM.
    Raises ``blip2cli.errors.ModelNotFoundError`` (one line) for a hub id that is neither reachable nor cached
    (``blip2cli.hub.require``), ``LanguageModelUnavailable`` (one line) when the files cannot be found otherwise.
    """
    name = str(name_or_path)
    target = resolve_language_model(name)
    if Path(target).expanduser().exists():
        target = str(Path(target).expanduser())
    elif target.startswith((".", "/", "~")) or target.count("/") > 1:  # a hub id has at most one "/"
        raise LanguageModelUnavailable(f"cannot load language model {name}: no such directory {target}")
    else:
        hub.require(target, "language model", name)  # offline: one line now, not minutes of retries
    try:
        config = AutoConfig.from_pretrained(target)
        tokenizer = AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError) as error:
        raise _unavailable(name, target, error) from None
    if newline_eos is None:
        newline_eos = is_opt_family(config)
    newline_eos = newline_eos and not config.is_encoder_decoder
    adjust_language_config(config, tokenizer, newline_eos=newline_eos, t5_exact_gelu=t5_exact_gelu)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(target, config=config, dtype=resolve_dtype(dtype))
    except OSError as error:
        raise _unavailable(name, target, error) from None
    _prepare_tokenizer(tokenizer, config)
    _sync_generation_config(model, tokenizer, newline_eos)
    if device is not None:
        model.to(device)
    return freeze(model), tokenizer


def language_model_spec(model_or_config) -> dict[str, Any]:
    """JSON-able config dict (``model_type`` included) from which ``AutoConfig.for_model`` rebuilds the
    LLM architecture with BLIP-2's adjustments; the format of ``Blip2ModelConfig.text``."""
    config = getattr(model_or_config, "config", model_or_config)
    spec = clean_config_dict(config.to_dict())
    spec["model_type"] = config.model_type
    return spec
