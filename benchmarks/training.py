"""Training throughput and peak memory of blip2's stage-1 and stage-2 steps, real-size configs, random weights.

    python benchmarks/training.py                      # tiny configs on the CPU (a smoke run, seconds)
    python benchmarks/training.py --size real          # ViT-g + BERT-base Q-Former (+ OPT-2.7B), bf16, one GPU

A step here is what ``blip2cli.training.loop`` does per micro-batch: forward under autocast, backward,
AdamW step on the trainable parameters (``build_optimizer``'s groups), frozen parts stored in half
precision as the recipes do. Nothing is downloaded: the models are built from their configs. Stage 2 is
also timed as a plain transformers ``Blip2ForConditionalGeneration`` step on the same modules (the only
reference that computes the same loss; transformers has no stage-1 training) and reported as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation import build_config  # noqa: E402  (the same real/tiny stage-2 configs)
from transformers import Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig  # noqa: E402

from blip2cli.models.config import Blip2ModelConfig, clean_config_dict  # noqa: E402
from blip2cli.models.stage1 import Blip2Stage1Model  # noqa: E402
from blip2cli.models.stage2 import Blip2Stage2Model  # noqa: E402
from blip2cli.recipes import OptimSection  # noqa: E402
from blip2cli.training.optim import build_optimizer  # noqa: E402


def stage1_model(size: str) -> Blip2Stage1Model:
    if size == "real":
        vision = Blip2VisionConfig()  # EVA ViT-g/14 as BLIP-2 uses it
        qformer = Blip2QFormerConfig(vocab_size=30523, use_qformer_text_input=True, encoder_hidden_size=1408)
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


def measure(step, device: torch.device, steps: int) -> tuple[float, float]:
    """(steps per second, peak GiB) over ``steps`` timed steps after two warm-up steps."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return 1.0 / statistics.median(times), peak


def train_step(model, optimizer, inputs, amp_dtype, device):
    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(**inputs)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stage1-batch", type=int, default=None, help="per-GPU batch [real: 105, the paper's 1680/16]")
    parser.add_argument("--stage2-batch", type=int, default=None, help="per-GPU batch [real: 16]")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--jsonl", type=Path, default=None, help="also append one JSON record per case here")
    args = parser.parse_args()
    device = torch.device(args.device)
    real = args.size == "real"
    amp = torch.bfloat16 if device.type == "cuda" else None
    frozen_dtype = torch.float16 if device.type == "cuda" else torch.float32
    b1 = args.stage1_batch or (105 if real else 4)
    b2 = args.stage2_batch or (16 if real else 4)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {args.size} configs on {name}, autocast {amp}, median of {args.steps} steps")
    print(f"{'case':<40}{'steps/s':>9}{'samples/s':>11}{'peak GiB':>10}{'vs transformers':>17}")

    torch.manual_seed(0)
    with torch.device(device):  # random init on the device (fast for the real-size models on a GPU)
        model = stage1_model(args.size)
    model.vision_model.to(frozen_dtype)
    model.vision_model.post_layernorm.float()  # ln_vision trains in fp32
    model.train()
    size = model.config.image_size
    inputs = dict(pixel_values=torch.randn(b1, 3, size, size, device=device),
                  input_ids=torch.randint(1, 90, (b1, 32), device=device),
                  attention_mask=torch.ones(b1, 32, dtype=torch.long, device=device))
    optimizer = build_optimizer(model, OptimSection())
    rate, peak = measure(train_step(model, optimizer, inputs, amp, device), device, args.steps)
    print(f"{'stage 1 ITC+ITM+ITG b' + str(b1):<40}{rate:>9.3f}{rate * b1:>11.1f}{peak:>10.1f}{'n/a':>17}")
    del model, optimizer, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()

    config = build_config(args.size)
    with torch.device(device):
        hf = Blip2ForConditionalGeneration(config)
    hf.vision_model.to(frozen_dtype)
    hf.vision_model.post_layernorm.float()
    hf.language_model.to(frozen_dtype)
    for p in [*hf.vision_model.parameters(), *hf.language_model.parameters()]:
        p.requires_grad_(False)
    for p in hf.vision_model.post_layernorm.parameters():
        p.requires_grad_(True)
    ours = Blip2Stage2Model(
        Blip2ModelConfig.from_hf(config), vision_model=hf.vision_model, qformer=hf.qformer,
        language_projection=hf.language_projection, language_model=hf.language_model, query_tokens=hf.query_tokens.data,
    ).train()
    nq, size = config.num_query_tokens, config.vision_config.image_size
    text = torch.randint(4, 200, (b2, 32), device=device)
    text[:, 0] = config.text_config.bos_token_id
    pixel_values = torch.randn(b2, 3, size, size, device=device)
    hf_ids = torch.cat([torch.full((b2, nq), config.image_token_index, device=device), text], dim=1)
    hf_labels = hf_ids.masked_fill(hf_ids == config.image_token_index, -100)
    hf.train()
    hf.vision_model.eval()  # frozen parts without dropout, as blip2 (and LAVIS) train them
    hf.language_model.eval()
    results = {}
    for label, module, inputs in (
        ("transformers", hf, dict(pixel_values=pixel_values, input_ids=hf_ids, labels=hf_labels)),
        ("blip2", ours, dict(pixel_values=pixel_values, input_ids=text, labels=text)),
    ):
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
        results[label] = measure(train_step(module, optimizer, inputs, amp, device), device, args.steps)
        del optimizer
        for p in module.parameters():
            p.grad = None
    for label, (rate, peak) in results.items():
        ratio = f"{rate / results['transformers'][0]:.2f}x" if label == "blip2" else ""
        case = f"stage 2 LM loss b{b2} ({label})"
        print(f"{case:<40}{rate:>9.3f}{rate * b2:>11.1f}{peak:>10.1f}{ratio:>17}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
