"""`blip2 caption` / `blip2 ask` over many images: same outputs as `ask` one image at a time (left-padded
batches, greedy and beam search), every input kind, unreadable images skipped and counted, and resuming
after a real kill and after a torn write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.checkpoint import load_model
from blip2cli.cli import app
from blip2cli.errors import Blip2Error
from blip2cli.inference import Blip2Assistant
from blip2cli.inference.batch import BatchSettings, caption_jobs, run_batch
from blip2cli.inference.inputs import collect_images, names_many_images
from tests import tiny

REPO = Path(__file__).resolve().parents[1]
PAIRS = [("red", "blue"), ("green", "white"), ("yellow", "black"), ("blue", "red"), ("white", "green"),
         ("black", "yellow")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-sensitive")
    return {family: tiny.save_hf_blip2(root / family, family, seed=1, image_sensitive=True) for family in ("opt", "t5")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "nested").mkdir()
    for i, (fg, bg) in enumerate(PAIRS):
        target = folder / ("nested" if i % 2 else ".") / f"{i}-{fg}.png"
        tiny.shape_image(fg, bg).save(target)
    (folder / "broken.jpg").write_text("not a jpeg")
    return folder


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", ["opt", "t5"])
@pytest.mark.parametrize("beams", [1, 3])
def test_caption_folder_equals_ask_per_image(models, photos, tmp_path, family, beams):
    out = tmp_path / "captions.jsonl"
    flags = ["--num-beams", beams, "--max-new-tokens", 6, "--device", "cpu"]
    result = _invoke("caption", photos, "--model", models[family], "--out", out, "--batch-size", 4, "--workers", 0,
                     *flags)
    assert "6 generated" in result.stderr and "1 unreadable skipped" in result.stderr and "broken.jpg" in result.stderr
    captions = {r["image"]: r["caption"] for r in _records(out)}
    assert sorted(Path(k).name for k in captions) == sorted(f"{i}-{fg}.png" for i, (fg, _) in enumerate(PAIRS))
    assert len(set(captions.values())) >= 3  # the images really lead to different outputs

    assistant = Blip2Assistant(load_model(models[family]))
    options = assistant.resolve("caption", {"num_beams": beams, "max_new_tokens": 6})[1]
    for image, text in captions.items():
        from blip2cli.images import load_image

        assert text == assistant.caption(load_image(image), options=options), image
    if beams == 3:  # and `blip2 ask` itself, for one image
        image = next(iter(captions))
        assert _invoke("ask", image, "--model", models[family], *flags).stdout.strip() == captions[image]


@pytest.mark.parametrize("family", ["opt", "t5"])
@pytest.mark.parametrize("beams", [1, 3])
def test_questions_in_left_padded_batches_equal_ask(models, photos, tmp_path, family, beams):
    questions = ["what colour is the square?", "is it big?", "where?", "what is on the left side of the picture?"]
    images = sorted(p for p in photos.rglob("*.png"))
    lines = [{"image": str(images[i % 3].relative_to(photos)), "question": q} for i, q in enumerate(questions)]
    qfile = photos / f"questions-{family}-{beams}.jsonl"
    qfile.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "answers.jsonl"
    _invoke("ask", "--questions", qfile, "--model", models[family], "--out", out, "--batch-size", 4, "--workers", 0,
            "--num-beams", beams, "--max-new-tokens", 5)
    answers = {(Path(r["image"]).name, r["question"]): r["answer"] for r in _records(out)}
    assert len(answers) == 4

    assistant = Blip2Assistant(load_model(models[family]))
    template = assistant.default_template
    lengths = {len(assistant.tokenizer(template.format(q))["input_ids"]) for q in questions}
    assert len(lengths) == 4  # one batch of four prompts of different lengths: padding is exercised
    options = assistant.resolve("vqa", {"num_beams": beams, "max_new_tokens": 5})[1]
    from blip2cli.images import load_image

    for line in lines:
        image = photos / line["image"]
        alone = assistant.answer(load_image(image), line["question"], options=options)
        assert answers[(image.name, line["question"])] == alone, line
    assert len(set(answers.values())) >= 2


def test_inputs_folders_globs_lists_urls_and_shards(photos, tmp_path):
    shards = tiny.write_shards(tmp_path / "shards", num_shards=2, per_shard=3, corrupt=1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two photos\n{photos / '0-red.png'}\n\n../{tmp_path.name}/shards/00000.tar\n")
    assert names_many_images(str(photos)) and names_many_images("a/*.jpg") and names_many_images(str(listing))
    assert names_many_images("s/{00000..00003}.tar") and not names_many_images(str(photos / "0-red.png"))
    assert not names_many_images("https://example.com/a.jpg")

    refs = collect_images([str(photos), str(photos / "*.png"), str(tmp_path / "shards" / "{00000..00001}.tar")])
    files = [r for r in refs if r.member is None]
    assert len(files) == 7  # six photos and the broken file, each once although the glob names three again
    members = [r for r in refs if r.member is not None]
    assert [r.key for r in members] == [f"{shards[s]}/{s:05d}{i:04d}" for s in range(2) for i in range(4)]
    assert members[0].load().size == (tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    listed = collect_images([str(listing)])
    assert listed[0].key == str(photos / "0-red.png") and listed[0].load().size == (tiny.IMAGE_SIZE,) * 2
    # a list entry is taken as an image file as it is (a shard inside a list is not expanded)
    with pytest.raises(Blip2Error, match="no such file"):
        collect_images([str(tmp_path / "missing")])
    with pytest.raises(Blip2Error, match="no images found"):
        collect_images([str(tmp_path / "*.webp")])


def test_shard_samples_are_captioned_and_corrupt_ones_counted(models, tmp_path):
    shards = tiny.write_shards(tmp_path / "shards", num_shards=2, per_shard=3, corrupt=1)
    assistant = Blip2Assistant(load_model(models["opt"]))
    options = assistant.resolve("caption", {"num_beams": 1, "max_new_tokens": 4})[1]
    settings = BatchSettings("tiny", "", options)
    result = run_batch(assistant, caption_jobs(collect_images(shards)), settings, tmp_path / "c.jsonl", batch_size=3,
                       show_progress=False)
    assert (result.generated, result.reused, len(result.failed)) == (6, 0, 2)
    assert all("not an image" in reason for _, reason in result.failed)
    records = _records(tmp_path / "c.jsonl")
    assert {(r["shard"], r["key"]) for r in records} == {(shards[s], f"{s:05d}{i:04d}") for s in range(2) for i in range(3)}


def test_resume_after_torn_write_and_changed_settings(models, photos, tmp_path):
    assistant = Blip2Assistant(load_model(models["opt"]))
    options = assistant.resolve("caption", {"num_beams": 2, "max_new_tokens": 4})[1]
    settings = BatchSettings("tiny", "", options)
    jobs = caption_jobs(collect_images([str(photos)]))
    out = tmp_path / "c.jsonl"
    first = run_batch(assistant, jobs, settings, out, batch_size=2, show_progress=False, stop_after=1)
    assert first.generated == 2
    kept = out.read_text()
    with open(out, "a") as f:
        f.write('{"image": "' + str(photos / "2-yellow.png"))  # killed in the middle of writing a record
    second = run_batch(assistant, jobs, settings, out, batch_size=4, show_progress=False)
    assert (second.generated, second.reused, len(second.failed)) == (4, 2, 1)
    text = out.read_text()
    assert text.startswith(kept)  # finished records untouched, the torn line cut off
    records = _records(out)  # every line is valid JSON
    assert len(records) == 6 and len({r["image"] for r in records}) == 6
    whole = run_batch(assistant, jobs, settings, tmp_path / "whole.jsonl", batch_size=6, show_progress=False)
    assert {r["image"]: r["caption"] for r in records} == {r["image"]: r["caption"] for r in _records(whole.out)}

    third = run_batch(assistant, jobs, settings, out, show_progress=False)
    assert (third.generated, third.reused) == (0, 6)
    other = BatchSettings("tiny", "a photo of", options)
    with pytest.raises(Blip2Error, match="different prompt"):
        run_batch(assistant, jobs, other, out, show_progress=False)
    fresh = run_batch(assistant, jobs, other, out, restart=True, show_progress=False)
    assert (fresh.generated, fresh.reused) == (6, 0) and len(_records(out)) == 6


def test_resume_after_sigkill(models, tmp_path):
    """A real kill: the first run is SIGKILLed after some records; the rerun keeps them and does the rest."""
    folder = tmp_path / "many"
    folder.mkdir()
    images = tiny.random_images(160, seed=3)
    for i, image in enumerate(images):
        image.save(folder / f"{i:03d}.png")
    out = tmp_path / "c.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "blip2cli", "caption", str(folder), "--model", str(models["opt"]), "--out",
               str(out), "--batch-size", "1", "--workers", "0", "--num-beams", "2", "--max-new-tokens", "8"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and process.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    before = out.read_text()
    done = before.count("\n")
    assert 3 <= done < 160, done
    complete = before[: before.rindex("\n") + 1]

    assistant = Blip2Assistant(load_model(models["opt"]))
    options = assistant.resolve("caption", {"num_beams": 2, "max_new_tokens": 8})[1]
    settings = BatchSettings(str(models["opt"].resolve()), "", options)
    result = run_batch(assistant, caption_jobs(collect_images([str(folder)])), settings, out, batch_size=40,
                       show_progress=False)
    assert (result.generated, result.reused) == (160 - done, done)
    assert out.read_text().startswith(complete)
    assert sorted(r["image"] for r in _records(out)) == sorted(str(p) for p in folder.glob("*.png"))


def test_one_line_errors(models, photos, tmp_path, monkeypatch, capsys):
    import importlib.util

    from blip2cli.cli import main

    bad_questions = tmp_path / "q.jsonl"
    bad_questions.write_text('{"image": "a.png"}\n')
    cases = [
        (["caption", tmp_path / "nowhere", "--model", models["opt"]], "no such file or folder"),
        (["ask", "--questions", bad_questions, "--model", models["opt"]], 'expected {"image": ..., "question": ...}'),
        (["ask", photos, "-i", "--model", models["opt"]], "--interactive takes one image"),
        (["caption", photos, "--model", models["opt"], "--quantize", "3bit"], "unknown --quantize"),
        (["caption", photos, "--model", models["opt"], "--out", tmp_path], "is a folder"),
    ]
    if importlib.util.find_spec("bitsandbytes") is None:
        cases.append((["caption", photos, "--model", models["opt"], "--quantize", "8bit"], "pip install 'blip2cli[lowmem]'"))
    for args, message in cases:
        monkeypatch.setattr(sys, "argv", ["blip2", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert exit_info.value.code == 1 and len(lines) == 1 and message in lines[0], (args, err)


def test_out_shards_carry_the_captions(models, tmp_path):
    from blip2cli.data.capfilt import read_samples

    shards = tiny.write_shards(tmp_path / "shards", num_shards=2, per_shard=3, corrupt=1)
    out_dir = tmp_path / "captioned"
    args = ["caption", tmp_path / "shards" / "*.tar", "--model", models["opt"], "--out-shards", out_dir,
            "--num-beams", 1, "--max-new-tokens", 4, "--workers", 0]
    result = _invoke(*args)
    assert "2 shards written" in result.stderr and "2 without an output left out" in result.stderr
    captions = {(r["shard"], r["key"]): r["caption"] for r in _records(out_dir / "outputs.jsonl")}
    for shard in shards:
        originals = dict(read_samples(shard))
        rewritten = list(read_samples(out_dir / Path(shard).name))
        assert [key for key, _ in rewritten] == [key for key in originals][:3]  # the corrupt sample is left out
        for key, members in rewritten:
            by_ext = {info.name.split(".", 1)[1]: data for info, data in members}
            meta = json.loads(by_ext["json"])
            original = {info.name.split(".", 1)[1]: data for info, data in originals[key]}
            assert meta["blip2_caption"] == captions[(shard, key)] and meta["blip2_caption"] != ""
            assert meta["caption"] == json.loads(original["json"])["caption"]  # the web caption stays
            assert by_ext["jpg"] == original["jpg"] and by_ext["txt"] == original["txt"]
    again = _invoke(*args)  # nothing left to do
    assert "0 generated" in again.stderr and "2 already there" in again.stderr


@pytest.mark.slow
def test_torchrun_data_parallel_equals_one_process(models, photos, tmp_path):
    """Two ranks under torchrun (gloo, CPU): each captions half; rank 0 folds rank 1's part into --out."""
    args = ["caption", str(photos), "--model", str(models["opt"]), "--num-beams", "2", "--max-new-tokens", "4",
            "--workers", "0", "--batch-size", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "blip2cli",
                          *args, "--out", str(tmp_path / "dp.jsonl")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "6 generated" in run.stderr and run.stderr.count("generated") == 1  # rank 0 alone reports
    assert not list(tmp_path.glob("dp.jsonl.rank*"))
    _invoke(*args, "--out", tmp_path / "one.jsonl")
    one = {r["image"]: r["caption"] for r in _records(tmp_path / "one.jsonl")}
    assert {r["image"]: r["caption"] for r in _records(tmp_path / "dp.jsonl")} == one
