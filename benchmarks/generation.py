"""blip2 vs transformers: generation and stage-2 training step, same weights, outputs checked identical.

    python benchmarks/generation.py                    # tiny configs, CPU (seconds)
    python benchmarks/generation.py --size small --batches 1,8 --repeats 1   # OPT-125M-shaped LLM, CPU (minutes)
    python benchmarks/generation.py --size real        # OPT-2.7B + ViT-g, random weights, bf16 on a GPU
    python benchmarks/generation.py --size real --batches 1 --repeats 1   # the same on a CPU: fp32, 18 GB RAM, 13 min
    python benchmarks/generation.py --tasks vqa --beams 5 --no-train-step   # a subset of the cases
    python benchmarks/generation.py --size shallow --dtype float32   # real widths, 2 blocks each: token identity

Generated tokens must be identical in fp32 (the script exits non-zero otherwise). In bf16 they are timed
and counted, not required: matmuls of different shapes (blip2 shares one prefill between the beams,
transformers runs it per beam) may legitimately round a last bit differently, which can flip a beam, and
at real size with random weights every logit is a near tie. The training-step losses are compared with a
tolerance for the dtype (fp32 1e-3 absolute, bf16 2% relative).

Both sides share one set of modules: transformers' ``Blip2ForConditionalGeneration`` is built from a
config with random weights and ``Blip2Stage2Model`` adopts its parts, so any difference in speed comes
from the code path, not the weights. Each case prints blip2's time, transformers' time and their ratio
(> 1 means blip2 is faster); generated tokens must be identical or the script exits non-zero.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig  # noqa: E402

from blip2cli.models.config import Blip2ModelConfig  # noqa: E402
from blip2cli.models.stage2 import Blip2Stage2Model  # noqa: E402


def build_config(size: str) -> Blip2Config:
    if size in ("real", "shallow"):
        # OPT-2.7B + EVA ViT-g/14 + BERT-base Q-Former; "shallow" keeps every width and shape (vocabulary,
        # heads, 257 image tokens, 32 queries) with 2 blocks in the ViT, the Q-Former and the LLM.
        depth = {} if size == "real" else {"num_hidden_layers": 2}
        text = OPTConfig.from_dict(dict(
            vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
            max_position_embeddings=2048, word_embed_proj_dim=2560, pad_token_id=1, bos_token_id=2, eos_token_id=50118,
            **depth,
        ))
        return Blip2Config(vision_config=dict(**depth), qformer_config=dict(**depth), text_config=text.to_dict(),
                           num_query_tokens=32, image_token_index=50265)
    if size == "small":
        # The LLM of OPT-125M with BLIP-2's Q-Former (32 queries, BERT-base) over a small ViT: big enough for
        # the LLM to dominate, as at real size, and small enough for a CPU.
        text = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                         max_position_embeddings=2048, word_embed_proj_dim=768, pad_token_id=1, bos_token_id=2,
                         eos_token_id=50118)
        return Blip2Config(
            vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                               image_size=112, patch_size=14),
            qformer_config=dict(encoder_hidden_size=384),
            text_config=text.to_dict(), num_query_tokens=32, image_token_index=50265,
        )
    text = OPTConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    return Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8),
        qformer_config=dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, encoder_hidden_size=64),
        text_config=text.to_dict(), num_query_tokens=8, image_token_index=299,
    )


def _once(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def timed_pair(ours, reference, device, repeats: int) -> tuple[float, float, object, object]:
    """Median seconds of both sides and their last results. One warm-up each (kernels, caches), then the
    two alternate in the order ABBA ABBA..., so that neither a machine slowing down or speeding up mid-run
    nor whatever going first or second costs weighs on one side only."""
    ours(), reference()
    times: tuple[list[float], list[float]] = ([], [])
    results = [None, None]
    for repeat in range(repeats):
        for side in ((0, 1) if repeat % 2 == 0 else (1, 0)):
            seconds, results[side] = _once((ours, reference)[side], device)
            times[side].append(seconds)
    return statistics.median(times[0]), statistics.median(times[1]), results[0], results[1]


def identical_rows(ours: torch.Tensor, reference: torch.Tensor) -> int:
    """Rows (inputs) whose generated tokens are identical, lengths included."""
    if ours.shape[1] != reference.shape[1]:
        width = max(ours.shape[1], reference.shape[1])
        ours, reference = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in (ours, reference))
    return int((ours == reference).all(dim=1).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small", "shallow", "real"], default="tiny")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes for generation")
    parser.add_argument("--beams", default="1,5", help="comma-separated beam counts for generation")
    parser.add_argument("--tasks", default="caption,vqa", help="comma-separated prompts: caption, vqa")
    parser.add_argument("--no-train-step", action="store_true", help="time generation only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    torch.manual_seed(0)
    config = build_config(args.size)
    with torch.device(device):  # random init on the device: minutes faster for the real-size models on a GPU
        hf = Blip2ForConditionalGeneration(config)
    hf = hf.to(dtype).eval()
    ours = Blip2Stage2Model(
        Blip2ModelConfig.from_hf(config), vision_model=hf.vision_model, qformer=hf.qformer,
        language_projection=hf.language_projection, language_model=hf.language_model, query_tokens=hf.query_tokens.data,
    ).eval()
    nq, image_size = config.num_query_tokens, config.vision_config.image_size
    bos, image_token = config.text_config.bos_token_id, config.image_token_index
    prompts = {"caption": [bos], "vqa": [bos, 45, 46, 47, 48, 49, 50, 51, 52, 53]}  # fixed prompt ids

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    exact = dtype == torch.float32  # tokens must be identical; in half precision they are counted only
    print(f"# {args.size} configs on {name}, {dtype}, median of {args.repeats}; "
          f"{'tokens must be identical' if exact else 'identical rows counted, not required (see --help)'}")
    print(f"{'case':<34}{'blip2 s':>10}{'transformers s':>16}{'ratio':>8}  identical")
    ok = True
    for task in args.tasks.split(","):
        prompt = prompts[task]
        for batch in (int(b) for b in args.batches.split(",")):
            for beams in (int(b) for b in args.beams.split(",")):
                pixel_values = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
                text_ids = torch.tensor([prompt] * batch, device=device)
                hf_ids = torch.cat([torch.full((batch, nq), image_token, device=device), text_ids], dim=1)
                kwargs = dict(num_beams=beams, max_new_tokens=10 if task == "vqa" else 30, min_new_tokens=1, do_sample=False)
                with torch.inference_mode():
                    t_ours, t_hf, out_ours, out_hf = timed_pair(
                        lambda: ours.generate(pixel_values, text_ids, **kwargs),
                        lambda: hf.generate(pixel_values=pixel_values, input_ids=hf_ids, **kwargs),
                        device, args.repeats,
                    )
                same_rows = identical_rows(out_ours, out_hf[:, hf_ids.shape[1]:])
                ok &= same_rows == batch or not exact
                case = f"generate {task} b{batch} beams{beams}"
                print(f"{case:<34}{t_ours:>10.4f}{t_hf:>16.4f}{t_hf / t_ours:>8.2f}  {same_rows}/{batch} rows")

    if args.no_train_step:
        return 0 if ok else 1
    # Stage-2 training step: forward + backward through the trainable parts only.
    batch = 8 if args.size == "real" else 4
    pixel_values = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    text_ids = torch.tensor([prompts["vqa"]] * batch, device=device)
    hf_ids = torch.cat([torch.full((batch, nq), image_token, device=device), text_ids], dim=1)
    hf_labels = hf_ids.masked_fill(hf_ids == image_token, -100)
    for p in hf.language_model.parameters():
        p.requires_grad_(False)

    def step_ours():
        loss = ours(pixel_values, text_ids, labels=text_ids)["loss"]
        loss.backward()
        return loss.detach()

    def step_hf():
        loss = hf(pixel_values=pixel_values, input_ids=hf_ids, labels=hf_labels).loss
        loss.backward()
        return loss.detach()

    t_ours, t_hf, loss_ours, loss_hf = timed_pair(step_ours, step_hf, device, args.repeats)
    tolerance = dict(atol=1e-3, rtol=0) if exact else dict(atol=0, rtol=2e-2)
    same = torch.allclose(loss_ours.float(), loss_hf.float(), **tolerance)
    ok &= same
    print(f"{'train step b' + str(batch):<34}{t_ours:>10.4f}{t_hf:>16.4f}{t_hf / t_ours:>8.2f}  "
          f"loss {float(loss_ours):.4f} vs {float(loss_hf):.4f} {'ok' if same else 'DIFFERENT'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
