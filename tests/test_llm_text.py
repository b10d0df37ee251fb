"""Frozen-LLM loading (blip2cli.models.llm) and stage-2 text batches (blip2cli.models.text).

Offline: tokenizers are trained here, models are tiny and random. Parity tests check that our batches
fed to Blip2Stage2Model give transformers' Blip2ForConditionalGeneration loss on the equivalent inputs.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from blip2cli.models.config import Blip2ModelConfig
from blip2cli.models.llm import (
    LLM_PRESETS,
    LanguageModelUnavailable,
    end_token,
    language_model_spec,
    load_language_model,
)
from blip2cli.models.stage2 import Blip2Stage2Model
from blip2cli.models.text import (
    IGNORE_INDEX,
    decode_generated,
    decoder_only_batch,
    encoder_decoder_batch,
    generation_batch,
    normalize_caption,
    normalize_question,
    prefix_lm_split,
    prompt_length,
    question_prompts,
)
from tests import tiny

NQ = tiny.NUM_QUERY_TOKENS
CAPTIONS = ["a red circle", "two green squares near a yellow tree", "a dog"]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def opt_tok():
    return tiny.opt_tokenizer()


@pytest.fixture(scope="module")
def t5_tok():
    return tiny.t5_tokenizer()


def llama_style_tokenizer():
    """Qwen/SmolLM-style byte-level BPE: no BOS prepended, EOS "<|endoftext|>", no pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        tiny.CAPTIONS * 4,
        trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, generator=g)


def ours_from_hf(hf) -> Blip2Stage2Model:
    return Blip2Stage2Model(
        Blip2ModelConfig.from_hf(hf.config),
        vision_model=hf.vision_model,
        qformer=hf.qformer,
        language_projection=hf.language_projection,
        language_model=hf.language_model,
        query_tokens=hf.query_tokens.data,
    ).eval()


