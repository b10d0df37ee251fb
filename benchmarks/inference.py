"""Batched captioning vs a loop of `blip2 ask`, and quantized vs full-precision memory and speed.

    python benchmarks/inference.py                                  # tiny model, CPU (seconds)
    python benchmarks/inference.py --size small --images 16         # OPT-125M-shaped LLM, CPU (about a minute)
    python benchmarks/inference.py --size real --images 64 --modes bf16,8bit,4bit   # OPT-2.7B + ViT-g on a GPU
    python benchmarks/inference.py --json results.json              # also write the numbers
    python benchmarks/inference.py --weights-table                  # GiB of weights per released checkpoint and mode

The model has random weights built from a config (``benchmarks/generation.py``'s sizes), saved as a
transformers-format checkpoint and loaded the way the commands load it. Every caption has exactly
``--tokens`` new tokens (min = max), so the loop and the batches do the same work.

1. throughput: ``Blip2Assistant.caption`` image after image (what ``blip2 ask`` does per call, minus the
   model load) against ``run_batch`` (what ``blip2 caption`` does) at each ``--batch-sizes``; outputs are
   checked identical for greedy decoding.
2. modes: for each of ``--modes`` (fp32/bf16/fp16, 8bit, 4bit), bytes of weights per part, peak GPU
   memory while captioning, and images/s. 8bit/4bit need bitsandbytes (``pip install 'blip2cli[lowmem]'``)
   and, for 4bit, a CUDA GPU; a mode that cannot run is reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generation import build_config  # noqa: E402


def save_checkpoint(size: str, directory: Path) -> Path:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from tests import tiny

    config = build_config(size)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    tokenizer = tiny.opt_tokenizer()
    tokenizer.padding_side = "left"
    image_size = config.vision_config.image_size
    Blip2Processor(tiny.image_processor(image_size), tokenizer, num_query_tokens=config.num_query_tokens
                   ).save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def images(n: int, folder: Path) -> list[Path]:
    from tests import tiny

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(tiny.random_images(n, size=224, seed=0)):
        paths.append(folder / f"{i:04d}.png")
        image.save(paths[-1])
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(checkpoint: Path, paths: list[Path], batch_sizes: list[int], tokens: int, beams: int, device) -> dict:
    from blip2cli.checkpoint import load_model
    from blip2cli.images import load_image
    from blip2cli.inference import Blip2Assistant, resolve_dtype
    from blip2cli.inference.batch import BatchSettings, caption_jobs, run_batch
    from blip2cli.inference.inputs import collect_images

    assistant = Blip2Assistant(load_model(checkpoint, dtype=resolve_dtype("auto", device), device=device), device)
    options = assistant.resolve("caption", {"num_beams": beams, "max_new_tokens": tokens, "min_new_tokens": tokens})[1]
    assistant.caption(load_image(paths[0]), options=options)  # warm-up
    sync(device)
    start = time.perf_counter()
    loop = [assistant.caption(load_image(p), options=options) for p in paths]
    sync(device)
    loop_s = time.perf_counter() - start
    results = {"loop_of_ask": {"images_per_s": len(paths) / loop_s, "seconds": loop_s}}
    jobs = caption_jobs(collect_images([str(p) for p in paths]))
    for batch_size in batch_sizes:
        outputs: dict[str, str] = {}
        start = time.perf_counter()
        run_batch(assistant, jobs, BatchSettings("bench", "", options), None, batch_size=batch_size,
                  show_progress=False, emit=lambda r: outputs.__setitem__(r["image"], r["caption"]))
        sync(device)
        seconds = time.perf_counter() - start
        same = [outputs[str(p)] for p in paths] == loop
        results[f"batch_{batch_size}"] = {"images_per_s": len(paths) / seconds, "seconds": seconds,
                                          "speedup": loop_s / seconds, "same_outputs_as_loop": same}
    return results


def modes(checkpoint: Path, paths: list[Path], names: list[str], tokens: int, batch_size: int, device) -> dict:
    from blip2cli.errors import Blip2Error
    from blip2cli.inference import Blip2Assistant
    from blip2cli.inference.batch import BatchSettings, caption_jobs, run_batch
    from blip2cli.inference.inputs import collect_images
    from blip2cli.inference.lowmem import load_for_inference, memory_footprint

    jobs = caption_jobs(collect_images([str(p) for p in paths]))
    results = {}
    for name in names:
        quantize = name if name in ("8bit", "4bit") else None
        dtype = "auto" if quantize else {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[name]
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            loaded, input_device = load_for_inference(str(checkpoint), device, dtype, quantize=quantize)
        except Blip2Error as err:
            results[name] = {"skipped": str(err)}
            continue
        assistant = Blip2Assistant(loaded, input_device)
        options = assistant.resolve("caption", {"num_beams": 1, "max_new_tokens": tokens, "min_new_tokens": tokens})[1]
        settings = BatchSettings("bench", "", options)
        run_batch(assistant, jobs[:batch_size], settings, None, batch_size=batch_size, show_progress=False,
                  emit=lambda r: None)  # warm-up
        sync(device)
        start = time.perf_counter()
        run_batch(assistant, jobs, settings, None, batch_size=batch_size, show_progress=False, emit=lambda r: None)
        sync(device)
        seconds = time.perf_counter() - start
        footprint = memory_footprint(loaded.model)
        results[name] = {
            "weights_gib": footprint["total"] / 2**30, "llm_weights_gib": footprint.get("language_model", 0) / 2**30,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "images_per_s": len(paths) / seconds,
        }
        del assistant, loaded
    return results


# The released checkpoints' LLMs (transformers configs of the hub models, written out: nothing is downloaded).
RELEASED_LLMS = {
    "blip2-opt-2.7b": ("opt", dict(vocab_size=50304, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                                   num_attention_heads=32, word_embed_proj_dim=2560)),
    "blip2-opt-6.7b": ("opt", dict(vocab_size=50304, hidden_size=4096, num_hidden_layers=32, ffn_dim=16384,
                                   num_attention_heads=32, word_embed_proj_dim=4096)),
    "blip2-flan-t5-xl": ("t5", dict(vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                                    num_decoder_layers=24, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "blip2-flan-t5-xxl": ("t5", dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     num_decoder_layers=24, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}


def weights_table() -> dict:
    """GiB of weights per released checkpoint and mode, computed from parameter counts on the meta device:
    ViT-g trunk in bf16, Q-Former/queries/projection/ln_vision in fp32 (as blip2 loads them), and the LLM's
    linear layers (lm_head excepted) at 2 (bf16), 1 (8bit) or ~0.53 (4bit NF4 + double-quantized scales)
    bytes per weight, its other parameters in bf16. Activations and the KV cache come on top."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

    table = {}
    for name, (family, text) in RELEASED_LLMS.items():
        text_config = OPTConfig(**text) if family == "opt" else T5Config(**text)
        with torch.device("meta"):
            model = Blip2ForConditionalGeneration(Blip2Config(text_config=text_config.to_dict(), num_query_tokens=32))
        linear = {f"{n}.weight" for n, m in model.language_model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
        counts = {"vision_trunk": 0, "fp32_parts": 0, "llm_linear": 0, "llm_other": 0}
        for full, param in model.named_parameters():
            if full.startswith("language_model."):
                counts["llm_linear" if full[len("language_model."):] in linear else "llm_other"] += param.numel()
            elif full.startswith("vision_model.") and "post_layernorm" not in full:
                counts["vision_trunk"] += param.numel()
            else:
                counts["fp32_parts"] += param.numel()
        base = 2 * counts["vision_trunk"] + 4 * counts["fp32_parts"] + 2 * counts["llm_other"]
        table[name] = {"parameters_b": round(sum(counts.values()) / 1e9, 3)} | {
            mode: round((base + per_weight * counts["llm_linear"]) / 2**30, 2)
            for mode, per_weight in (("bf16_gib", 2), ("8bit_gib", 1), ("4bit_gib", 0.53))
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small", "real"), default="tiny")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-sizes", default="4,16")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--modes", default="fp32,8bit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--weights-table", action="store_true", help="Only print the computed weight memory of the "
                        "released checkpoints per mode (no model is run).")
    args = parser.parse_args()
    if args.weights_table:
        print(json.dumps(weights_table(), indent=1))
        return

    from blip2cli.cli._common import quiet_libraries
    from blip2cli.inference import resolve_device

    quiet_libraries()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(args.size, Path(tmp) / "model")
        paths = images(args.images, Path(tmp) / "images")
        report = {
            "size": args.size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "images": args.images, "tokens": args.tokens, "beams": args.beams,
            "throughput": throughput(checkpoint, paths, [int(b) for b in args.batch_sizes.split(",")], args.tokens,
                                     args.beams, device),
            "modes": modes(checkpoint, paths, args.modes.split(","), args.tokens, max(int(b) for b in
                           args.batch_sizes.split(",")), device),
        }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if not all(v.get("same_outputs_as_loop", True) for v in report["throughput"].values()):
        sys.exit("batched captions differ from the loop's")


if __name__ == "__main__":
    main()
