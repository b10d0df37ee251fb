"""The command line as a newcomer meets it: one spelling per concept, helps without holes, a recipe that
implies its stage, whole recipe names for runs, hub access that fails fast in one line, `recipes copy`
into a directory, overlaid plots, the demo's report, and a start-up that imports no heavy library."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli import hub
from blip2cli.cli import app
from blip2cli.errors import Blip2Error, ModelNotFoundError
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens on the discard port: connections are refused at once


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny.write_shards(tmp_path_factory.mktemp("shards"), num_shards=1, per_shard=8)


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An unreachable hub and an empty Hugging Face cache, offline mode not set."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    hub.reachable.cache_clear()
    yield tmp_path / "hf" / "hub"
    hub.reachable.cache_clear()


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    return {**env, "HF_ENDPOINT": CLOSED_PORT, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------ start-up
def test_the_cli_imports_no_heavy_library():
    code = ("import sys, blip2cli.cli; print(' '.join(m for m in ('torch', 'transformers', 'numpy', 'open_clip', "
            "'huggingface_hub', 'PIL', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == ""


# ------------------------------------------------------------------------------------------ helps
def _commands(group, prefix=()):
    """(argv prefix, click command) of every visible command."""
    import typer

    command = typer.main.get_command(app) if group is None else group
    for name, sub in getattr(command, "commands", {}).items():
        if sub.hidden:
            continue
        if getattr(sub, "commands", None):
            yield from _commands(sub, (*prefix, name))
        else:
            yield (*prefix, name), sub


def test_every_help_is_whole_and_shows_flags_as_flags():
    commands = list(_commands(None))
    assert {("eval", "vqav2"), ("eval", "report"), ("download", "model"), ("recipes", "copy")} <= {c for c, _ in commands}
    for argv, command in commands:
        for param in command.params:
            if param.name != "help" and not param.hidden:
                assert param.help and param.help.strip(" .[]"), f"{' '.join(argv)} {param.name}: no help"
        text = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "400"}).output
        assert "Examples:" in text, argv
        assert "<bool>" not in text, argv
        assert not re.search(r"\s\.\s*(│|$)", text, re.M), f"{' '.join(argv)}: a help lost its text:\n{text}"
    demo = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "400"}).output
    assert "<full|small>" in demo and "[default: full]" in demo
    evaluation = CliRunner().invoke(app, ["eval", "okvqa", "--help"], env={"COLUMNS": "400"}).output
    assert '".[eval]"' in evaluation and "[default: 10 for VQA, 30 for captions]" in evaluation
    assert "--k-test" not in evaluation  # retrieval-only options are not shown for VQA (and still accepted)


def _type_name(param) -> str:
    """"path", "text"...: click's type name (typer < 0.29) or typer's type descriptor."""
    if hasattr(param, "type"):
        return "path" if param.type.name == "path" else param.type.name
    return "path" if param.type_descriptor.is_path else param.bare_type()


def test_one_spelling_and_one_set_of_values_per_concept():
    from blip2cli.cli._common import check_dtype

    helps = {}
    for argv, command in _commands(None):
        for param in command.params:
            for opt in param.opts:
                helps.setdefault(opt, set()).add((param.help, getattr(param, "metavar", None), _type_name(param)))
    # --device, --dtype and --root mean the same everywhere, with the same values and type
    assert all(metavar == "<auto|cpu|cuda|cuda:N>" for _, metavar, _ in helps["--device"])
    assert {metavar for _, metavar, _ in helps["--dtype"]} == {"<auto|float32|bfloat16|float16>"}
    assert {(h, t) for h, _, t in helps["--root"]} == {("Workspace root \\[default: $BLIP2_HOME, else ./blip2-data].",
                                                         "path")}
    assert len({h for h, _, _ in helps["--model"]}) > 1 and all("hub id" in h for h, _, _ in helps["--model"])
    assert "--checkpoint" not in helps and "--ckpt" not in helps
    assert check_dtype("bf16") == "bfloat16" and check_dtype("FP32") == "float32"
    with pytest.raises(Blip2Error, match="unknown dtype 'float8'; use auto, float32, bfloat16 or float16"):
        check_dtype("float8")
    # capfilt's old --overwrite still works, hidden, beside the --restart every resumable command has
    capfilt = dict(_commands(None))[("capfilt",)]
    overwrite = next(p for p in capfilt.params if "--overwrite" in p.opts)
    assert overwrite.hidden and any("--restart" in p.opts for p in capfilt.params)


# ------------------------------------------------------------------------------------------ pretrain
def test_a_recipe_implies_its_stage_and_names_the_run(shards, tmp_path):
    mine = tmp_path / "my.v2.toml"  # a copy whose name has a dot: the run keeps the whole name
    result = CliRunner().invoke(app, ["recipes", "copy", "tiny_stage1", str(mine)])
    assert result.exit_code == 0, result.output
    root = tmp_path / "ws"
    result = CliRunner().invoke(app, ["pretrain", "--recipe", str(mine), "--root", str(root), "--dry-run",
                                      f"data.shards={json.dumps(shards)}"])
    assert result.exit_code == 0, result.output
    assert f"recipe my.v2 -> {root / 'runs' / 'my.v2'}" in " ".join(result.output.split())

    with pytest.raises(Blip2Error, match="--stage 2, but recipe tiny_stage1 trains stage 1"):
        CliRunner().invoke(app, ["pretrain", "--stage", "2", "--recipe", "tiny_stage1"], catch_exceptions=False)
    with pytest.raises(Blip2Error, match="give --stage 1 or --stage 2, or --recipe"):
        CliRunner().invoke(app, ["pretrain"], catch_exceptions=False)


def test_training_names_its_gpu_the_way_it_can_use_it():
    from blip2cli.training.launch import training_device

    assert [training_device(d) for d in ("auto", "cpu", "cuda", "cuda:0")] == ["auto", "cpu", "cuda", "cuda:0"]
    with pytest.raises(Blip2Error, match="CUDA_VISIBLE_DEVICES=1 blip2 ... --device cuda"):
        training_device("cuda:1")


def test_run_directories_keep_the_whole_recipe_name():
    from blip2cli.training.launch import STAGE2_RECIPES, run_name

    assert run_name("pretrain_stage2_opt2.7b") == "pretrain_stage2_opt2.7b"
    assert [run_name(n) for n in STAGE2_RECIPES.values()] == list(STAGE2_RECIPES.values())
    assert run_name("configs/my.v2.toml") == "my.v2"


def test_run_latest_pointer_is_a_checkpoint(tmp_path):
    """`--init-from RUN/latest`, as the recipe headers write it: the step the pointer names."""
    from blip2cli.checkpoint import LATEST_POINTER, STEP_STATE_FILENAME, STEP_WEIGHTS_FILENAME, resolve_checkpoint

    step = tmp_path / "run" / "step-00000004"
    step.mkdir(parents=True)
    (step / STEP_WEIGHTS_FILENAME).write_bytes(b"")
    (step / STEP_STATE_FILENAME).write_text("{}")
    (tmp_path / "run" / LATEST_POINTER).write_text("step-00000004\n")
    assert resolve_checkpoint(tmp_path / "run" / LATEST_POINTER) == step
    assert resolve_checkpoint(tmp_path / "run") == step  # a run directory without final/: its latest step


def test_recipe_headers_launch_lines_name_a_stage_or_a_recipe():
    from blip2cli.recipes import RECIPES_DIR, list_recipe_names, recipe_header

    for name in list_recipe_names():
        for line in recipe_header(RECIPES_DIR / f"{name}.toml"):
            if re.search(r"\b(blip2|blip2cli) pretrain\b", line):
                assert "--recipe" in line or "--stage" in line, f"{name}: {line}"


# ------------------------------------------------------------------------------------------ the hub
def test_an_unreachable_hub_fails_in_seconds_with_one_line(tmp_path):
    """The whole command, as a user runs it: no retries, no traceback, one line naming the model, where it
    was looked for, and how to fetch it."""
    image = tmp_path / "photo.jpg"
    tiny.random_images(1)[0].save(image)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "blip2cli", "ask", str(image), "--model", "Salesforce/blip2-opt-2.7b"],
                          capture_output=True, text=True, env=_subprocess_env(tmp_path), timeout=120)
    elapsed = time.monotonic() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("blip2: error: BLIP-2 checkpoint Salesforce/blip2-opt-2.7b is not in the Hugging Face cache")
    assert str(tmp_path / "hf" / "hub") in lines[0] and "`blip2 download model Salesforce/blip2-opt-2.7b`" in lines[0]
    assert elapsed < 30  # python + torch start-up; the hub costs one refused connection


@pytest.mark.parametrize("load, words", [
    (lambda: __import__("blip2cli.models.llm", fromlist=["x"]).load_language_model("opt-2.7b"),
     "language model facebook/opt-2.7b"),
    (lambda: __import__("blip2cli.models.vision_loading", fromlist=["x"]).load_vision_encoder("eva-vit-g"),
     "image encoder open_clip:EVA01-g-14:laion400m_s11b_b41k"),
    (lambda: __import__("blip2cli.models.vision_loading", fromlist=["x"]).load_vision_encoder("hf:facebook/dinov2-small"),
     "`blip2 download model hf:facebook/dinov2-small`"),
    (lambda: __import__("blip2cli.data.capfilt", fromlist=["x"]).BlipCaptioner(
        __import__("blip2cli.data.capfilt", fromlist=["x"]).CapfiltSettings()),
     "CapFilt captioner Salesforce/blip-image-captioning-large"),
    (lambda: __import__("blip2cli.data.capfilt", fromlist=["x"]).ClipRanker("ViT-L-14", "openai"),
     "CapFilt ranker open_clip:ViT-L-14:openai"),
])
def test_every_hub_loader_fails_fast_offline(no_hub, load, words):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as error:
        load()
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert words in message and "\n" not in message and "cannot be reached" in message


def test_hf_hub_offline_is_one_line_too(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set; fetch it where there is network"):
        hub.require("facebook/opt-2.7b", "language model")


def test_a_recipe_whose_parts_are_not_cached_stops_before_building(no_hub, shards, tmp_path):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="image encoder eva-vit-g open_clip:EVA01-g-14"):
        CliRunner().invoke(app, ["pretrain", "--recipe", "pretrain_stage1_vitg", "--dry-run", "--out",
                                 str(tmp_path / "run"), f"data.shards={json.dumps(shards)}"], catch_exceptions=False)
    assert time.monotonic() - start < 5


def test_a_cached_model_loads_without_the_hub(no_hub, hf_opt_dir):
    """Unreachable hub, model in the cache: blip2 reads the cache (offline mode) instead of retrying."""
    from blip2cli.checkpoint import load_model

    snapshot = no_hub / "models--blip2-test--tiny-opt" / "snapshots" / "0123abc"
    shutil.copytree(hf_opt_dir, snapshot)
    (no_hub / "models--blip2-test--tiny-opt" / "refs").mkdir()
    (no_hub / "models--blip2-test--tiny-opt" / "refs" / "main").write_text("0123abc")
    start = time.monotonic()
    loaded = load_model("blip2-test/tiny-opt")
    assert time.monotonic() - start < 20
    assert loaded.stage == 2 and hub.offline_mode()


def test_download_model_names_what_it_fetches(no_hub):
    from blip2cli.hub import download_targets

    targets = download_targets(["pretrain_stage2_opt2.7b", "opt-2.7b", "Salesforce/blip2-opt-2.7b", "hf:org/enc"])
    assert [(t.what, t.repo_id, t.open_clip) for t in targets] == [
        ("image encoder eva-vit-g", None, ("EVA01-g-14", "laion400m_s11b_b41k")),  # the recipe's parts...
        ("Q-Former BERT", "bert-base-uncased", None),
        ("language model opt-2.7b", "facebook/opt-2.7b", None),  # (opt-2.7b again: listed once)
        ("model", "Salesforce/blip2-opt-2.7b", None),
        ("image encoder hf:org/enc", "org/enc", None),
    ]
    assert download_targets(["tiny_stage1"]) == []  # tiny parts are built from configs
    with pytest.raises(Blip2Error, match="unknown model name 'opt-2.7'"):
        download_targets(["opt-2.7"])
    start = time.monotonic()
    result = CliRunner().invoke(app, ["download", "model", "Salesforce/blip2-opt-2.7b"])
    assert isinstance(result.exception, ModelNotFoundError) and "cannot be reached" in str(result.exception)
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------------ recipes copy
def test_recipes_copy_into_a_directory(tmp_path):
    def copy(*args):
        return CliRunner().invoke(app, ["recipes", "copy", *args])

    assert copy("tiny_stage1", f"{tmp_path / 'new'}/").exit_code == 0  # a directory that does not exist yet
    assert (tmp_path / "new" / "tiny_stage1.toml").is_file()
    (tmp_path / "there").mkdir()
    assert copy("tiny_stage1", str(tmp_path / "there")).exit_code == 0
    assert (tmp_path / "there" / "tiny_stage1.toml").read_text().startswith("# Tiny stage-1 run")
    assert copy("pretrain_stage2_opt2.7b", str(tmp_path / "mine.toml")).exit_code == 0
    again = copy("tiny_stage1", str(tmp_path / "there"))
    assert isinstance(again.exception, Blip2Error) and "already exists; pass --force" in str(again.exception)
    assert copy("tiny_stage1", str(tmp_path / "there"), "--force").exit_code == 0


def test_recipes_list_fits_the_terminal():
    result = CliRunner().invoke(app, ["recipes", "list"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 100
    assert "pretrain_stage2_opt2.7b" in result.output


# ------------------------------------------------------------------------------------------ plot
def _fake_run(directory: Path, scale: float) -> Path:
    directory.mkdir(parents=True)
    with (directory / "metrics.jsonl").open("w") as f:
        for step in range(1, 201):
            lr = 1e-4 * min(1.0, step / 20) * (1 - step / 250)
            f.write(json.dumps({"step": step, "loss": scale * (0.5 + 2 / step), "lr": lr}) + "\n")
    return directory


def test_plot_overlays_runs_in_one_figure(tmp_path):
    from blip2cli.plotting import PALETTE, log_ticks, nice_ticks

    runs = [_fake_run(tmp_path / "runs" / "stage2", 1.0), _fake_run(tmp_path / "runs" / "stage2_no_stage1", 1.3)]
    result = CliRunner().invoke(app, ["plot", *map(str, runs)])
    assert result.exit_code == 0, result.output
    figure = tmp_path / "runs" / "curves.png"
    assert result.output.strip() == str(figure)
    colours = {c for _, c in Image.open(figure).convert("RGB").getcolors(maxcolors=1_000_000)}
    assert {PALETTE[0], PALETTE[1]} <= colours  # both runs drawn in one figure
    assert nice_ticks(0, 2400) == [0, 500, 1000, 1500, 2000] and nice_ticks(0.23, 2.5) == [0.5, 1, 1.5, 2, 2.5]
    assert log_ticks(1e-6, 1e-4) == [1e-6, 1e-5, 1e-4]  # the learning rate's axis: powers of ten


# ------------------------------------------------------------------------------------------ the demo
def _demo_result(tmp_path, size: str, vqa: float):
    from blip2cli.demo.runner import DemoResult

    result = DemoResult(tmp_path, size=size, seconds={"stage1": 300.0, "stage2": 330.0},
                        metrics={"stage2": {"accuracy": vqa, "CIDEr": 300.0}},
                        baselines={"vqa_majority": 12.7, "caption_constant_cider": 72.0}, scorer="blip2 eval",
                        ask={"image": str(tmp_path / "world" / "a b.jpg"), "truth": "t", "caption": "c",
                             "question": "q", "answer": "a", "expected_answer": "a"})
    (tmp_path / "runs" / "stage1" / "final").mkdir(parents=True, exist_ok=True)
    return result


def test_demo_report_targets_and_closing_lines(tmp_path):
    from rich.console import Console

    from blip2cli.demo.report import closing_lines, print_report
    from blip2cli.demo.runner import DEMO_SIZES

    def report(size, vqa):
        console = Console(record=True, width=250)
        print_report(_demo_result(tmp_path, size, vqa), console)
        return console.export_text()

    full_miss, small_miss = report("full", 60.0), report("small", 60.0)
    assert "target" in full_miss and "issue target" not in full_miss
    assert "✗" in full_miss  # the full size is meant to reach its targets
    assert "✗" not in small_miss and "not reached; full size only" in small_miss  # the small one: information
    assert "✓" in report("full", 80.0)
    lines = closing_lines(_demo_result(tmp_path, "small", 60.0))
    assert lines[0] == f"blip2 demo --size small took 10.5 minutes (runs of this size: {DEMO_SIZES['small'].duration()})."
    assert f"stage 2 {tmp_path / 'runs' / 'stage2' / 'final'}" in lines[1]
    assert f"blip2 ask '{tmp_path / 'world' / 'a b.jpg'}' --model {tmp_path / 'runs' / 'stage2' / 'final'}" in lines[3]


def test_the_demo_time_is_stated_once_everywhere():
    """README, `blip2 demo --help` and the demo's closing lines give the same durations (DEMO_SIZES)."""
    from blip2cli.demo.runner import DEMO_SIZES

    readme = " ".join((ROOT / "README.md").read_text().split())
    demo_help = " ".join(CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "300"}).output.split())
    for size in DEMO_SIZES.values():
        assert size.duration() in readme and size.duration() in demo_help
    stated = set(re.findall(r"(\d+(?:\.\d+)?-\d+(?:\.\d+)? minutes)", readme))
    assert stated <= {s.duration().removesuffix(" on 2 CPU cores") for s in DEMO_SIZES.values()} | {"20 minutes"}, stated
