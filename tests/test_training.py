"""End-to-end training on tiny shards: stage 1, stage 2 (decoder-only and encoder-decoder), resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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
    # tiny_stage1 accumulates 2 micro-batches of 4 on one process (allowed explicitly): each contrasts 4
    assert (record["contrastive_batch"], record["itc_negatives"]) == (4, 3)
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


def test_deterministic_runs_are_bit_identical(shards, tmp_path):
    """train.deterministic switches to deterministic kernels; two runs then agree bit for bit."""
    recipe = _recipe("tiny_stage1", "train.max_steps=6", "train.save_every=0", "train.deterministic=true")
    try:
        first = train(recipe, tmp_path / "first", shards, device="cpu")
        assert torch.are_deterministic_algorithms_enabled()
        second = train(recipe, tmp_path / "second", shards, device="cpu")
    finally:
        torch.use_deterministic_algorithms(False)  # process-wide: keep the other tests as they were
    assert _losses(first) == _losses(second)
    a = load_file(first.final_checkpoint / "model.safetensors")
    b = load_file(second.final_checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
    # stage 1 does not accumulate ITC/ITM batches unless the recipe allows it (refused before any model is built)
    with pytest.raises(Blip2Error, match="negatives from 4 samples instead of 8; set data.micro_batch_size=8"):
        train(_recipe("tiny_stage1", "~train.allow_contrastive_accumulation"), tmp_path / "z", shards,
              device="cpu", dry_run=True)


def test_two_process_ddp_stage1_stops_on_sigusr1_and_resumes(shards, tmp_path):
    """`--nproc-per-node 2` relaunches under torchrun: two gloo processes train one model. SIGUSR1 (SLURM's
    warning before the time limit) sent to the launcher reaches every rank, which save and stop; the same
    command then finishes the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "blip2cli", "pretrain", "--stage", "1", "--recipe", "tiny_stage1",
        "--out", str(out), "--device", "cpu", "--nproc-per-node", "2",
        "train.max_steps=40", "optim.warmup_steps=1", "train.log_every=1", "train.save_every=0",
        f"data.shards={json.dumps(shards)}",
    ]  # 40 steps: the signal must arrive while the run goes on
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("blip2: stopped: SIGUSR1 after step")]
    assert len(stops) == 2 and any("saved " in line for line in stops), err[-3000:]  # one line per rank
    step = int(stops[0].split("after step ")[1].split(":")[0])
    assert (out / "latest").read_text().strip() == f"step-{step:08d}"

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    # 4 per process x 2 processes: one contrastive batch of 8 per step (no accumulation)
    assert all((r["contrastive_batch"], r["itc_negatives"]) == (8, 7) for r in records)
    assert (out / "final" / "model.safetensors").exists()


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
    curves = Image.open(tmp_path / "plots" / "curves.png")
    assert curves.size == (2 * 560, 3 * 360)  # loss, loss_itc, loss_itg, loss_itm, lr: five panels in rows of two
    # Curves were drawn: the chart holds more than a handful of colours (white, black text, anti-aliased lines).
    assert len(curves.getcolors(maxcolors=100_000)) > 10
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


# ------------------------------------------------------------------------------------------ FSDP
def _torchrun_worker(out: Path, shards: list[str], group: str) -> dict[str, list[dict]]:
    """tests/fsdp_worker.py under torchrun (2 gloo processes): {run name: its metrics records}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("fsdp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), str(out), json.dumps(shards), group]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    old_torch = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)  # 2.14.1 is tested
    if old_torch and proc.returncode != 0 and "fsdp on CPU (gloo) needs a newer torch" in proc.stderr:
        pytest.skip(f"this torch ({torch.__version__}) cannot run FSDP on CPU; blip2 refuses it (sharding.py)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}


def _train_losses(records):
    return [r["loss"] for r in records if "loss" in r]


def _same_weights(a: dict, b: dict, atol: float) -> bool:
    """Equal up to ``atol``, except attention key biases: their gradient is zero in exact arithmetic (softmax
    ignores a shift shared by a row), so AdamW turns rounding noise, which differs between DDP's all-reduce
    and FSDP's reduce-scatter, into lr-sized steps."""
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a if not k.endswith("key.bias"))


