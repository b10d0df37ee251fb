"""Self-describing checkpoint directories, and transformers interop in both directions.

A blip2 checkpoint directory holds:

- ``blip2cli_config.json``   the ``Blip2ModelConfig`` (stage, encoder kind, Q-Former, LLM config...);
- ``model.safetensors``      the weights (never pickles);
- ``blip2cli_extras.safetensors``  stage-1 weights transformers has no slot for (ITC temperature, ITG head);
- tokenizer files at the root (the LLM's for stage 2, the Q-Former's BERT for stage 1; a stage-2 model's
  Q-Former tokenizer, when it has one, in ``qformer_tokenizer/``) and the image-processor settings.

A training run's ``step-N/`` directory (trainable weights only, see ``training/checkpointing.py``) loads too:
training writes ``RUN/base/`` once, a complete checkpoint of the model as built, and ``step-N/`` is read as
that base with the step's trainable weights on top (``load_model`` checks that the step belongs to that
base). A run directory itself loads as its ``final/``, or its latest step while it is still running.

When every weight fits transformers' Blip2 classes (an EVA-style ``Blip2VisionModel`` encoder), the same
directory is also a transformers checkpoint: ``config.json`` + ``processor_config.json`` are written by
transformers itself, so ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` and
``AutoProcessor`` load it unchanged. That makes ``blip2 export`` a plain save, and any transformers
BLIP-2 checkpoint (a directory or a hub id) a blip2 checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blip2cli import hub
from blip2cli.durable import replace_directory
from blip2cli.errors import CheckpointError, ModelNotFoundError
from blip2cli.hub import DEFAULT_MODEL  # noqa: F401  (re-exported)
from blip2cli.models.config import CONFIG_FILENAME, Blip2ModelConfig

EXTRAS_FILENAME = "blip2cli_extras.safetensors"
# A run's step checkpoints (written by training/checkpointing.py) and the base they are read on top of.
STEP_WEIGHTS_FILENAME = "trainable.safetensors"
STEP_STATE_FILENAME = "state.json"
RUN_BASE_DIR = "base"
RUN_BASE_ID_FILENAME = "run_base.json"
LATEST_POINTER = "latest"
WEIGHTS_FILENAME = "model.safetensors"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
IMAGE_TOKEN = "<image>"

# What a hub download fetches: configs, safetensors weights, tokenizer and processor files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "qformer_tokenizer/*"]


@dataclass
class LoadedModel:
    """A model with everything needed to feed it."""

    model: Any  # Blip2Stage1Model | Blip2Stage2Model
    config: Blip2ModelConfig
    tokenizer: Any  # the LLM's tokenizer (stage 2) or the Q-Former's BERT tokenizer (stage 1)
    image_processor: Any
    qformer_tokenizer: Any = None
    source: str = ""

    @property
    def stage(self) -> int:
        return self.config.stage


# --------------------------------------------------------------------------- locating
def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory (a run directory means its ``final/``, or its latest step while it runs), or a hub
    id fetched into the Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "final" / CONFIG_FILENAME).exists():
            return path / "final"
        if (path / LATEST_POINTER).is_file() and not (path / CONFIG_FILENAME).exists():
            step = path / (path / LATEST_POINTER).read_text().strip()
            if is_step_checkpoint(step):
                return step
        return path
    if path.is_file() and path.name == LATEST_POINTER:  # RUN/latest: the step it names
        step = path.parent / path.read_text().strip()
        if is_step_checkpoint(step):
            return step
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; --model expects a checkpoint directory or a hub id")
    name = str(name_or_path)
    if not hub.looks_like_hub_id(name):
        raise ModelNotFoundError(f"no checkpoint directory at {name}")
    return hub.fetch(name, "BLIP-2 checkpoint", allow_patterns=_HUB_PATTERNS)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def _hf_stage(hf_config: dict[str, Any]) -> int:
    architectures = hf_config.get("architectures") or []
    return 1 if any("Retrieval" in a for a in architectures) else 2


# --------------------------------------------------------------------------- loading
def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    placement: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a blip2 or transformers BLIP-2 checkpoint with zero missing or unexpected keys.

    ``dtype`` applies to the frozen parts (image encoder trunk, LLM); the Q-Former, queries, ``ln_vision``
    and projection stay fp32, as BLIP-2 keeps them.

    ``placement``: transformers ``from_pretrained`` arguments that place or quantize the weights as they are
    read (``device_map``, ``quantization_config``, ``max_memory``...; see ``blip2cli.inference.lowmem``).
    The model is then left where they put it (``dtype`` and ``device`` are not applied again). Only
    checkpoints in transformers' format take them.
    """
    path = resolve_checkpoint(name_or_path)
    if is_step_checkpoint(path):
        return _load_step(path, dtype, device, source=str(name_or_path))
    if (path / CONFIG_FILENAME).exists():
        config = Blip2ModelConfig.load(path)
    elif (path / "config.json").exists():
        hf_config = _read_json(path / "config.json")
        if hf_config.get("model_type") != "blip-2":
            raise CheckpointError(f"{path} holds a {hf_config.get('model_type')!r} model, not a BLIP-2 checkpoint")
        config = _config_from_hf_dir(path, stage=_hf_stage(hf_config))
    else:
        raise CheckpointError(f"{path} is not a BLIP-2 checkpoint (no {CONFIG_FILENAME} or config.json)")

    tokenizer, qformer_tokenizer = _load_tokenizers(path, config)
    if config.has_transformers_equivalent and (path / "config.json").exists():
        model = _load_via_transformers(path, config, tokenizer, placement)
    elif placement:
        raise CheckpointError(f"{path} is in blip2's own format; 8-/4-bit and --device-map loading read "
                              "transformers-format checkpoints (an EVA-style encoder, as `blip2 export` writes)")
    else:
        model = _load_native(path, config, tokenizer)
    if placement:
        model.eval()
    else:
        _cast_frozen_parts(model, dtype)
        model.to(device).eval()

    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        image_processor=_load_image_processor(path, config),
        qformer_tokenizer=qformer_tokenizer,
        source=str(name_or_path),
    )


