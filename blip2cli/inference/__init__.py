"""Inference with a loaded checkpoint: what ``blip2 ask``, ``caption``, ``embed``, ``match`` and ``search`` run.

- ``assistant``  ``Blip2Assistant``: captions and answers for one image at a time, generation settings
                 (flags over the checkpoint's stored values over ``ASK_DEFAULTS``), devices and dtypes.
- ``inputs``     many images from folders, globs, list files and webdataset shards, as ``ImageRef``s.
- ``batch``      batched captioning / answering over many images into a resumable JSONL (or webdataset
                 shards), data-parallel under torchrun.
- ``features``   the reference feature extractor (image, text, multimodal embeddings), ITM/ITC matching,
                 embedding indexes and search.
- ``lowmem``     8-/4-bit and ``device_map="auto"`` loading of the frozen LLM for small GPUs.

Model math stays in ``blip2cli.models``; this package loads, batches, calls and writes.
"""

from blip2cli.inference.assistant import (
    ASK_DEFAULTS,
    DECODER_ONLY_TEMPLATE,
    ENCODER_DECODER_TEMPLATE,
    Blip2Assistant,
    GenerationOptions,
    conversation_prompt,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "ASK_DEFAULTS",
    "DECODER_ONLY_TEMPLATE",
    "ENCODER_DECODER_TEMPLATE",
    "Blip2Assistant",
    "GenerationOptions",
    "conversation_prompt",
    "resolve_device",
    "resolve_dtype",
]
