"""A user's own parts used as they were trained, and checkpoints that remember how they are used.

- Image preprocessing comes from the encoder (its image-processor config): the checkpoint, the pixels the
  encoder gets in training and at eval all use the encoder's statistics; recipe keys override them.
- A stage-2 run stores its prompts (VQA template, caption prompt), end token and in-loop generation
  settings; ``blip2 ask`` / ``blip2 eval`` use them unless a flag says otherwise (with a line saying so).
- Every ``step-N/`` of a run is a usable model (``ask``, ``eval``, ``--init-from``).
- Mismatches between an encoder and a recipe fail at ``--dry-run`` with one line naming both values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from typer.testing import CliRunner

from blip2cli.checkpoint import load_model, save_model
from blip2cli.cli import app
from blip2cli.errors import Blip2Error
from blip2cli.models.preprocessing import CLIP_MEAN, CLIP_STD, ImagePreprocessing
from blip2cli.recipes import load_recipe
from blip2cli.training.builders import build_model
from blip2cli.training.loop import train
from tests import tiny
from tests.test_eval_tasks import vqa_dir

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)


def _encoder_dir(root: Path, family: str) -> tuple[Path, object]:
    """A tiny random transformers encoder with its family's own image processor saved beside it."""
    torch.manual_seed(0)
    if family == "dinov2":  # facebook/dinov2-*: shortest edge 256 + center crop 224, ImageNet statistics
        model = Dinov2Model(Dinov2Config(**COMMON, image_size=32))
        processor = BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                      do_center_crop=True, image_mean=list(IMAGENET[0]), image_std=list(IMAGENET[1]),
                                      resample=3)
    elif family == "siglip":  # google/siglip-*: square resize, mean/std 0.5
        model = SiglipVisionModel(SiglipVisionConfig(**COMMON, image_size=32))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2)
    else:  # openai/clip-*: shortest edge + center crop, CLIP statistics
        model = CLIPVisionModel(CLIPVisionConfig(**COMMON, image_size=32))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    directory = root / family
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, processor


def _stage1_recipe(vision: Path, *overrides: str):
    return load_recipe("tiny_stage1", [f"model.vision=hf:{vision}", "~model.image_size", "train.log_every=1",
                                       "data.shuffle_buffer=8", *overrides])


def _photo(size=(48, 40), seed=0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny.write_shards(tmp_path_factory.mktemp("shards"), num_shards=2, per_shard=8)


@pytest.mark.parametrize("family, stats, resize", [("dinov2", IMAGENET, "shortest_edge"), ("siglip", HALF, "square"),
                                                    ("clip", (CLIP_MEAN, CLIP_STD), "shortest_edge")])
def test_preprocessing_comes_from_the_encoder(family, stats, resize, tmp_path):
    directory, processor = _encoder_dir(tmp_path, family)
    built = build_model(_stage1_recipe(directory), corpus=tiny.CAPTIONS)
    config = built.model.config
    assert (config.image_mean, config.image_std, config.image_resize) == (tuple(stats[0]), tuple(stats[1]), resize)
    assert config.image_size == 32
    assert any("images:" in note and f"{directory}'s image processor" in note for note in built.notes)
    # the checkpoint prepares images exactly as the encoder's own image processor does
    checkpoint = save_model(built.model, tmp_path / "ckpt", tokenizer=built.qformer_tokenizer)
    loaded = load_model(checkpoint)
    photo = _photo()
    ours = loaded.image_processor(images=photo, return_tensors="pt")["pixel_values"]
    theirs = processor(images=photo, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert json.loads((checkpoint / "blip2cli_config.json").read_text())["image_mean"] == list(stats[0])


def test_training_feeds_the_encoder_its_own_statistics_and_overrides_win(tmp_path, shards, monkeypatch):
    """The pixels the encoder receives during training are normalised with its statistics; a recipe key wins,
    with a line saying what it replaced."""
    from blip2cli.models.vision_hf import HFVisionEncoder

    directory, _ = _encoder_dir(tmp_path, "dinov2")
    seen = []
    original = HFVisionEncoder.trunk_features

    def spy(self, pixel_values):
        seen.append(pixel_values.detach().clone())
        return original(self, pixel_values)

    monkeypatch.setattr(HFVisionEncoder, "trunk_features", spy)
    constant = tmp_path / "constant"
    tiny.write_shards(constant, num_shards=1, per_shard=8, colour=(200, 100, 50))
    for overrides, (mean, std) in (((), IMAGENET), (("model.image_mean=[0.5, 0.5, 0.5]", "model.image_std=[0.25, 0.25, 0.25]"),
                                                    ((0.5,) * 3, (0.25,) * 3))):
        seen.clear()
        recipe = _stage1_recipe(directory, "train.max_steps=1", "optim.warmup_steps=0", *overrides)
        result = train(recipe, tmp_path / f"run{len(overrides)}", [str(constant)], device="cpu")
        expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip((200, 100, 50), mean, std)])
        # JPEG shifts a flat colour by a level or two at most
        torch.testing.assert_close(seen[0][0, :, 4, 4], expected, atol=3 / 255 / min(std), rtol=0)
        saved = load_model(result.final_checkpoint).config
        assert (saved.image_mean, saved.image_std) == (tuple(mean), tuple(std))


