"""Training throughput of blip2's stage-1 and stage-2 steps: samples/s, peak memory and model FLOPs
utilisation, eager vs compiled, live frozen image encoder vs frozen-feature cache.

    python benchmarks/training.py                      # tiny configs on the CPU (seconds)
    python benchmarks/training.py --size small         # BERT-base Q-Former, a 4-block ViT, OPT-125M shapes (CPU, minutes)
    python benchmarks/training.py --size real          # ViT-g + BERT-base Q-Former (+ OPT-2.7B), bf16, one GPU

A step is what ``blip2cli.training.optimizer_step`` does per micro-batch: forward under autocast (bf16 on
a GPU, none on a CPU), backward, AdamW step (``build_optimizer``: fused on a GPU), frozen parts stored in
the compute dtype (``store_frozen_parts_in``). Inputs are synthetic tensors already on the device (uint8
images, normalised in the step as in training): data loading is not timed. Before the cases, the host-side
data path per stage-1 micro-batch: the text tokenisation ``TextBatcher`` runs in the main process (a fast
WordPiece tokenizer trained here on synthetic 20-word captions, ``data.max_txt_len`` 32), and the bytes of
the batch's images sent to the device as uint8 and, as before, as fp32, at 224 px and at the fine-tuning
recipes' 364 and 490 px. Cases, per stage:

* ``live``: images through the frozen image encoder, as ``data.feature_cache`` off;
* ``cache``: the encoder's output given as ``vision_features`` (computed once before timing), as a run
  reading ``blip2 cache-features`` output does;
* stage 1 ``cache, ITG joint pass``: ITG recomputing the query path (``loss.itg_reuses_query_pass = false``)
  instead of reading the ITC pass's query keys and values (the default, as LAVIS);
* ``compiled``: ``compile_parts(vision=True, qformer=True)`` (``train.compile_vision/compile_qformer``),
  with ``--compile-backend`` (inductor by default; aot_eager checks the plumbing quickly);
* stage 2 also as a plain transformers ``Blip2ForConditionalGeneration`` step on the same modules.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one step (forward and
backward: matmuls, convolutions, attention), divided by the batch. MFU = counted FLOPs x samples/s / peak,
with the peak bf16 dense FLOP/s of the GPU from ``PEAK_TFLOPS`` or ``--peak-tflops`` (none on a CPU
unless given). Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU
(monotone over the run: read the first case's). ``--jsonl`` appends one record per case as it is measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation import build_config  # noqa: E402  (the same real/small/tiny stage-2 configs)
from transformers import Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig  # noqa: E402

from blip2cli.models.base import store_frozen_parts_in  # noqa: E402
from blip2cli.models.config import Blip2ModelConfig, clean_config_dict  # noqa: E402
from blip2cli.models.stage1 import Blip2Stage1Model  # noqa: E402
from blip2cli.models.stage2 import Blip2Stage2Model  # noqa: E402
from blip2cli.models.vision import trunk_features  # noqa: E402
from blip2cli.recipes import OptimSection  # noqa: E402
from blip2cli.training.optim import build_optimizer  # noqa: E402
from blip2cli.training.text_batching import qformer_tokens  # noqa: E402

# Dense bf16 tensor-core peak, FLOP/s (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
# Pre-training at 224 px, the fine-tuning recipes at 364 (captioning, retrieval) and 490 px (VQA).
DATA_IMAGE_SIZES = (224, 364, 490)


def stage1_model(size: str) -> Blip2Stage1Model:
    if size == "real":
        vision = Blip2VisionConfig()  # EVA ViT-g/14 as BLIP-2 uses it
        qformer = Blip2QFormerConfig(vocab_size=30523, use_qformer_text_input=True, encoder_hidden_size=1408)
        queries = 32
    elif size == "small":
        vision = Blip2VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                                   image_size=112, patch_size=14)
        qformer = Blip2QFormerConfig(vocab_size=30523, use_qformer_text_input=True, encoder_hidden_size=384)
        queries = 32
    else:
        vision = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=64, patch_size=8)
        qformer = Blip2QFormerConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, encoder_hidden_size=64, use_qformer_text_input=True)
        queries = 8
    config = Blip2ModelConfig(vision={"kind": "eva", "config": clean_config_dict(vision.to_dict())},
                              qformer=clean_config_dict(qformer.to_dict()), num_query_tokens=queries,
                              image_size=vision.image_size, stage=1)
    return Blip2Stage1Model.from_config(config, dec_token_id=qformer.vocab_size - 1, pad_token_id=0)


def synthetic_captions(count: int, words: int = 20, vocabulary: int = 5000, seed: int = 0) -> list[str]:
    """``count`` captions of ``words`` words drawn from ``vocabulary`` made-up lowercase words."""
    import random
    import string

    rng = random.Random(seed)
    lexicon = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(vocabulary)]
    return [" ".join(rng.choices(lexicon, k=words)) for _ in range(count)]


def tokenisation_ms(batch: int, max_txt_len: int = 32, repeats: int = 20) -> float:
    """Median ms of stage 1's text tokenisation (``qformer_tokens``) of one micro-batch of fresh captions, with
    a fast BERT WordPiece tokenizer holding every word of the captions whole (as BERT holds common words)."""
    from blip2cli.tiny.tokenizers import train_bert_tokenizer

    captions = synthetic_captions(batch * (repeats + 1))
    tokenizer = train_bert_tokenizer(captions, vocab_size=30522)
    batches = [captions[i * batch:(i + 1) * batch] for i in range(repeats + 1)]
    qformer_tokens(tokenizer, batches[0], max_txt_len)  # warm-up
    times = []
    for texts in batches[1:]:
        start = time.perf_counter()
        qformer_tokens(tokenizer, texts, max_txt_len)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def data_path_lines(batch: int) -> list[str]:
    """The host-side data path per stage-1 micro-batch (see the module docstring), two comment lines."""
    sizes = ", ".join(f"{batch * 3 * s * s / 2**20:.1f} vs {4 * batch * 3 * s * s / 2**20:.1f} MiB at {s} px"
                      for s in DATA_IMAGE_SIZES)
    return [f"# data path per stage-1 micro-batch of {batch}, host side (not timed below): text tokenisation "
            f"{tokenisation_ms(batch):.2f} ms (fast WordPiece, 20-word captions, max_txt_len 32)",
            f"# images per micro-batch to the device, uint8 (now) vs fp32 (before): {sizes}"]


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def measure(step, device: torch.device, steps: int, repeats: int) -> tuple[list[float], float]:
    """(steps/s of each repeat, each the median of ``steps`` timed steps after two warm-up steps; peak GiB)."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(repeats):
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rates.append(1.0 / statistics.median(times))
    return rates, peak_memory_gib(device)