# --------------------------------------------------------------------------- step checkpoints
def is_step_checkpoint(path: Path) -> bool:
    return (path / STEP_WEIGHTS_FILENAME).is_file() and (path / STEP_STATE_FILENAME).is_file()


def base_id_of(step_dir: Path) -> str | None:
    """The id of the run base a step checkpoint was trained on (None for steps from before bases existed)."""
    try:
        state = json.loads((Path(step_dir) / STEP_STATE_FILENAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return (state.get("manifest") or {}).get("base_id")


def write_run_base(run_dir: Path, model, tokenizer=None, qformer_tokenizer=None, keep_id: str | None = None) -> str:
    """Write ``RUN/base/`` (a complete checkpoint of ``model`` as built) and return its id.

    With ``keep_id`` (a resumed run's), an existing base of that id is kept as it is. Written in blip2's own
    format, which never changes ``model``; the frozen weights (most of the bytes) are written once per run."""
    import uuid

    base = Path(run_dir) / RUN_BASE_DIR
    if keep_id is not None and _read_base_id(base) == keep_id:
        return keep_id
    base_id = uuid.uuid4().hex
    save_model(model, base, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer, transformers_format=False,
               extra_files={RUN_BASE_ID_FILENAME: json.dumps({"id": base_id}) + "\n"})
    return base_id


def _read_base_id(base: Path) -> str | None:
    try:
        return json.loads((base / RUN_BASE_ID_FILENAME).read_text()).get("id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _load_step(path: Path, dtype, device, source: str) -> LoadedModel:
    """``RUN/base`` with the trainable weights of ``RUN/step-N`` on top."""
    base = path.parent / RUN_BASE_DIR
    wanted = base_id_of(path)
    if not (base / CONFIG_FILENAME).exists() or wanted is None:
        raise CheckpointError(
            f"{path} is a step checkpoint without a {RUN_BASE_DIR}/ model to read it on (a run from before blip2 "
            "wrote one); resume the run to the end and use its final/ checkpoint"
        )
    if _read_base_id(base) != wanted:
        raise CheckpointError(f"{path} was not trained on {base} (the run was restarted since); use a newer step")
    loaded = load_model(base)
    try:
        weights = load_file(path / STEP_WEIGHTS_FILENAME)
    except Exception as err:  # safetensors raises its own error types for torn files
        raise CheckpointError(f"cannot read weights in {path}: {str(err).splitlines()[0]}") from None
    params = dict(loaded.model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} weights have no place in {base} (e.g. {unknown[0]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, {base} {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    _cast_frozen_parts(loaded.model, dtype)
    loaded.model.to(device).eval()
    loaded.source = source
    return loaded


def _config_from_hf_dir(path: Path, stage: int) -> Blip2ModelConfig:
    from transformers import Blip2Config

    hf_config = Blip2Config.from_pretrained(path)
    image_size = None
    processor_file = path / "preprocessor_config.json"
    if processor_file.exists():
        size = _read_json(processor_file).get("size") or {}
        image_size = size.get("height") if isinstance(size, dict) else size
    config = Blip2ModelConfig.from_hf(hf_config, image_size=image_size)
    config.stage = stage
    if stage == 1:
        config.text = None
    return config


def _check_keys(missing, unexpected, source: Path, allowed_missing: tuple[str, ...] = ()) -> None:
    missing = [k for k in missing if not k.startswith(allowed_missing)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {sorted(unexpected)[0]})")
        raise CheckpointError(f"{source}: weights do not match the model: {'; '.join(parts)}")


def _stage_class(config: Blip2ModelConfig):
    if config.stage == 1:
        from blip2cli.models.stage1 import Blip2Stage1Model

        return Blip2Stage1Model
    from blip2cli.models.stage2 import Blip2Stage2Model

    return Blip2Stage2Model


def _skeleton(config: Blip2ModelConfig, tokenizer):
    """The model class built from ``config``. A stage-1 model gets its ``[DEC]`` (the Q-Former tokenizer's
    BOS) and pad ids, which ITG needs; without a ``[DEC]`` token it is built with ITG switched off."""
    cls = _stage_class(config)
    if config.stage != 1:
        return cls.from_config(config)
    from blip2cli.models.stage1 import Stage1LossConfig

    dec = getattr(tokenizer, "bos_token_id", None)
    loss_config = None if dec is not None else Stage1LossConfig(itg_weight=0.0)
    return cls.from_config(config, loss_config=loss_config, dec_token_id=dec,
                           pad_token_id=getattr(tokenizer, "pad_token_id", None))


def _load_via_transformers(path: Path, config: Blip2ModelConfig, tokenizer=None, placement: dict | None = None):
    """Let transformers read its own format (shards, tied weights), then adopt its modules."""
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    hf_class = Blip2ForImageTextRetrieval if config.stage == 1 else Blip2ForConditionalGeneration
    kwargs = {"dtype": torch.float32, **(placement or {})}
    try:
        hf_model, info = hf_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as err:  # torn or foreign files surface as many error types (safetensors' own included)
        raise CheckpointError(f"cannot load weights from {path}: {str(err).splitlines()[0]}") from None
    _check_keys(info["missing_keys"], info["unexpected_keys"], path)
    if info.get("mismatched_keys"):
        raise CheckpointError(f"{path}: weights with the wrong shape: {sorted(info['mismatched_keys'])[:3]}")

    if config.stage == 2:
        from blip2cli.models.stage2 import Blip2Stage2Model

        return Blip2Stage2Model(
            config,
            vision_model=hf_model.vision_model,
            qformer=hf_model.qformer,
            language_projection=hf_model.language_projection,
            language_model=hf_model.language_model,
            query_tokens=hf_model.query_tokens.data,
        )
    model = _skeleton(config, tokenizer)
    state = hf_model.state_dict()
    extras_file = path / EXTRAS_FILENAME
    if extras_file.exists():
        state.update(load_file(extras_file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A transformers retrieval checkpoint has no ITG head or temperature: those start fresh.
    allowed = () if extras_file.exists() else tuple(model.EXTRA_STATE_PREFIXES)
    _check_keys(missing, unexpected, path, allowed_missing=allowed)
    return model


def _load_native(path: Path, config: Blip2ModelConfig, tokenizer=None):
    from transformers.initialization import no_init_weights

    weights = path / WEIGHTS_FILENAME
    if not weights.exists():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILENAME}")
    with no_init_weights():
        model = _skeleton(config, tokenizer)
    if config.stage == 2:
        # Built without weight initialisation, the LLM's output layer is not tied to its input embeddings
        # yet; tie it now so the (deduplicated) saved embeddings fill both.
        model.language_model.tie_weights()
    try:
        state = load_file(weights)
        extras_file = path / EXTRAS_FILENAME
        if extras_file.exists():
            state.update(load_file(extras_file))
    except Exception as err:  # safetensors raises its own error types for torn files
        raise CheckpointError(f"cannot read weights in {path}: {err}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    _check_keys(_drop_tied(model, missing), unexpected, path)
    return model


def _drop_tied(model, missing: list[str]) -> list[str]:
    """Keys legitimately absent because they share storage with a saved key (tied LM heads)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: dict[int, str] = {}
    tied = set()
    for name, p in params.items():
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return [k for k in missing if k not in tied]


def _cast_frozen_parts(model, dtype: torch.dtype | None) -> None:
    if dtype is None or dtype == torch.float32:
        return
    from blip2cli.models.vision import trunk_parameters

    for p in trunk_parameters(model.vision_model):
        p.data = p.data.to(dtype)
    if hasattr(model, "language_model"):
        model.language_model.to(dtype)


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")


def _load_tokenizers(path: Path, config: Blip2ModelConfig):
    from transformers import AutoTokenizer

    # transformers 5 builds an empty tokenizer rather than failing when the files are absent.
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer files in {path} (looked for {', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise CheckpointError(
            f"no tokenizer found in {path} ({type(err).__name__}); a checkpoint directory must hold its tokenizer files"
        ) from None
    qformer_tokenizer = None
    if (path / QFORMER_TOKENIZER_DIR).is_dir():
        qformer_tokenizer = AutoTokenizer.from_pretrained(path / QFORMER_TOKENIZER_DIR)
    if config.text is not None and not config.is_encoder_decoder:
        tokenizer.padding_side = "left"  # batched generation continues each prompt from its last token
    return tokenizer, qformer_tokenizer


def _load_image_processor(path: Path, config: Blip2ModelConfig):
    """A blip2 checkpoint's config says how its images are prepared; a transformers-only checkpoint's
    ``preprocessor_config.json`` does."""
    from transformers import BlipImageProcessor

    if (path / CONFIG_FILENAME).exists():
        return make_image_processor(config)
    if (path / "preprocessor_config.json").exists() or (path / "processor_config.json").exists():
        try:
            return BlipImageProcessor.from_pretrained(path)
        except Exception:
            pass
    return make_image_processor(config)


def make_image_processor(config: Blip2ModelConfig):
    """The eval transform ``config`` describes: BLIP-2's square resize (``BlipImageProcessor``, what
    transformers' Blip2Processor uses), or shortest-edge resize + center crop (``CLIPImageProcessor``)."""
    from transformers import BlipImageProcessor, CLIPImageProcessor

    from blip2cli.models.preprocessing import PIL_RESAMPLE_CODES

    pre = config.preprocessing
    common = dict(image_mean=list(pre.mean), image_std=list(pre.std), resample=PIL_RESAMPLE_CODES[pre.interpolation],
                  do_convert_rgb=True)
    if pre.resize == "square":
        return BlipImageProcessor(size={"height": pre.size, "width": pre.size}, **common)
    return CLIPImageProcessor(size={"shortest_edge": pre.shortest_edge}, do_center_crop=True,
                              crop_size={"height": pre.size, "width": pre.size}, **common)


# --------------------------------------------------------------------------- saving
def save_model(
    model,
    out_dir: str | os.PathLike,
    tokenizer=None,
    image_processor=None,
    qformer_tokenizer=None,
    require_transformers_format: bool = False,
    transformers_format: bool = True,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint directory atomically: a temporary directory, fsynced, swapped into place
    (``durable.replace_directory``). ``extra_files``: more text files to put in it, {name: content}.

    Stage-2 models whose encoder transformers can hold get ``<image>`` tokens and ``num_query_tokens``
    in their processor, so transformers never silently ignores the image. ``transformers_format=False``
    writes blip2's own format only, which leaves ``model`` untouched (adding ``<image>`` resizes the LLM's
    embeddings): for a model still being trained.
    """
    config: Blip2ModelConfig = model.config
    out_dir = Path(out_dir)
    if require_transformers_format and not config.has_transformers_equivalent:
        raise CheckpointError(
            f"cannot export: a {config.vision_kind!r} vision encoder has no lossless transformers equivalent "
            "(Blip2VisionModel holds EVA-style ViTs only; CLIP ViT-L's ln_pre has no slot). "
            "The blip2 checkpoint itself remains loadable with --model."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        as_transformers = config.has_transformers_equivalent and transformers_format
        if as_transformers:
            _save_transformers_format(model, config, tmp, tokenizer)
        else:
            _save_state(model, tmp)
        config.save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if qformer_tokenizer is not None:
            qformer_tokenizer.save_pretrained(tmp / QFORMER_TOKENIZER_DIR)
        processor = image_processor or make_image_processor(config)
        processor.save_pretrained(tmp)
        if config.stage == 2 and as_transformers and tokenizer is not None:
            _save_blip2_processor(tmp, processor, tokenizer, config.num_query_tokens)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _split_extras(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    prefixes = tuple(getattr(model, "EXTRA_STATE_PREFIXES", ()))
    state = model.state_dict()
    extras = {k: v for k, v in state.items() if prefixes and k.startswith(prefixes)}
    main = {k: v for k, v in state.items() if k not in extras}
    return main, extras


def _save_state(model, directory: Path) -> None:
    main, extras = _split_extras(model)
    save_file(_dedupe_shared(model, main), directory / WEIGHTS_FILENAME)
    if extras:
        save_file({k: v.contiguous() for k, v in extras.items()}, directory / EXTRAS_FILENAME)


def _dedupe_shared(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Safetensors refuses tensors sharing memory: keep the first name of each tied parameter."""
    tied = set(state) - set(_drop_tied(model, list(state)))  # _drop_tied returns the keys that are *not* tied
    return {k: v.detach().contiguous() for k, v in state.items() if k not in tied}


def _save_transformers_format(model, config: Blip2ModelConfig, directory: Path, tokenizer) -> None:
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    if config.stage == 2 and tokenizer is not None:
        _ensure_image_token(model, config, tokenizer)
    hf_config = config.to_hf()
    hf_class = Blip2ForImageTextRetrieval if config.stage == 1 else Blip2ForConditionalGeneration
    main, extras = _split_extras(model)
    with torch.device("meta"):
        hf_model = hf_class(hf_config)
    missing, unexpected = hf_model.load_state_dict(main, strict=False, assign=True)
    # Non-persistent buffers and tied copies are not in a state dict; anything else is a bug.
    _check_keys(_drop_tied(hf_model, missing), unexpected, directory)
    hf_model.tie_weights()
    hf_model.save_pretrained(directory)
    if extras:
        save_file({k: v.detach().contiguous() for k, v in extras.items()}, directory / EXTRAS_FILENAME)


def _ensure_image_token(model, config: Blip2ModelConfig, tokenizer) -> None:
    """transformers needs an ``<image>`` id inside the LLM vocabulary to place the visual prompts."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab_rows = model.language_model.get_input_embeddings().weight.shape[0]
    if image_token_index >= vocab_rows:
        model.language_model.resize_token_embeddings(image_token_index + 1, mean_resizing=False)
        config.text = {**config.text, "vocab_size": image_token_index + 1}
    config.image_token_index = image_token_index


def _save_blip2_processor(directory: Path, image_processor, tokenizer, num_query_tokens: int) -> None:
    from transformers import Blip2Processor

    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    processor.save_pretrained(directory)