@pytest.fixture(scope="module")
def fsdp_runs(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, _torchrun_worker(out, shards, "opt")


def test_fsdp_stage2_learns_and_matches_ddp(fsdp_runs):
    """FSDP is data parallelism with sharded storage: same seed, same data, same losses and weights as DDP."""
    out, runs = fsdp_runs
    fsdp, ddp = _train_losses(runs["fsdp"]), _train_losses(runs["ddp"])
    assert len(fsdp) == 6 and fsdp == pytest.approx(ddp, abs=1e-6)
    assert sum(fsdp[-2:]) < 0.95 * sum(fsdp[:2])
    grad_norms = [r["grad_norm"] for r in runs["fsdp"] if "grad_norm" in r]
    assert grad_norms == pytest.approx([r["grad_norm"] for r in runs["ddp"] if "grad_norm" in r], rel=1e-5)
    # The held-out loss ran on the sharded model (every rank) without changing the training run.
    val = [r for r in runs["fsdp"] if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6] and all(0 < r["val_loss"] < 20 for r in val)
    # Rank 0 wrote DDP's checkpoint format: same trainable names and values, same optimizer layout.
    step = "step-00000006"
    a = load_file(out / "fsdp" / step / "trainable.safetensors")
    b = load_file(out / "ddp" / step / "trainable.safetensors")
    assert _same_weights(a, b, atol=1e-5)
    oa = torch.load(out / "fsdp" / step / "optimizer.pt", weights_only=True)
    ob = torch.load(out / "ddp" / step / "optimizer.pt", weights_only=True)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for index, state in oa["state"].items():
        assert all(torch.allclose(state[k], ob["state"][index][k], atol=1e-6) for k in state)
    manifests = [json.loads((out / run / step / "state.json").read_text())["manifest"] for run in ("fsdp", "ddp")]
    for manifest in manifests:  # each run has its own base (RUN/base), hence its own id
        assert len(manifest.pop("base_id")) == 32
    assert manifests[0] == manifests[1]  # the frozen fingerprint was taken before sharding


def test_fsdp_resume_reproduces_uninterrupted_run(fsdp_runs):
    out, runs = fsdp_runs
    straight = _train_losses(runs["fsdp"])
    assert _train_losses(runs["fsdp_first"]) + _train_losses(runs["fsdp_rest"]) == pytest.approx(straight, abs=1e-6)
    a = load_file(out / "fsdp" / "step-00000006" / "trainable.safetensors")
    b = load_file(out / "fsdp_resumed" / "step-00000006" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The FSDP checkpoint resumes under DDP too (same files), into another run directory.
    assert _train_losses(runs["ddp_from_fsdp"]) == pytest.approx(straight[2:], abs=1e-6)
    assert (out / "ddp_from_fsdp" / "recipe.toml").exists()


def test_fsdp_sigterm_on_one_rank_stops_every_rank_after_a_save(fsdp_runs):
    out, runs = fsdp_runs
    stops = {rank: (out / f"stopped_rank{rank}.txt").read_text() for rank in (0, 1)}
    assert stops[0].startswith("143 SIGTERM after step 3: saved ") and "fsdp_signal/step-00000003" in stops[0]
    assert stops[1].startswith("143 SIGTERM after step 3: rank 0 saved step 3")
    records = [json.loads(line) for line in (out / "fsdp_signal" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert _train_losses(records) == pytest.approx(_train_losses(runs["fsdp"]), abs=1e-6)
    assert _train_losses(runs["fsdp_signal_rest"]) == pytest.approx(_train_losses(records)[3:], abs=1e-6)


def test_fsdp_final_checkpoint_is_a_full_model(fsdp_runs):
    out, _ = fsdp_runs
    assert sorted(p.name for p in (out / "fsdp" / "final").iterdir()) == \
        sorted(p.name for p in (out / "ddp" / "final").iterdir())
    fsdp, ddp = load_model(out / "fsdp" / "final"), load_model(out / "ddp" / "final")
    assert fsdp.stage == 2 and not fsdp.model.is_encoder_decoder
    a, b = fsdp.model.state_dict(), ddp.model.state_dict()
    assert _same_weights(a, b, atol=1e-5)
    trained = load_file(out / "fsdp" / "step-00000006" / "trainable.safetensors")
    assert all(torch.equal(a[k], v) for k, v in trained.items())  # the final model holds the last step's weights
    assert all(torch.equal(a[k], b[k]) for k in a if k not in trained)  # frozen: untouched and complete


def test_fsdp_encoder_decoder_and_bf16(shards, tmp_path):
    runs = _torchrun_worker(tmp_path, shards, "more")
    assert _train_losses(runs["fsdp_t5"]) == pytest.approx(_train_losses(runs["ddp_t5"]), abs=1e-5)
    a = load_model(tmp_path / "fsdp_t5" / "final").model.state_dict()
    b = load_model(tmp_path / "ddp_t5" / "final").model.state_dict()
    assert _same_weights(a, b, atol=1e-5)
    trained = load_file(tmp_path / "fsdp_t5" / "step-00000003" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k not in trained)
    # bf16: FSDP gathers the Q-Former in bf16 (DDP autocasts fp32 weights): close, not identical.
    fsdp, ddp = _train_losses(runs["fsdp_bf16"]), _train_losses(runs["ddp_bf16"])
    assert len(fsdp) == 3 and fsdp == pytest.approx(ddp, abs=1e-2)


def test_fsdp_recipe_checks_and_one_process():
    from blip2cli.distributed import DistEnv
    from blip2cli.training.session import _use_fsdp

    with pytest.raises(Blip2Error, match="dist.strategy: fsdp shards stage-2"):
        _recipe("tiny_stage1", "dist.strategy=fsdp")
    with pytest.raises(Blip2Error, match="eval.task: in-loop generation"):
        _recipe("tiny_stage2_opt", "dist.strategy=fsdp", "train.eval_every=5", "eval.task=coco")
    # One process: nothing to shard over; the model trains unsharded, and the run says so.
    said = []
    assert not _use_fsdp(_recipe("tiny_stage2_opt", "dist.strategy=fsdp"), DistEnv(), said.append)
    assert "training unsharded" in said[0]


def test_fsdp_groups_are_the_transformer_blocks():
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Blip2VisionModel, OPTConfig, T5Config

    from blip2cli.training.sharding import transformer_blocks

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, ffn_dim=32,
                                                     num_attention_heads=2, word_embed_proj_dim=16))
    assert [type(b).__name__ for b in transformer_blocks(opt)] == ["OPTDecoderLayer"] * 3
    t5 = AutoModelForSeq2SeqLM.from_config(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                    num_decoder_layers=3, num_heads=2))
    assert [type(b).__name__ for b in transformer_blocks(t5)] == ["T5Block"] * 5
    # Blip2Attention is listed too, but inside Blip2EncoderLayer: only outermost modules are groups.
    vit = Blip2VisionModel(tiny.vision_config(num_hidden_layers=2))
    assert [type(b).__name__ for b in transformer_blocks(vit)] == ["Blip2VisionEmbeddings"] + ["Blip2EncoderLayer"] * 2
    # Towers without _no_split_modules (open_clip): the entries of their largest uniform ModuleList.
    tower = torch.nn.Module()
    tower.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
    tower.heads = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
    assert transformer_blocks(tower) == list(tower.blocks)
