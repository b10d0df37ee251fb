"""End-to-end training on tiny shards: stage 1, stage 2 (decoder-only and encoder-decoder), resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2cli.checkpoint import load_model
from blip2cli.errors import Blip2Error
from blip2cli.recipes import load_recipe
from blip2cli.training.loop import train
from tests import tiny

FAST = ["train.log_every=1", "data.shuffle_buffer=16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny.write_shards(tmp_path_factory.mktemp("shards"), num_shards=2, per_shard=12, corrupt=1)


def _losses(result):
    return [record["loss"] for record in result.history if "loss" in record]


def _recipe(name, *overrides):
    return load_recipe(name, [*FAST, *overrides])


@pytest.fixture(scope="module")
def stage1_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage1")
    result = train(_recipe("tiny_stage1", "train.max_steps=40", "train.save_every=20"), run_dir, shards, device="cpu")
    return result


def test_stage1_learns_and_writes_checkpoints(stage1_run):
    losses = _losses(stage1_run)
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    record = stage1_run.history[-1]
    assert {"loss_itc", "loss_itm", "loss_itg", "lr", "samples_per_s"} <= set(record)
    # Corrupt samples were skipped and counted, not fatal.
    assert sum(record["skipped"].values()) >= 1
    run_dir = stage1_run.run_dir
    assert (run_dir / "latest").read_text().strip() == "step-00000040"
    assert json.loads((run_dir / "step-00000040" / "state.json").read_text())["step"] == 40
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[-1])["step"] == 40
    loaded = load_model(stage1_run.final_checkpoint)
    assert loaded.stage == 1 and loaded.tokenizer.bos_token == "[DEC]"


def test_stage2_decoder_only_from_stage1(stage1_run, shards, tmp_path):
    recipe = _recipe("tiny_stage2_opt", "train.max_steps=30", f"model.init_from={stage1_run.final_checkpoint}")
    result = train(recipe, tmp_path / "run", shards, device="cpu")
    losses = _losses(result)
    # The tiny LLM was pre-trained on the captions (text only), so the loss starts near its text-only level
    # and what remains to learn is the image-dependent part (the colours).
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    loaded = load_model(result.final_checkpoint)
    # The Q-Former query path came from stage 1 and was trained on: it is not the stage-1 one any more,
    # while the frozen ViT is exactly stage 1's.
    stage1 = load_model(stage1_run.final_checkpoint).model
    vit = "embeddings.patch_embedding.weight"
    assert torch.equal(loaded.model.vision_model.state_dict()[vit], stage1.vision_model.state_dict()[vit])
    assert not torch.equal(loaded.model.query_tokens, stage1.query_tokens)


def test_stage2_encoder_decoder(shards, tmp_path):
    # A fixed encoder prompt makes the whole caption the decoder's target (deterministic, unlike the
    # prefix-LM split, whose suffix the text-pretrained LLM mostly predicts without the image).
    recipe = _recipe("tiny_stage2_opt", "model.llm=tiny-t5", "model.prompt=a photo of", "optim.lr=5e-3",
                     "train.max_steps=30")
    result = train(recipe, tmp_path / "run", shards, device="cpu")
    losses = _losses(result)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert load_model(result.final_checkpoint).model.is_encoder_decoder


def test_resume_reproduces_uninterrupted_run(shards, tmp_path):
    recipe = _recipe("tiny_stage1", "train.max_steps=8", "train.save_every=0")
    straight = train(recipe, tmp_path / "straight", shards, device="cpu")
    first = train(recipe, tmp_path / "resumed", shards, device="cpu", stop_after=3)
    assert first.steps == 3 and first.final_checkpoint is None
    rest = train(recipe, tmp_path / "resumed", shards, device="cpu", resume="auto")
    assert _losses(first) + _losses(rest) == pytest.approx(_losses(straight), abs=1e-6)
    a = load_file(tmp_path / "straight" / "step-00000008" / "trainable.safetensors")
    b = load_file(tmp_path / "resumed" / "step-00000008" / "trainable.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_validation_reports_held_out_loss_without_changing_training(shards, tmp_path):
    base = ["train.max_steps=6", "train.save_every=0", "optim.warmup_steps=1"]
    plain = train(_recipe("tiny_stage1", *base), tmp_path / "plain", shards, device="cpu")
    validated = train(
        _recipe("tiny_stage1", *base, "train.eval_every=3", f"data.val_shards={json.dumps(shards[:1])}",
                "eval.max_batches=2"),
        tmp_path / "validated", shards, device="cpu",
    )
    val_records = [r for r in validated.history if "val_loss" in r]
    assert [r["step"] for r in val_records] == [3, 6]
    assert {"val_loss_itc", "val_loss_itm", "val_loss_itg"} <= set(val_records[0])
    assert all(0 < r["val_loss"] < 20 for r in val_records)
    # Validation forks the RNG and restores train mode: the training losses are exactly those of a run
    # without it.
    train_losses = [r["loss"] for r in validated.history if "loss" in r]
    assert train_losses == pytest.approx(_losses(plain), abs=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "validated" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_loss" in r for r in logged) == 2 and all("eta_s" in r for r in logged if "loss" in r)


def test_dry_run_and_batch_checks(shards, tmp_path):
    result = train(_recipe("tiny_stage1"), tmp_path / "dry", shards, device="cpu", dry_run=True)
    assert result.steps == 0 and result.parameter_counts["trainable"] > 0 and result.parameter_counts["frozen"] > 0
    assert not (tmp_path / "dry" / "latest").exists()
    with pytest.raises(Blip2Error, match="global_batch_size"):
        train(_recipe("tiny_stage1", "data.global_batch_size=6", "data.micro_batch_size=4"), tmp_path / "x",
              shards, device="cpu").history
    with pytest.raises(Blip2Error, match="cannot resume"):
        train(_recipe("tiny_stage1"), tmp_path / "y", shards, device="cpu", resume=str(tmp_path / "nowhere"))


def test_two_process_ddp_stage1(shards, tmp_path):
    """`--nproc-per-node 2` relaunches under torchrun: two gloo processes train one model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "blip2cli", "pretrain", "--stage", "1", "--recipe", "tiny_stage1",
        "--out", str(tmp_path / "ddp"), "--device", "cpu", "--nproc-per-node", "2",
        "train.max_steps=4", "optim.warmup_steps=1", "train.log_every=1", f"data.shards={json.dumps(shards)}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").exists()


