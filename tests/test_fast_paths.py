"""The throughput switches compute what the plain path computes: frozen matmuls stored in the autocast
dtype, activation checkpointing of a trainable ViT / LLM, torch.compile of the ViT and the Q-Former."""

from __future__ import annotations

import pytest
import torch

from blip2cli.models.base import store_frozen_parts_in
from blip2cli.models.stage2 import Blip2Stage2Model
from blip2cli.models.text import decoder_only_batch
from blip2cli.recipes import load_recipe
from blip2cli.training.builders import build_model
from tests import tiny
from tests.test_llm_text import CAPTIONS, ours_from_hf, pixels


def _stage1(shards_dir, train_vision=False, dropout=True):
    overrides = [] if not train_vision else ["model.freeze_vision=false"]
    torch.manual_seed(0)
    shards = tiny.write_shards(shards_dir, num_shards=1, per_shard=4)
    built = build_model(load_recipe("tiny_stage1", overrides), shards=shards)
    model = built.model.train()
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    tokens = built.qformer_tokenizer(CAPTIONS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    return model, {"pixel_values": pixels(len(CAPTIONS)), "input_ids": tokens["input_ids"],
                   "attention_mask": tokens["attention_mask"]}


def _stage2(train_language_model=False):
    tok = tiny.opt_tokenizer()
    hf = tiny.hf_blip2("opt", tok)
    model = ours_from_hf(hf)
    if train_language_model:
        model = Blip2Stage2Model(model.config, model.vision_model, model.qformer, model.language_projection,
                                 model.language_model, query_tokens=model.query_tokens.data, train_language_model=True)
        model.language_model.requires_grad_(True)
    batch = decoder_only_batch(tok, CAPTIONS, prompt="a photo of ")
    return model.train(), {"pixel_values": pixels(len(CAPTIONS)), **batch}


def _loss_and_grads(model, inputs, amp=None, seed=5):
    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        loss = model(**inputs)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(a, b, exact=True, grad_rtol=1e-4):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys() and grads_a
    if exact:
        assert torch.equal(loss_a, loss_b)
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name
    else:
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=grad_rtol, atol=grad_rtol / 100, msg=name)


def test_frozen_parts_in_the_compute_dtype_train_under_autocast():
    """Stored as the recipes store them (fp16) under bf16 autocast, the frozen parts fail at the first
    promoting op; stored in bf16 they train, with the fp32 loss within bf16 rounding, and only the
    frozen parameters changed dtype."""
    model, inputs = _stage2()
    reference = _loss_and_grads(model, inputs)
    model.vision_model.to(torch.float16)
    model.vision_model.post_layernorm.float()
    model.language_model.to(torch.float16)
    with pytest.raises(RuntimeError, match="autocast"):
        _loss_and_grads(model, inputs, amp=torch.bfloat16)
    converted = store_frozen_parts_in(model, torch.bfloat16)
    loss, grads = _loss_and_grads(model, inputs, amp=torch.bfloat16)
    torch.testing.assert_close(loss, reference[0], rtol=2e-2, atol=0)
    assert grads.keys() == reference[1].keys()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert converted == frozen
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # ln_vision included
    lm = model.language_model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # still tied
    assert store_frozen_parts_in(model, torch.bfloat16) == 0


def test_checkpointing_a_trainable_vit_gives_the_same_gradients(tmp_path):
    model, inputs = _stage1(tmp_path, train_vision=True)
    plain = _loss_and_grads(model, inputs)
    assert model.enable_gradient_checkpointing() == ["qformer", "vision_model"]
    assert model.vision_model.encoder.gradient_checkpointing
    checkpointed = _loss_and_grads(model, inputs)
    assert any(n.startswith("vision_model.encoder.") for n in checkpointed[1])
    _assert_same(plain, checkpointed, exact=False)


def test_checkpointing_a_trainable_llm_gives_the_same_gradients():
    model, inputs = _stage2(train_language_model=True)
    plain = _loss_and_grads(model, inputs)
    assert model.enable_gradient_checkpointing() == ["qformer", "language_model"]
    checkpointed = _loss_and_grads(model, inputs)
    assert any(n.startswith("language_model.") for n in checkpointed[1])
    _assert_same(plain, checkpointed, exact=False)


def test_frozen_parts_are_not_checkpointed(tmp_path):
    model, _ = _stage1(tmp_path)
    assert model.enable_gradient_checkpointing() == ["qformer"]
    assert not model.vision_model.encoder.gradient_checkpointing


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_vision_and_qformer_give_the_eager_loss(tmp_path, backend):
    """Dropout off (compiled and eager draw their masks differently): the same loss and gradients, and the
    state dict keeps its names. inductor (the default backend) takes over a minute on 2 CPU cores: slow."""
    model, inputs = _stage1(tmp_path, dropout=False)
    keys = list(model.state_dict())
    eager = _loss_and_grads(model, inputs)
    model.compile_parts(vision=True, qformer=True, backend=backend)
    compiled = _loss_and_grads(model, inputs)
    # inductor fuses and reorders float sums: gradients agree to float rounding amplified by backward
    _assert_same(eager, compiled, exact=False, grad_rtol=1e-4 if backend == "aot_eager" else 1e-3)
    assert list(model.state_dict()) == keys