def counted_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def train_step(model, optimizer, inputs, amp_dtype, device):
    def step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(**inputs)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def cached_inputs(model, inputs, amp_dtype):
    """``inputs`` with the images replaced by the frozen trunk's output, in the cache's dtype."""
    pixels = model.config.preprocessing.normalized(inputs["pixel_values"])
    with torch.inference_mode():
        features = trunk_features(model.vision_model, pixels.to(model.vision_model.dtype
                                                                if hasattr(model.vision_model, "dtype")
                                                                else torch.float32))
    return {**{k: v for k, v in inputs.items() if k != "pixel_values"},
            "vision_features": features.to(amp_dtype or torch.float32).clone()}


class Report:
    def __init__(self, args, device, amp, peak_flops):
        self.args, self.device, self.amp, self.peak = args, device, amp, peak_flops
        self.header = f"{'case':<44}{'samples/s':>11}{'spread':>15}{'GFLOP/sample':>14}{'MFU':>8}{'peak GiB':>10}"

    def add(self, stage: int, case: str, batch: int, rates: list[float], peak: float, flops: int, extra=None):
        samples = [r * batch for r in rates]
        median = statistics.median(samples)
        per_sample = flops / batch
        mfu = per_sample * median / self.peak if self.peak else None
        spread = f"{min(samples):.1f}-{max(samples):.1f}"
        print(f"{f'stage {stage} {case} b{batch}':<44}{median:>11.1f}{spread:>15}{per_sample / 1e9:>14.3f}"
              f"{'n/a' if mfu is None else f'{mfu:.1%}':>8}{peak:>10.2f}" + (f"  {extra}" if extra else ""), flush=True)
        if self.args.jsonl:
            record = {"size": self.args.size, "device": device_name(self.device), "stage": stage, "case": case,
                      "batch": batch, "samples_per_s": median, "samples_per_s_runs": samples,
                      "flops_per_sample": per_sample, "mfu": mfu, "peak_gib": peak,
                      "peak_kind": "cuda_allocated" if self.device.type == "cuda" else "process_rss"}
            with open(self.args.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
        return median


def random_pixels(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """uint8 images, as the training loaders send them."""
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def run_cases(report, stage, model, optimizer, live, amp, device, batch, args, reference=None):
    """live, cache, compiled live, compiled cache; returns nothing (each case printed as it is measured)."""
    step = train_step(model, optimizer, live, amp, device)
    flops_live = counted_flops(step)
    rates, peak = measure(step, device, args.steps, args.repeats)
    live_rate = report.add(stage, "live", batch, rates, peak, flops_live)
    if reference is not None:
        print(f"{'':<44}{live_rate / reference:.2f}x transformers' samples/s", flush=True)
    cache = cached_inputs(model, live, amp)
    step = train_step(model, optimizer, cache, amp, device)
    flops_cache = counted_flops(step)
    rates, peak = measure(step, device, args.steps, args.repeats)
    cache_rate = statistics.median(rates) * batch
    report.add(stage, "cache", batch, rates, peak, flops_cache, f"{cache_rate / live_rate:.2f}x live")
    if stage == 1:
        itg_joint_pass(report, model, optimizer, cache, amp, device, batch, args, cache_rate, flops_cache)
    if args.no_compile:
        return
    model.compile_parts(vision=True, qformer=True, backend=args.compile_backend)
    for case, inputs, flops in (("compiled live", live, flops_live), ("compiled cache", cache, flops_cache)):
        start = time.perf_counter()
        step = train_step(model, optimizer, inputs, amp, device)
        step()  # compiles
        compile_s = time.perf_counter() - start
        rates, peak = measure(step, device, args.steps, args.repeats)
        rate = statistics.median(rates) * batch
        base = live_rate if case == "compiled live" else cache_rate
        report.add(stage, case, batch, rates, peak, flops,
                   f"{rate / base:.2f}x eager ({args.compile_backend}, compiled in {compile_s:.0f} s)")


def itg_joint_pass(report, model, optimizer, cache, amp, device, batch, args, reuse_rate, reuse_flops):
    """Stage 1 with ITG recomputing the query path in a joint pass (``loss.itg_reuses_query_pass = false``)
    against the default, which reads the ITC pass's query keys and values, as LAVIS does."""
    model.loss_config.itg_reuses_query_pass = False
    step = train_step(model, optimizer, cache, amp, device)
    flops = counted_flops(step)
    rates, peak = measure(step, device, args.steps, args.repeats)
    model.loss_config.itg_reuses_query_pass = True
    rate = statistics.median(rates) * batch
    report.add(1, "cache, ITG joint pass", batch, rates, peak, flops,
               f"reuse: {reuse_rate / rate:.2f}x samples/s, {reuse_flops / flops:.3f}x FLOPs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small", "real"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stage1-batch", type=int, default=None, help="per-GPU batch [real: 105, the paper's 1680/16]")
    parser.add_argument("--stage2-batch", type=int, default=None, help="per-GPU batch [real: 16]")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat (median)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats per case (their spread is printed)")
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device, for MFU")
    parser.add_argument("--jsonl", type=Path, default=None, help="also append one JSON record per case here")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    name = device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    peak_flops = peak * 1e12 if peak else None
    b1 = args.stage1_batch or {"real": 105, "small": 16}.get(args.size, 4)
    b2 = args.stage2_batch or {"real": 16, "small": 8}.get(args.size, 4)
    report = Report(args, device, amp, peak_flops)
    print(f"# {args.size} configs on {name}, autocast {amp}, median of {args.steps} steps x {args.repeats} repeats; "
          f"peak {peak or 'unknown'} TFLOP/s")
    stages = {int(s) for s in args.stages.split(",")}
    if 1 in stages:
        print("\n".join(data_path_lines(b1)), flush=True)
    print(report.header)

    if 1 in stages:
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device (fast for the real-size models on a GPU)
            model = stage1_model(args.size)
        if amp is not None:
            store_frozen_parts_in(model, amp)
        model.train()
        size = model.config.image_size
        inputs = dict(pixel_values=random_pixels(b1, size, device),
                      input_ids=torch.randint(1, 90, (b1, 32), device=device),
                      attention_mask=torch.ones(b1, 32, dtype=torch.long, device=device))
        optimizer = build_optimizer(model, OptimSection())
        run_cases(report, 1, model, optimizer, inputs, amp, device, b1, args)
        del model, optimizer, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if 2 not in stages:
        return 0

    config = build_config(args.size)
    torch.manual_seed(0)
    with torch.device(device):
        hf = Blip2ForConditionalGeneration(config)
    for p in [*hf.vision_model.parameters(), *hf.language_model.parameters()]:
        p.requires_grad_(False)
    for p in hf.vision_model.post_layernorm.parameters():
        p.requires_grad_(True)
    ours = Blip2Stage2Model(
        Blip2ModelConfig.from_hf(config), vision_model=hf.vision_model, qformer=hf.qformer,
        language_projection=hf.language_projection, language_model=hf.language_model, query_tokens=hf.query_tokens.data,
    ).train()
    if amp is not None:
        store_frozen_parts_in(ours, amp)
    hf.query_tokens = ours.query_tokens  # one set of trainable weights for both
    nq, size = config.num_query_tokens, config.vision_config.image_size
    text = torch.randint(4, 200, (b2, 32), device=device)
    text[:, 0] = config.text_config.bos_token_id
    pixel_values = random_pixels(b2, size, device)
    hf_ids = torch.cat([torch.full((b2, nq), config.image_token_index, device=device), text], dim=1)
    hf_labels = hf_ids.masked_fill(hf_ids == config.image_token_index, -100)
    hf.train()
    hf.vision_model.eval()  # frozen parts without dropout, as blip2 (and LAVIS) train them
    hf.language_model.eval()
    optimizer = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5)
    hf_pixels = ours.config.preprocessing.normalized(pixel_values)  # transformers takes normalised floats only
    step = train_step(hf, optimizer, dict(pixel_values=hf_pixels, input_ids=hf_ids, labels=hf_labels), amp, device)
    flops = counted_flops(step)
    rates, peak_mem = measure(step, device, args.steps, args.repeats)
    reference = report.add(2, "transformers live", b2, rates, peak_mem, flops)
    del optimizer
    optimizer = build_optimizer(ours, OptimSection())
    live = dict(pixel_values=pixel_values, input_ids=text, labels=text)
    run_cases(report, 2, ours, optimizer, live, amp, device, b2, args, reference=reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
