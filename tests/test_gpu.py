"""The bf16 CUDA paths of the stage-2 model, against transformers on the same weights. Skipped without a GPU
(run them with `python -m pytest -m gpu`, or `benchmarks/gpu_checks.sh`)."""

from __future__ import annotations

import pytest
import torch

from blip2cli.models.text import decoder_only_batch
from tests import tiny
from tests.test_llm_text import CAPTIONS, ours_from_hf, pixels

pytestmark = pytest.mark.gpu


@pytest.fixture
def tiny_pair():
    tok = tiny.opt_tokenizer()
    hf = tiny.hf_blip2("opt", tok).to("cuda", torch.bfloat16)
    return tok, hf, ours_from_hf(hf)


@pytest.mark.parametrize("beams", [1, 5])
def test_bf16_generation_matches_transformers(tiny_pair, beams):
    """Greedy is transformers' own path; beam 5 shares one prefill between the beams: in bf16 on the GPU the
    tokens must still be transformers'."""
    tok, hf, ours = tiny_pair
    images = pixels(3).to("cuda", torch.bfloat16)
    prompt = tok(["a photo of"] * 3, return_tensors="pt")["input_ids"].cuda()
    image_ids = torch.full((3, tiny.NUM_QUERY_TOKENS), hf.config.image_token_index, device="cuda")
    kwargs = dict(num_beams=beams, max_new_tokens=8, min_new_tokens=1, do_sample=False)
    with torch.inference_mode():
        expected = hf.generate(pixel_values=images, input_ids=torch.cat([image_ids, prompt], 1), **kwargs)
        got = ours.generate(images, prompt, **kwargs)
    assert torch.equal(got, expected[:, tiny.NUM_QUERY_TOKENS + prompt.shape[1]:])


def test_bf16_autocast_training_loss_matches_the_full_logits_path(tiny_pair):
    """Under bf16 autocast, the loss on labelled positions only equals transformers' full-logits loss, and
    the gradients reach the Q-Former side only."""
    tok, hf, ours = tiny_pair
    ours.float().train()  # trainable parts in fp32 under autocast, as the training loop keeps them
    batch = {k: v.cuda() for k, v in decoder_only_batch(tok, CAPTIONS, prompt="a photo of ").items()}
    images = pixels(len(CAPTIONS)).cuda()
    losses = []
    for return_logits in (True, False):
        ours.zero_grad()
        torch.manual_seed(0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ours(images, **batch, return_logits=return_logits)["loss"]
        loss.backward()
        losses.append(loss.detach().float())
        assert ours.query_tokens.grad is not None and torch.isfinite(ours.query_tokens.grad).all()
    torch.testing.assert_close(losses[1], losses[0], atol=2e-3, rtol=0)


def test_frozen_parts_stored_in_bf16_train_under_autocast_with_fused_adamw(tiny_pair):
    """The recipes store the frozen parts in fp16; the training session stores them in the autocast dtype
    (fp16 under bf16 autocast fails at the first promoting op). One fused-AdamW step on the GPU."""
    from blip2cli.models.base import store_frozen_parts_in
    from blip2cli.recipes import OptimSection
    from blip2cli.training.optim import build_optimizer

    tok, hf, ours = tiny_pair
    ours.float().train()
    batch = {k: v.cuda() for k, v in decoder_only_batch(tok, CAPTIONS, prompt="a photo of ").items()}
    images = pixels(len(CAPTIONS)).cuda()
    reference = ours(images, **batch)["loss"].detach()
    ours.vision_model.half()
    ours.vision_model.post_layernorm.float()
    ours.language_model.half()
    assert store_frozen_parts_in(ours, torch.bfloat16) > 0
    optimizer = build_optimizer(ours, OptimSection())
    assert optimizer.defaults["fused"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ours(images, **batch)["loss"]
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(loss.detach().float(), reference, rtol=3e-2, atol=0)
