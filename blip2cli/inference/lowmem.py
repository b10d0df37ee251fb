"""Loading large checkpoints on small GPUs: 8-/4-bit frozen LLMs and ``device_map="auto"`` offloading.

BLIP-2's big checkpoints are mostly frozen LLM (OPT-6.7B: 6.7 of 7.8B parameters; FlanT5-XXL: 11 of 12.1B).
``--quantize 8bit|4bit`` stores that LLM's linear layers in int8 (LLM.int8()) or NF4 (QLoRA's 4-bit
NormalFloat, bf16 compute) through bitsandbytes, as transformers' ``BitsAndBytesConfig`` loads them. The
image encoder, Q-Former, queries and projection stay in ``--dtype`` (they are small and their precision
matters most); ``quantize_vision=True`` (library only) quantizes the ViT's linear layers too. ``--device-map auto`` lets
accelerate place whole layers on the GPU, then the CPU, then disk (``offload_folder``), so a model larger
than GPU memory still runs, more slowly.

Both need a checkpoint in transformers' format (every released BLIP-2 checkpoint, and what ``blip2 export``
writes). bitsandbytes is an optional extra (``pip install 'blip2cli[lowmem]'``); it runs on CUDA (and
on CPUs for 8-bit in bitsandbytes >= 0.48). Memory per checkpoint and mode: ``benchmarks/lowmem.py`` and
the README.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any

import torch

from blip2cli.errors import Blip2Error

QUANTIZE_MODES = ("8bit", "4bit")
# Modules that are never quantized: everything but the frozen LLM (and, on request, the ViT).
_KEEP_FULL_PRECISION = ["qformer", "query_tokens", "language_projection", "lm_head"]


def placement_arguments(
    quantize: str | None = None,
    device_map: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    quantize_vision: bool = False,
    offload_folder: str | None = None,
) -> dict[str, Any]:
    """The ``from_pretrained`` arguments for ``load_model(..., placement=...)``; {} when neither is asked."""
    if quantize is None and device_map is None:
        if quantize_vision:
            raise Blip2Error("--quantize-vision needs --quantize 8bit or 4bit")
        return {}
    placement: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        if device_map not in ("auto", "balanced", "sequential", "cpu") and not device_map.startswith("cuda"):
            raise Blip2Error(f"unknown --device-map {device_map!r}; use auto, balanced, sequential, cpu or cuda:N")
        _require("accelerate", "--device-map")
        placement["device_map"] = device_map
        placement["offload_folder"] = offload_folder or os.path.join(tempfile.gettempdir(), "blip2-offload")
    if quantize is not None:
        if quantize not in QUANTIZE_MODES:
            raise Blip2Error(f"unknown --quantize {quantize!r}; use 8bit or 4bit")
        _require("bitsandbytes", "--quantize")
        _require("accelerate", "--quantize")
        if quantize == "4bit" and not torch.cuda.is_available():
            raise Blip2Error("--quantize 4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); try --quantize 8bit")
        from transformers import BitsAndBytesConfig

        skip = list(_KEEP_FULL_PRECISION) + ([] if quantize_vision else ["vision_model"])
        if quantize == "8bit":
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                        bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)
        placement["quantization_config"] = config
        placement.setdefault("device_map", "auto" if torch.cuda.is_available() else "cpu")
    return placement


def _require(module: str, flag: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Blip2Error(f"{flag} needs the {module} package: pip install 'blip2cli[lowmem]'")


def load_for_inference(
    model: str,
    device: torch.device,
    dtype: str = "auto",
    quantize: str | None = None,
    device_map: str | None = None,
    quantize_vision: bool = False,
):
    """``(LoadedModel, device for the inputs)``: plain ``load_model`` on ``device`` in ``dtype``, or with
    quantization / a device map, where inputs go to the device of the model's first layer."""
    from blip2cli.checkpoint import load_model
    from blip2cli.inference.assistant import resolve_dtype

    torch_dtype = resolve_dtype(dtype, device)
    if quantize is not None and dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    placement = placement_arguments(quantize, device_map, torch_dtype, quantize_vision)
    if not placement:
        return load_model(model, dtype=torch_dtype, device=device), device
    loaded = load_model(model, placement=placement)
    _trainable_parts_in_fp32(loaded.model)
    return loaded, input_device(loaded.model)


def _trainable_parts_in_fp32(model) -> None:
    """transformers casts every unquantized weight to ``dtype``; BLIP-2 keeps the parts it trains (queries,
    Q-Former, ``ln_vision``, projections) in fp32, as ``load_model`` does. Offloaded weights stay as placed."""
    from blip2cli.models.vision import trunk_parameters

    trunk = {id(p) for p in trunk_parameters(model.vision_model)}
    for name, param in model.named_parameters():
        if name.startswith("language_model.") or id(param) in trunk or param.device.type == "meta":
            continue
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def input_device(model) -> torch.device:
    """Where a placed model wants its pixel values: the device of the vision embeddings (accelerate's hooks
    move every later input), CPU when they are offloaded to disk."""
    weight = next(model.vision_model.parameters())
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def memory_footprint(model) -> dict[str, int]:
    """Bytes of parameters and buffers per top-level part (what ``benchmarks/lowmem.py`` reports)."""
    parts: dict[str, int] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        top = name.split(".", 1)[0]
        parts[top] = parts.get(top, 0) + tensor.numel() * tensor.element_size()
    parts["total"] = sum(parts.values())
    return parts