def with_image_tokens(hf, batch: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The transformers-style inputs equivalent to ``batch``: <image>*NQ in front of the (encoder) text."""
    n = batch["input_ids"].shape[0]
    image_ids = torch.full((n, NQ), hf.config.image_token_index, dtype=torch.long)
    out = {
        "input_ids": torch.cat([image_ids, batch["input_ids"]], dim=1),
        "attention_mask": torch.cat([torch.ones(n, NQ, dtype=torch.long), batch["attention_mask"]], dim=1),
    }
    if family == "opt":
        out["labels"] = torch.cat([torch.full((n, NQ), IGNORE_INDEX), batch["labels"]], dim=1)
    else:
        out["labels"] = batch["labels"]
        out["decoder_attention_mask"] = batch["decoder_attention_mask"]
    return out


# ----------------------------------------------------------------- text normalisation
def test_normalize_caption_and_question():
    assert normalize_caption('A "Dog"  on:the  (grass)!\n') == "a dog on the grass"
    assert normalize_caption("A Dog.", prompt="a photo of ") == "a photo of a dog"
    assert normalize_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    assert normalize_caption("one two three", max_words=2) == "one two"
    assert normalize_question("What's on the TABLE?!") == "what's on the table?"
    assert normalize_question("Is it (red)...") == "is it red"
    assert question_prompts("Question: {} Short answer:", ["what is it?"]) == ["Question: what is it? Short answer:"]
    with pytest.raises(ValueError):
        question_prompts("no slot", ["q"])


# ----------------------------------------------------------------- decoder-only batches
def test_decoder_only_labels_exact(opt_tok):
    newline = opt_tok("\n", add_special_tokens=False)["input_ids"][0]
    prompt = "a photo of "
    batch = decoder_only_batch(opt_tok, CAPTIONS, prompt=prompt, max_length=64)
    assert prompt_length(opt_tok, prompt) == len(opt_tok("a photo of")["input_ids"])  # BOS counted
    n_prompt = prompt_length(opt_tok, prompt)
    width = batch["input_ids"].shape[1]
    for row, caption in enumerate(CAPTIONS):
        ids = opt_tok(prompt + caption + "\n")["input_ids"]
        assert ids[0] == opt_tok.bos_token_id and ids[-1] == newline
        pad = width - len(ids)
        # right padding
        assert batch["input_ids"][row].tolist() == ids + [opt_tok.pad_token_id] * pad
        assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * pad
        # prompt (with BOS) and padding masked; caption tokens and the final "\n" are predicted
        expected = [IGNORE_INDEX] * n_prompt + ids[n_prompt:] + [IGNORE_INDEX] * pad
        assert batch["labels"][row].tolist() == expected
        assert expected[len(ids) - 1] == newline
    # the prompt tokens are a prefix of the joint tokenisation
    assert batch["input_ids"][0, :n_prompt].tolist() == opt_tok("a photo of")["input_ids"]


def test_decoder_only_empty_prompt_masks_only_bos(opt_tok):
    batch = decoder_only_batch(opt_tok, ["a dog"])
    ids = opt_tok("a dog\n")["input_ids"]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] + ids[1:]


def test_decoder_only_truncation_and_per_sample_prompts(opt_tok):
    batch = decoder_only_batch(opt_tok, ["two green squares near a yellow tree"], max_length=5)
    assert batch["input_ids"].shape == (1, 5)  # truncated: the "\n" is lost, as in LAVIS
    prompts = question_prompts("Question: {} Answer: ", ["what is it?", "why?"])
    batch = decoder_only_batch(opt_tok, ["red", "because"], prompt=prompts, max_length=64)
    for row, p in enumerate(prompts):
        n = prompt_length(opt_tok, p)
        assert (batch["labels"][row, :n] == IGNORE_INDEX).all()
        assert batch["labels"][row, n] != IGNORE_INDEX


def test_decoder_only_requires_pad_token():
    tok = llama_style_tokenizer()
    with pytest.raises(ValueError, match="pad token"):
        decoder_only_batch(tok, ["a dog"])


# ----------------------------------------------------------------- prefix LM / encoder-decoder batches
def test_prefix_lm_split_bounds():
    rng = random.Random(0)
    seen: dict[int, set[int]] = {}
    for _ in range(3000):
        n = rng.randint(1, 20)
        text = " ".join(f"w{i}" for i in range(n))
        prefix, suffix = prefix_lm_split(text, rng)
        if n == 1:
            assert (prefix, suffix) == ("", text)
            continue
        k = len(prefix.split())
        assert 1 <= k <= n // 2
        assert prefix + " " + suffix == text
        assert len(suffix.split()) == n - k >= k
        seen.setdefault(n, set()).add(k)
    assert seen[10] == {1, 2, 3, 4, 5} and seen[2] == {1} and seen[3] == {1}
    # numpy generators work too, and whitespace at the ends is dropped
    prefix, suffix = prefix_lm_split("  a  b c d ", np.random.default_rng(0))
    assert prefix in {"a", "a  b"} and (prefix + " " + suffix).split() == ["a", "b", "c", "d"]


def test_encoder_decoder_batch_targets_end_with_eos(t5_tok):
    eos = t5_tok.eos_token_id
    texts = CAPTIONS + ["a large white cat sleeping on a sofa next to three birds sitting on a wire"]
    for prompt in (None, "a photo of"):
        batch = encoder_decoder_batch(t5_tok, texts, prompt=prompt, rng=random.Random(1), max_length=12)
        assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_attention_mask"}
        for row in range(len(texts)):
            labels = batch["labels"][row]
            real = labels[labels != IGNORE_INDEX]
            assert real[-1] == eos and (real != eos).sum() == len(real) - 1
            assert (labels == IGNORE_INDEX).sum() == (batch["decoder_attention_mask"][row] == 0).sum()
            enc = batch["input_ids"][row][batch["attention_mask"][row] == 1]
            assert enc[-1] == eos
    # fixed prompt: encoder = prompt, target = the whole caption
    batch = encoder_decoder_batch(t5_tok, ["a dog"], prompt="a photo of")
    assert batch["input_ids"][0].tolist() == t5_tok("a photo of")["input_ids"]
    assert batch["labels"][0].tolist() == t5_tok("a dog")["input_ids"]
    # prefix LM: prefix and suffix tokenised separately
    rng = random.Random(3)
    text = "two green squares near a yellow tree"
    prefix, suffix = prefix_lm_split(text, random.Random(3))
    batch = encoder_decoder_batch(t5_tok, [text], rng=rng)
    assert batch["input_ids"][0].tolist() == t5_tok(prefix)["input_ids"]
    assert batch["labels"][0].tolist() == t5_tok(suffix)["input_ids"]


# ----------------------------------------------------------------- generation inputs / outputs
def test_generation_batch_padding_sides(opt_tok, t5_tok):
    opt_tok.padding_side = "right"  # the builders must not depend on the tokenizer's default
    batch = generation_batch(opt_tok, ["", "Question: what is it? Answer:"])
    assert batch["attention_mask"][0].tolist()[-1] == 1 and batch["attention_mask"][0, 0] == 0
    assert batch["input_ids"][0, -1] == opt_tok.bos_token_id
    opt_tok.padding_side = "left"
    assert decoder_only_batch(opt_tok, ["a", "a red circle"])["attention_mask"][0, 0] == 1  # still right padded
    batch = generation_batch(t5_tok, ["a", "a photo of"], is_encoder_decoder=True)
    assert batch["attention_mask"][0, 0] == 1 and batch["attention_mask"][0, -1] == 0


def test_decode_generated(opt_tok):
    ids = opt_tok(["a dog\nthree birds", " a red circle "], add_special_tokens=True)["input_ids"]
    ids = [row + [opt_tok.pad_token_id] for row in ids]
    assert decode_generated(opt_tok, ids) == ["a dog", "a red circle"]
    assert decode_generated(opt_tok, torch.tensor([ids[0]]), stop_at_newline=False) == ["a dog\nthree birds"]


# ----------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("prompt", ["", "a photo of "])
def test_opt_loss_parity_with_transformers(prompt):
    tok = tiny.opt_tokenizer()
    hf = tiny.hf_blip2("opt", tok)
    ours = ours_from_hf(hf)
    batch = decoder_only_batch(tok, CAPTIONS, prompt=prompt)
    images = pixels(len(CAPTIONS))
    with torch.no_grad():
        loss = ours(images, **batch)["loss"]
        ref = hf(pixel_values=images, **with_image_tokens(hf, batch, "opt")).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)


def test_training_loss_applies_the_output_layer_only_where_labels_are():
    """The loss-only forward (training) equals transformers' full-logits path in loss and in every gradient,
    while the output layer sees only the labelled positions."""
    tok = tiny.opt_tokenizer()
    hf = tiny.hf_blip2("opt", tok)
    ours = ours_from_hf(hf).train()
    batch = decoder_only_batch(tok, CAPTIONS, prompt="a photo of ")
    images = pixels(len(CAPTIONS))
    rows_seen = []
    hook = ours.language_model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows_seen.append(args[0].shape[:-1].numel()))

    def loss_and_grads(**kwargs):
        ours.zero_grad()
        torch.manual_seed(0)  # the same Q-Former dropout masks in both passes
        out = ours(images, **batch, **kwargs)
        out["loss"].backward()
        trainable = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
        return out, trainable

    full, full_grads = loss_and_grads(return_logits=True)
    lean, lean_grads = loss_and_grads()
    hook.remove()
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    assert rows_seen == [len(CAPTIONS) * (NQ + batch["input_ids"].shape[1]), labelled]
    assert "logits" in full and "logits" not in lean
    torch.testing.assert_close(lean["loss"], full["loss"], atol=1e-6, rtol=0)
    assert full_grads.keys() == lean_grads.keys() and "query_tokens" in lean_grads
    for name in full_grads:
        torch.testing.assert_close(lean_grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_t5_loss_parity_with_transformers(prompt):
    tok = tiny.t5_tokenizer()
    hf = tiny.hf_blip2("t5", tok)
    ours = ours_from_hf(hf)
    batch = encoder_decoder_batch(tok, CAPTIONS, prompt=prompt, rng=random.Random(0))
    images = pixels(len(CAPTIONS))
    with torch.no_grad():
        loss = ours(images, **batch)["loss"]
        ref = hf(pixel_values=images, **with_image_tokens(hf, batch, "t5")).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------- load_language_model
@pytest.fixture(scope="module")
def saved_llms(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    torch.manual_seed(0)
    opt_tok = tiny.opt_tokenizer()
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(opt_tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )
    )
    llama_tok = llama_style_tokenizer()
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llama_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=None,
        )
    )
    t5_tok = tiny.t5_tokenizer()
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
        )
    )
    dirs = {}
    for name, model, tok in (("opt", opt, opt_tok), ("llama", llama, llama_tok), ("t5", t5, t5_tok)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    assert not hasattr(t5.config, "bos_token_id") or t5.config.bos_token_id is None
    assert t5.config.dense_act_fn == "gelu_new"
    return dirs


def assert_frozen(model, dtype):
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_load_opt(saved_llms):
    model, tok = load_language_model(saved_llms["opt"], dtype=torch.bfloat16)
    assert_frozen(model, torch.bfloat16)
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    assert model.config.eos_token_id == newline and model.generation_config.eos_token_id == newline
    assert newline != tok.eos_token_id
    assert tok.padding_side == "left" and not model.config.is_encoder_decoder
    assert end_token(model, tok) == "\n"
    # the adjustment travels with the spec (checkpoint rebuild), and the spec is JSON-able
    spec = json.loads(json.dumps(language_model_spec(model)))
    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    assert rebuilt.generation_config.eos_token_id == newline


def test_load_llama(saved_llms):
    model, tok = load_language_model(str(saved_llms["llama"]), dtype="fp16")
    assert_frozen(model, torch.float16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # pad fallback
    assert model.generation_config.eos_token_id == 0  # not an OPT: its own EOS is kept
    assert end_token(model, tok) == "<|endoftext|>"
    assert tok.padding_side == "left"
    # opting in to BLIP-2's OPT convention for another causal LM
    model, tok = load_language_model(saved_llms["llama"], newline_eos=True)
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    assert model.generation_config.eos_token_id == newline and end_token(model, tok) == "\n"


def test_load_t5(saved_llms):
    model, tok = load_language_model(saved_llms["t5"], dtype=torch.float32)
    assert_frozen(model, torch.float32)
    assert model.config.is_encoder_decoder and isinstance(model, T5ForConditionalGeneration)
    assert model.config.bos_token_id == 1 and model.generation_config.bos_token_id == 1
    assert model.config.dense_act_fn == "gelu"
    act = model.encoder.block[0].layer[1].DenseReluDense.act
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(act(x), nn.functional.gelu(x))  # exact erf GELU, not the tanh approximation
    assert tok.padding_side == "right"
    spec = language_model_spec(model)
    rebuilt = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    assert rebuilt.config.dense_act_fn == "gelu" and rebuilt.config.bos_token_id == 1
    assert rebuilt.config.scale_decoder_outputs is False  # FlanT5's untied head survives the round trip
    # opting out keeps transformers' activation
    model, _ = load_language_model(saved_llms["t5"], t5_exact_gelu=False)
    assert model.config.dense_act_fn == "gelu_new"


def test_offline_failure_is_one_clear_line(tmp_path):
    assert LLM_PRESETS["flant5-xl"] == "google/flan-t5-xl" and LLM_PRESETS["opt-2.7b"] == "facebook/opt-2.7b"
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:  # never start a multi-GB download from a unit test
        pytest.skip("needs HF_HUB_OFFLINE=1")
    from blip2cli.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError) as info:  # not cached: blip2cli.hub says so before transformers tries
        load_language_model("opt-2.7b")
    message = str(info.value)
    assert "\n" not in message and "facebook/opt-2.7b" in message and "blip2 download model opt-2.7b" in message
    with pytest.raises(LanguageModelUnavailable, match="no such directory"):
        load_language_model(tmp_path / "missing")


# ----------------------------------------------------------------- a Llama-style LLM inside stage 2
def test_llama_style_llm_in_stage2(saved_llms):
    llama, tok = load_language_model(saved_llms["llama"], dtype=torch.float32)
    hf = tiny.hf_blip2("opt", tiny.opt_tokenizer())  # borrow the tiny vision model and Q-Former
    config = dataclasses.replace(
        Blip2ModelConfig.from_hf(hf.config), text=language_model_spec(llama), image_token_index=None
    )
    torch.manual_seed(0)
    model = Blip2Stage2Model(
        config,
        vision_model=hf.vision_model,
        qformer=hf.qformer,
        language_projection=nn.Linear(hf.qformer.config.hidden_size, llama.config.hidden_size),
        language_model=llama,
        query_tokens=hf.query_tokens.data,
    )
    model.train()
    batch = decoder_only_batch(tok, CAPTIONS, prompt="a photo of ", end_token=end_token(llama, tok))
    torch.manual_seed(0)
    out = model(pixels(len(CAPTIONS)), **batch)
    assert torch.isfinite(out["loss"])
    torch.manual_seed(0)  # same dropout masks: the loss-only path (output layer on labels) is transformers' loss
    with torch.no_grad():
        full = model(pixels(len(CAPTIONS)), **batch, return_logits=True)["loss"]
    torch.testing.assert_close(out["loss"], full, atol=1e-6, rtol=0)
    out["loss"].backward()
    assert model.language_projection.weight.grad is not None
    assert all(p.grad is None for p in llama.parameters())
    model.eval()
    prompts = generation_batch(tok, ["", "Question: what is it? Answer:"])
    generated = model.generate(pixels(2), **prompts, max_new_tokens=3, num_beams=1, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] <= 3
    free = model.generate(pixels(2), max_new_tokens=3)
    assert free.shape[1] <= 3
    assert len(decode_generated(tok, generated)) == 2