def test_override_keys_and_notes():
    pre = ImagePreprocessing(size=224, mean=IMAGENET[0], std=IMAGENET[1], resize="shortest_edge", resize_shortest=256,
                             source="X's image processor")
    same, notes = pre.with_overrides(size=224, mean=list(IMAGENET[0]))
    assert same == pre and notes == []
    bigger, notes = pre.with_overrides(size=448, std=(0.5, 0.5, 0.5))
    assert (bigger.size, bigger.resize_shortest, bigger.std) == (448, 512, (0.5, 0.5, 0.5))  # DINOv2's crop ratio kept
    assert notes == ["model.image_size = 448 replaces X's image processor 224",
                     "model.image_std = (0.5, 0.5, 0.5) replaces X's image processor (0.229, 0.224, 0.225)"]
    square, _ = pre.with_overrides(resize="square")
    assert square.resize_shortest is None


@pytest.mark.parametrize("overrides, message", [
    (["model.image_size=36"], "model.image_size 36 is not a multiple of the patch size 8"),
    (["model.vision_feature_layer=7"], "feature_layer 7 out of range"),
    (["model.image_resize=crop"], "model.image_resize: must be one of square, shortest_edge"),
])
def test_mismatches_fail_at_dry_run_in_one_line(overrides, message, tmp_path, shards):
    directory, _ = _encoder_dir(tmp_path, "siglip")
    with pytest.raises(Blip2Error, match=message) as error:
        recipe = _stage1_recipe(directory, *overrides)
        train(recipe, tmp_path / "run", shards, dry_run=True, device="cpu")
    assert "\n" not in str(error.value)


