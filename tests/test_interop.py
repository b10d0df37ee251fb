"""Parity with transformers' Blip2ForConditionalGeneration, in both directions, OPT-style and T5-style."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, Blip2ForConditionalGeneration
from typer.testing import CliRunner

from blip2cli.checkpoint import load_model, save_model
from blip2cli.cli import app
from blip2cli.errors import CheckpointError
from blip2cli.models.config import Blip2ModelConfig
from blip2cli.models.stage2 import Blip2Stage2Model
from tests import tiny

PROMPTS = ["what is this?", "a photo of a small"]


def _hf(path):
    model, info = Blip2ForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model.eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def images():
    return tiny.random_images(2, seed=1)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_logits_match_transformers(family, request, images):
    path = request.getfixturevalue(f"hf_{family}_dir")
    hf, processor = _hf(path)
    loaded = load_model(path)
    model = loaded.model
    assert isinstance(model, Blip2Stage2Model)
    for image, prompt in zip(images, PROMPTS):
        hf_inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        ids = loaded.tokenizer([prompt], return_tensors="pt")
        pixel_values = loaded.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        assert torch.equal(pixel_values, hf_inputs["pixel_values"])
        # transformers' ids are [<image>] * NQ followed by exactly our prompt ids.
        assert torch.equal(hf_inputs["input_ids"][:, tiny.NUM_QUERY_TOKENS:], ids["input_ids"])
        with torch.no_grad():
            if family == "opt":
                expected = hf(**hf_inputs).logits
                ours = model(pixel_values, ids["input_ids"], ids["attention_mask"])["logits"]
            else:
                decoder = torch.tensor([[0, 5, 9, 4]])
                expected = hf(**hf_inputs, decoder_input_ids=decoder).logits
                ours = model(pixel_values, ids["input_ids"], ids["attention_mask"], decoder_input_ids=decoder)["logits"]
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max().item() <= 1e-5


def test_loss_matches_transformers(hf_opt_dir, images):
    hf, processor = _hf(hf_opt_dir)
    loaded = load_model(hf_opt_dir)
    text = "a photo of a small brown dog\n"
    hf_inputs = processor(images=images[:1], text=[text], return_tensors="pt")
    labels = hf_inputs["input_ids"].clone()
    labels[:, : tiny.NUM_QUERY_TOKENS + 1] = -100  # image tokens and BOS
    ids = loaded.tokenizer([text], return_tensors="pt")
    our_labels = ids["input_ids"].clone()
    our_labels[:, :1] = -100
    with torch.no_grad():
        expected = hf(**hf_inputs, labels=labels).loss
        ours = loaded.model(hf_inputs["pixel_values"], ids["input_ids"], ids["attention_mask"], labels=our_labels)["loss"]
    assert abs(ours.item() - expected.item()) <= 1e-5


def test_left_padded_batch_matches_single(hf_opt_dir, images):
    loaded = load_model(hf_opt_dir)
    pixel_values = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
    batch = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert loaded.tokenizer.padding_side == "left"
    with torch.no_grad():
        batched = loaded.model(pixel_values, batch["input_ids"], batch["attention_mask"])["logits"][:, -1]
        for i, prompt in enumerate(PROMPTS):
            single = loaded.tokenizer([prompt], return_tensors="pt")
            alone = loaded.model(pixel_values[i : i + 1], single["input_ids"], single["attention_mask"])["logits"][0, -1]
            assert (batched[i] - alone).abs().max().item() <= 1e-5


def _hf_generate(hf, processor, image, prompt, **kwargs):
    if prompt:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    else:
        inputs = processor(images=[image], return_tensors="pt")
    out = hf.generate(**inputs, **kwargs)
    if not hf.config.text_config.is_encoder_decoder:
        out = out[:, inputs["input_ids"].shape[1] :] if prompt else out[:, tiny.NUM_QUERY_TOKENS + 1 :]
    return processor.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()


def _ask(path, image_path, *args):
    result = CliRunner().invoke(app, ["ask", str(image_path), *args, "--model", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return result.stdout.rstrip("\n")


CASES = [
    # (question, blip2 ask flags, transformers generate kwargs)
    (None, ["--num-beams", "1", "--max-new-tokens", "7"], dict(num_beams=1, max_new_tokens=7, min_new_tokens=1)),
    (None, ["--num-beams", "3", "--max-new-tokens", "6"], dict(num_beams=3, max_new_tokens=6, min_new_tokens=1)),
    ("what is this?", ["--num-beams", "1"], dict(num_beams=1, max_new_tokens=10, min_new_tokens=1)),
    ("what is this?", ["--num-beams", "4", "--length-penalty", "0"],
     dict(num_beams=4, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0)),
]


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_ask_tokens_match_transformers(family, request, images, tmp_path):
    path = request.getfixturevalue(f"hf_{family}_dir")
    hf, processor = _hf(path)
    image_path = tmp_path / "image.png"
    images[0].save(image_path)
    template = "Question: {} Answer:" if family == "opt" else "Question: {} Short answer:"
    for question, flags, kwargs in CASES:
        ours = _ask(path, image_path, *([question] if question else []), *flags)
        prompt = template.format(question) if question else None
        assert ours == _hf_generate(hf, processor, images[0], prompt, **kwargs), (question, flags)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_export_round_trip(family, tmp_path, images):
    """A model trained by blip2 (tokenizer without <image>) exports to a directory transformers runs
    unchanged, with the image really used, giving the same tokens as `blip2 ask`."""
    tokenizer = tiny.opt_tokenizer() if family == "opt" else tiny.t5_tokenizer()
    reference = tiny.hf_blip2(family, tiny.opt_tokenizer() if family == "opt" else tiny.t5_tokenizer(), seed=3)
    config = Blip2ModelConfig.from_hf(reference.config)
    config.image_token_index = None
    config.text = {**config.text, "vocab_size": len(tokenizer)}  # no room for <image> yet
    torch.manual_seed(3)
    model = Blip2Stage2Model.from_config(config)
    native = save_model(model, tmp_path / "native", tokenizer=tokenizer, image_processor=tiny.image_processor())

    result = CliRunner().invoke(app, ["export", str(native), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    hf, processor = _hf(tmp_path / "hf")
    assert processor.num_query_tokens == tiny.NUM_QUERY_TOKENS
    assert hf.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    inputs = processor(images=images[:1], text=["what is this?"], return_tensors="pt")
    assert (inputs["input_ids"] == hf.config.image_token_index).sum().item() == tiny.NUM_QUERY_TOKENS

    image_path = tmp_path / "image.png"
    images[0].save(image_path)
    kwargs = dict(num_beams=2, max_new_tokens=5, min_new_tokens=1)
    ours = _ask(native, image_path, "--num-beams", "2", "--max-new-tokens", "5")
    assert ours == _hf_generate(hf, processor, images[0], None, **kwargs)
    # ...and the exported directory is itself a blip2 checkpoint giving the same answer.
    assert _ask(tmp_path / "hf", image_path, "--num-beams", "2", "--max-new-tokens", "5") == ours


def test_batched_beam_search_matches_transformers_with_one_prefill(hf_opt_dir, images):
    """Beam search on a left-padded batch gives, row by row, transformers' tokens for that input alone,
    while the LLM encodes each prompt once (transformers encodes it once per beam)."""
    hf, processor = _hf(hf_opt_dir)
    loaded = load_model(hf_opt_dir)
    kwargs = dict(num_beams=3, max_new_tokens=6, min_new_tokens=1)
    expected = []  # one input at a time: Blip2Processor pads on the right, which generation must not
    for image, prompt in zip(images, PROMPTS):
        hf_inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        expected.append(hf.generate(**hf_inputs, **kwargs)[0, hf_inputs["input_ids"].shape[1]:])

    batch = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    pixel_values = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
    rows_seen = []

    def count_rows(module, args, kwargs):
        inputs = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        rows_seen.append((inputs.shape[0], inputs.shape[1]))

    hook = loaded.model.language_model.get_decoder().register_forward_pre_hook(count_rows, with_kwargs=True)
    try:
        ours = loaded.model.generate(pixel_values, batch["input_ids"], batch["attention_mask"], **kwargs)
    finally:
        hook.remove()
    pad = loaded.tokenizer.pad_token_id
    for row, alone in zip(ours, expected):
        assert torch.equal(row[: len(alone)], alone) and bool((row[len(alone):] == pad).all())
    prompt_length = tiny.NUM_QUERY_TOKENS + batch["input_ids"].shape[1]
    assert rows_seen[0] == (2, prompt_length - 1)  # every prompt position but the last, once per input
    assert rows_seen[1] == (2 * 3, 1)  # then the last position and each new token, per beam
    assert all(rows == (2 * 3, 1) for rows in rows_seen[1:])


def test_generate_refuses_max_length(hf_opt_dir, images):
    loaded = load_model(hf_opt_dir)
    pixel_values = loaded.image_processor(images=images[:1], return_tensors="pt")["pixel_values"]
    with pytest.raises(ValueError, match="max_new_tokens"):
        loaded.model.generate(pixel_values, max_length=20)
    out = loaded.model.generate(pixel_values, max_new_tokens=3, min_new_tokens=3, num_beams=1)
    assert out.shape == (1, 3)  # new tokens only: the visual prompt never counts


def test_frozen_parts_and_dtype(hf_opt_dir):
    loaded = load_model(hf_opt_dir, dtype=torch.bfloat16)
    model = loaded.model
    model.train()
    assert not model.vision_model.training and not model.language_model.training
    assert model.qformer.training
    assert model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.vision_model.post_layernorm.weight.dtype == torch.float32
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.qformer.layernorm.weight.dtype == torch.float32
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vision_model", "query_tokens", "qformer", "language_projection"}
    assert all(n.startswith("vision_model.post_layernorm") for n, p in model.named_parameters()
               if p.requires_grad and n.startswith("vision_model"))
    pixel_values = torch.randn(1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    ids = loaded.tokenizer(["a photo\n"], return_tensors="pt")
    labels = ids["input_ids"].clone()
    out = model(pixel_values, ids["input_ids"], ids["attention_mask"], labels=labels)
    out["loss"].backward()
    assert model.query_tokens.grad is not None and model.language_projection.weight.grad is not None
    assert model.language_model.get_input_embeddings().weight.grad is None


def test_broken_checkpoints_give_clear_errors(hf_opt_dir, tmp_path):
    import shutil

    torn = tmp_path / "torn"
    shutil.copytree(hf_opt_dir, torn)
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(torn)

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(hf_opt_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(no_tokenizer)

    not_blip2 = tmp_path / "not-blip2"
    not_blip2.mkdir()
    (not_blip2 / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="not a BLIP-2"):
        load_model(not_blip2)


def test_native_checkpoint_keeps_tied_lm_head(tmp_path, monkeypatch):
    """A stage-2 model with a non-EVA encoder is saved natively (deduplicated tied weights); loading must
    re-tie the LLM's output layer to its embeddings rather than report it missing."""
    from transformers import ViTConfig, ViTModel

    from blip2cli.recipes import load_recipe
    from blip2cli.tiny import resolver
    from blip2cli.training.builders import build_model

    monkeypatch.setattr(resolver, "TINY_LLM_TEXT_STEPS", 2)  # the weights' values do not matter here

    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(vit)
    recipe = load_recipe("tiny_stage2_opt", [f"model.vision=hf:{vit}"])
    built = build_model(recipe, corpus=tiny.CAPTIONS * 3)
    saved = save_model(built.model, tmp_path / "ckpt", tokenizer=built.llm_tokenizer,
                       qformer_tokenizer=built.qformer_tokenizer)
    assert not (saved / "config.json").exists()  # the native format, not transformers'
    lm = load_model(saved).model.language_model
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    assert torch.equal(lm.lm_head.weight, built.model.language_model.lm_head.weight)