def test_plot_writes_curves_of_a_run(stage1_run, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from blip2cli.cli import app
    from blip2cli.plotting import read_curves

    curves = read_curves(stage1_run.run_dir)
    assert [step for step, _ in curves["loss"]] == list(range(1, 41))
    assert {"loss_itc", "loss_itm", "loss_itg", "lr"} <= set(curves)
    result = CliRunner().invoke(app, ["plot", str(stage1_run.run_dir), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    losses = Image.open(tmp_path / "plots" / "losses.png")
    assert losses.size == (520, 340)
    # Curves were drawn: the chart holds more than a handful of colours (white, black text, four series).
    assert len(losses.getcolors(maxcolors=100_000)) > 10
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["plot", str(empty)])
    assert result.exit_code != 0 and "no metrics.jsonl" in str(result.exception)


def test_launch_counts_shard_files_and_rejects_missing_ones(shards, tmp_path):
    from blip2cli.training.launch import plan_pretrain

    directory = str(Path(shards[0]).parent)
    plan = plan_pretrain(1, "tiny_stage1", [f"data.shards={json.dumps([directory])}"], out=tmp_path / "run")
    assert plan.shard_files == 2 and plan.shards == [directory]
    with pytest.raises(Blip2Error, match="shard not found"):
        plan_pretrain(1, "tiny_stage1", [f"data.shards={json.dumps([directory + '/{00000..00005}.tar'])}"],
                      out=tmp_path / "run")