def test_dry_run_prints_layer_and_preprocessing(tmp_path, shards):
    directory, _ = _encoder_dir(tmp_path, "dinov2")
    result = CliRunner().invoke(app, ["pretrain", "--stage", "1", "--recipe", "tiny_stage1", "--dry-run", "--out",
                                      str(tmp_path / "run"), f"model.vision=hf:{directory}", "~model.image_size",
                                      f"data.shards={json.dumps(shards)}"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "the Q-Former reads the last block (layer -1, the default for dinov2" in text
    assert "images: shortest edge 40 px + center crop 32 px, bicubic, mean (0.485, 0.456, 0.406)" in text


# ------------------------------------------------------------------------------------------ stage 2 usage
TEMPLATE = "q: {} a:"


@pytest.fixture(scope="module")
def stage2_run(shards, tmp_path_factory):
    """A tiny stage-2 run trained with a non-default VQA template and caption prompt, a step checkpoint kept."""
    run_dir = tmp_path_factory.mktemp("stage2")
    recipe = load_recipe("tiny_stage2_opt", ["train.max_steps=4", "optim.warmup_steps=0", "train.save_every=2", "train.keep_last=3",
                                              "train.log_every=1", "data.shuffle_buffer=8",
                                              f"eval.prompt_template={TEMPLATE}", "eval.caption_prompt=a picture of",
                                              "eval.max_new_tokens=4", "eval.task=vqav2"])
    return train(recipe, run_dir, shards, device="cpu")


def _ask(*args):
    result = CliRunner(mix_stderr=False).invoke(app, ["ask", *args, "--num-beams", "2"]) if _mix_stderr_supported() \
        else CliRunner().invoke(app, ["ask", *args, "--num-beams", "2"])
    assert result.exit_code == 0, result.output
    return result


def _mix_stderr_supported() -> bool:
    import inspect

    return "mix_stderr" in inspect.signature(CliRunner.__init__).parameters


def test_checkpoint_records_how_it_is_used(stage2_run):
    config = load_model(stage2_run.final_checkpoint).config
    assert config.usage["vqa_prompt_template"] == TEMPLATE
    assert config.usage["caption_prompt"] == "a picture of"
    assert config.usage["end_token"] == "\n"  # OPT family: BLIP-2 ends OPT texts with "\n"
    assert config.usage["generation"] == {"vqa": {"max_new_tokens": 4}}
    assert config.stored_generation("vqa") == {"prompt": TEMPLATE, "max_new_tokens": 4}
    assert config.stored_generation("caption") == {"prompt": "a picture of"}


def test_ask_and_eval_use_the_stored_template(stage2_run, tmp_path):
    image = tmp_path / "shape.jpg"
    tiny.shape_image("red", "blue").save(image)
    model = str(stage2_run.final_checkpoint)
    plain = _ask(str(image), "what colour is it?", "--model", model)
    explicit = _ask(str(image), "what colour is it?", "--model", model, "--prompt-template", TEMPLATE,
                    "--max-new-tokens", "4")
    assert plain.stdout == explicit.stdout and plain.stdout.strip()
    other = _ask(str(image), "what colour is it?", "--model", model, "--prompt-template", "Question: {} Answer:")
    assert "--prompt-template 'Question: {} Answer:' replaces the checkpoint's 'q: {} a:'" in " ".join(other.output.split())
    caption = _ask(str(image), "--model", model)
    caption_explicit = _ask(str(image), "--model", model, "--prompt", "a picture of")
    assert caption.stdout == caption_explicit.stdout

    data = vqa_dir(tmp_path / "vqa")
    runs = {}
    for name, extra in (("stored", []), ("explicit", ["--prompt", TEMPLATE, "--max-new-tokens", "4"])):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["eval", "vqav2", "--model", model, "--data", str(data), "--out", str(out),
                                          "--workers", "0", "--num-beams", "2", *extra])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads((out / "predictions.json").read_text())
        settings = json.loads((out / "metrics.json").read_text())["settings"]
        assert (settings["prompt"], settings["max_new_tokens"]) == (TEMPLATE, 4)
    assert runs["stored"] == runs["explicit"]


def test_step_checkpoints_are_usable_models(stage2_run, tmp_path):
    run_dir = stage2_run.run_dir
    steps = sorted(p.name for p in run_dir.glob("step-*"))
    assert steps == ["step-00000002", "step-00000004"] and (run_dir / "base" / "blip2cli_config.json").exists()
    image = tmp_path / "shape.jpg"
    tiny.shape_image("green", "yellow").save(image)
    # the last step holds the same trainable weights as final/: the same answer, token for token
    from_step = _ask(str(image), "what is it?", "--model", str(run_dir / "step-00000004"))
    from_final = _ask(str(image), "what is it?", "--model", str(stage2_run.final_checkpoint))
    assert from_step.stdout == from_final.stdout
    step = load_model(run_dir / "step-00000002").model
    final = load_model(stage2_run.final_checkpoint).model
    assert not torch.equal(step.language_projection.weight, final.language_projection.weight)  # it learned since
    rows = step.language_model.lm_head.weight.shape[0]  # final/ adds transformers' <image> token after them
    assert torch.equal(step.language_model.lm_head.weight, final.language_model.lm_head.weight[:rows])  # frozen
    # a run directory means its final checkpoint
    assert torch.equal(load_model(run_dir).model.language_projection.weight, final.language_projection.weight)
    result = CliRunner().invoke(app, ["eval", "vqav2", "--model", str(run_dir / "step-00000002"), "--data",
                                      str(vqa_dir(tmp_path / "vqa")), "--out", str(tmp_path / "eval"), "--workers", "0",
                                      "--num-beams", "1"])
    assert result.exit_code == 0, result.output


def test_step_checkpoint_of_a_restarted_run_is_refused(stage2_run, tmp_path):
    import shutil

    from blip2cli.errors import CheckpointError

    copy = tmp_path / "run"
    shutil.copytree(stage2_run.run_dir, copy)
    (copy / "base" / "run_base.json").write_text(json.dumps({"id": "another run"}))
    with pytest.raises(CheckpointError, match="was not trained on"):
        load_model(copy / "step-00000002")


def test_fine_tuning_inherits_and_overrides_usage(stage2_run, shards, tmp_path):
    recipe = load_recipe("tiny_stage2_opt", ["train.max_steps=1", "optim.warmup_steps=0", "data.shuffle_buffer=8",
                                              f"model.init_from={stage2_run.run_dir / 'step-00000004'}",
                                              "eval.caption_prompt=an image of"])
    built = build_model(recipe, corpus=tiny.CAPTIONS)
    usage = built.model.config.usage
    assert usage["vqa_prompt_template"] == TEMPLATE and usage["caption_prompt"] == "an image of"
    with pytest.raises(Blip2Error, match="model.num_query_tokens = 8, but .* 4 query tokens"):
        build_model(load_recipe("tiny_stage2_opt", ["model.num_query_tokens=8",
                                                    f"model.init_from={stage2_run.final_checkpoint}"]), corpus=tiny.CAPTIONS)
