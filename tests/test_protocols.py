"""Whose protocol: generation settings per source (`--protocol paper|lavis`), GQA scoring (`--gqa-scoring
current|release`) and OK-VQA lemmatisation, each checked against hand-computed cases and recorded in
metrics.json, and marked by `blip2 eval report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.errors import Blip2Error
from blip2cli.evaluation import default_settings
from blip2cli.evaluation import metrics as M
from blip2cli.evaluation.datasets import EvalData, EvalItem
from blip2cli.evaluation.report import UNLEMMATIZED_MARK, report_rows, report_table
from blip2cli.evaluation.runner import _prepare_out_dir, score_outputs
from blip2cli.evaluation.tasks import resolve_settings
from tests import tiny


# --------------------------------------------------------------------------------------------- generation protocol
@pytest.mark.parametrize("task", ["vqav2", "okvqa", "gqa"])
def test_vqa_settings_per_protocol(task):
    # paper: OPT's own prompt, length penalty -1 with beam 5 for every LLM
    opt, t5 = default_settings(task, False), default_settings(task, True)
    assert (opt.prompt, opt.length_penalty, opt.protocol) == ("Question: {} Answer:", -1.0, "paper")
    assert (t5.prompt, t5.length_penalty) == ("Question: {} Short answer:", -1.0)
    # lavis: its configs' prompt for every LLM, OPT's predict_answers default length penalty 0
    opt, t5 = default_settings(task, False, "lavis"), default_settings(task, True, "lavis")
    assert (opt.prompt, opt.length_penalty, opt.protocol) == ("Question: {} Short answer:", 0.0, "lavis")
    assert (t5.prompt, t5.length_penalty) == ("Question: {} Short answer:", -1.0)
    for settings in (opt, t5):
        assert (settings.num_beams, settings.max_new_tokens, settings.min_new_tokens) == (5, 10, 1)
        assert settings.lemmatize is (task == "okvqa")  # OK-VQA is lemmatised under both


def test_caption_settings_and_unknown_protocol():
    paper, lavis = default_settings("coco", False, "paper").to_dict(), default_settings("coco", False, "lavis").to_dict()
    assert (paper.pop("protocol"), lavis.pop("protocol")) == ("paper", "lavis")
    assert paper == lavis and (paper["prompt"], paper["length_penalty"], paper["min_new_tokens"]) == ("a photo of", 1.0, 8)
    with pytest.raises(Blip2Error, match="unknown protocol 'blip'; choose one of paper, lavis"):
        default_settings("vqav2", False, "blip")


def test_checkpoint_and_flags_override_the_protocol():
    class Config:  # what a fine-tuned checkpoint stores (Blip2ModelConfig.stored_generation)
        def stored_generation(self, kind):
            return {"prompt": "Q: {} A:"} if kind == "vqa" else {}

    settings, notes = resolve_settings("vqav2", Config(), False, {"length_penalty": None}, protocol="lavis")
    assert (settings.prompt, settings.length_penalty, settings.protocol) == ("Q: {} A:", 0.0, "lavis")
    settings, _ = resolve_settings("vqav2", Config(), False, {"length_penalty": 0.5}, protocol="paper")
    assert (settings.length_penalty, settings.protocol) == (0.5, "paper")


# --------------------------------------------------------------------------------------------- OK-VQA and GQA scoring
def _okvqa_data() -> EvalData:
    items = [EvalItem(key=str(i), id=i, image=Path(f"/nonexistent/{i}.jpg"), text="q?") for i in range(2)]
    truth = {"0": {"answers": ["dog"] * 10}, "1": {"answers": ["ski"] * 2 + ["skis"] * 8}}
    return EvalData(task="okvqa", split="val", kind="vqa", items=items, vqa_truth=truth)


def _lemmas(answer: str) -> str:
    """A fixed stand-in for spaCy's noun/verb lemmas, so the expected numbers are exact."""
    return " ".join({"dogs": "dog", "skis": "ski"}.get(word, word) for word in answer.split())


@pytest.mark.parametrize("protocol", ["paper", "lavis"])
def test_okvqa_accuracy_with_and_without_lemmatisation(protocol):
    data, outputs = _okvqa_data(), {"0": "dogs", "1": "skis"}
    settings = default_settings("okvqa", False, protocol)
    # lemmatised (the protocol): "dogs" -> "dog" matches all 10 answers (1.0); "skis" -> "ski" matches 2 of 10:
    # leaving out a "ski" leaves 1 match (1/3), leaving out a "skis" leaves 2 (2/3): (2/3 + 16/3) / 10 = 0.6
    metrics, submission = score_outputs(data, outputs, settings, lemmatizer=_lemmas)
    assert metrics["accuracy"] == 80.0 and metrics["lemmatized"] is True and "lemmatization" not in metrics["skipped"]
    assert [s["answer"] for s in submission] == ["dog", "ski"]  # the submission carries the scored answers
    # not lemmatised: "dogs" matches nothing (0), "skis" matches 8 of 10 (1.0)
    settings.lemmatize = False
    metrics, _ = score_outputs(data, outputs, settings)
    assert metrics["accuracy"] == 50.0 and metrics["lemmatized"] is False


def test_okvqa_without_spacy_is_marked_not_lemmatized(monkeypatch):
    monkeypatch.setattr(M, "load_lemmatizer", lambda model=None: (None, f"spaCy is not installed: {M.SPACY_INSTALL}"))
    metrics, _ = score_outputs(_okvqa_data(), {"0": "dogs", "1": "skis"}, default_settings("okvqa"))
    assert metrics["accuracy"] == 50.0 and metrics["lemmatized"] is False and "lemmatization" in metrics["skipped"]
    assert any(M.SPACY_INSTALL in note and "not comparable" in note for note in metrics["notes"])


def test_okvqa_real_spacy_lemmatizer():
    lemmatize, reason = M.load_lemmatizer()
    if lemmatize is None:
        pytest.skip(reason)
    metrics, _ = score_outputs(_okvqa_data(), {"0": "dogs", "1": "dogs"}, default_settings("okvqa"))
    assert metrics["lemmatized"] is True and metrics["accuracy"] == 50.0  # "dogs" -> "dog": 1.0 and 0.0


def _gqa_data() -> EvalData:
    answers = ["t-shirt", "The Left", "dog"]
    items = [EvalItem(key=str(i), id=str(i), image=Path(f"/nonexistent/{i}.jpg"), text="q?") for i in range(3)]
    return EvalData(task="gqa", split="testdev", kind="gqa", items=items,
                    gqa_truth={str(i): a for i, a in enumerate(answers)})


def test_gqa_scoring_recorded_and_applied():
    outputs = {"0": "t-shirt", "1": "left", "2": "dogs"}
    settings = default_settings("gqa", True)
    assert settings.gqa_scoring == "current"  # the default: LAVIS today
    metrics, _ = score_outputs(_gqa_data(), outputs, settings)
    # prediction and truth normalised: "t shirt" == "t shirt", "left" == "left", "dogs" != "dog" -> 2 of 3
    assert (metrics["accuracy"], metrics["gqa_scoring"]) == (66.67, "current")
    settings.gqa_scoring = "release"
    metrics, _ = score_outputs(_gqa_data(), outputs, settings)
    # truth as given: "t shirt" != "t-shirt", "left" != "The Left" -> 0 of 3
    assert (metrics["accuracy"], metrics["gqa_scoring"]) == (0.0, "release")


def test_cli_rescore_records_protocol_and_gqa_scoring(tmp_path):
    root = tmp_path / "gqa"
    (root / "images").mkdir(parents=True)
    questions = {}
    for i, answer in enumerate(["t-shirt", "red"]):
        tiny.shape_image("red", "blue").save(root / "images" / f"n{i}.jpg")
        questions[f"20{i}"] = {"imageId": f"n{i}", "question": "what?", "answer": answer, "types": {}}
    qfile = root / "questions.json"
    qfile.write_text(json.dumps(questions))
    pfile = tmp_path / "preds.json"
    pfile.write_text(json.dumps([{"questionId": "200", "prediction": "T-shirt."},
                                 {"questionId": "201", "prediction": "red"}]))
    base = ["eval", "gqa", "--questions", str(qfile), "--images", str(root / "images"), "--predictions", str(pfile)]
    for flags, accuracy in (([], 100.0), (["--gqa-scoring", "release", "--protocol", "lavis"], 50.0)):
        out = tmp_path / f"out{len(flags)}"
        result = CliRunner().invoke(app, [*base, "--out", str(out), *flags])
        assert result.exit_code == 0, result.output + repr(result.exception)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["accuracy"] == accuracy
        assert (metrics["gqa_scoring"], metrics["protocol"]) == (("release", "lavis") if flags else ("current", "paper"))
        assert metrics["settings"]["gqa_scoring"] == metrics["gqa_scoring"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "x"), "--gqa-scoring", "paper"])
    assert isinstance(result.exception, Blip2Error) and "current, release" in str(result.exception)


# --------------------------------------------------------------------------------------------- report and resume
def _run_dir(path: Path, **metrics) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"split": "val", "model": "Salesforce/blip2-flan-t5-xxl",
                                                   "num_items": 5, **metrics}))
    return path


def test_report_marks_unlemmatized_okvqa_and_shows_protocols(tmp_path):
    runs = [
        _run_dir(tmp_path / "ok-lemma", task="okvqa", accuracy=40.0, lemmatized=True, protocol="paper"),
        _run_dir(tmp_path / "ok-plain", task="okvqa", accuracy=38.0, lemmatized=False, protocol="lavis"),
        _run_dir(tmp_path / "gqa", task="gqa", split="testdev", accuracy=44.0, protocol="paper", gqa_scoring="release"),
        _run_dir(tmp_path / "old-okvqa", task="okvqa", accuracy=41.0),  # before either was recorded
    ]
    rows = {Path(r["run"]).name: r for r in report_rows(runs)}
    assert [rows[n]["unlemmatized"] for n in ("ok-lemma", "ok-plain", "gqa", "old-okvqa")] == [False, True, False, True]
    assert [rows[n]["protocol"] for n in ("ok-lemma", "ok-plain", "gqa", "old-okvqa")] == \
        ["paper", "lavis", "paper, gqa release", "—"]
    console = Console(record=True, width=220)
    console.print(report_table(runs))
    text = console.export_text()
    lines = {name: next(line for line in text.splitlines() if name in line) for name in ("ok-lemma", "ok-plain")}
    assert UNLEMMATIZED_MARK not in lines["ok-lemma"] and f"{UNLEMMATIZED_MARK} 38.00" in lines["ok-plain"]
    assert "not lemmatised" in text and "not comparable with the paper" in text


def test_resume_ignores_scoring_only_settings(tmp_path):
    from blip2cli.evaluation.runner import PredictionStore

    store = PredictionStore(tmp_path, 0)
    store.append([{"key": "1", "output": "a"}])
    old = default_settings("gqa", True).to_dict()
    for key in ("protocol", "gqa_scoring"):
        old.pop(key)  # a run by a version that did not record them
    (tmp_path / "run.json").write_text(json.dumps({"fingerprint": {"task": "gqa", "split": "testdev", "model": "m",
                                                                   "settings": old}}))
    new = default_settings("gqa", True, "lavis")
    new.gqa_scoring, new.prompt, new.length_penalty = "release", old["prompt"], old["length_penalty"]
    fingerprint = {"task": "gqa", "split": "testdev", "model": "m", "settings": new.to_dict()}
    _prepare_out_dir(tmp_path, fingerprint, restart=False, store=store)  # scoring and labels may change
    new.length_penalty = 0.0  # generation may not
    fingerprint = {"task": "gqa", "split": "testdev", "model": "m", "settings": new.to_dict()}
    with pytest.raises(Blip2Error, match="different settings.length_penalty"):
        _prepare_out_dir(tmp_path, fingerprint, restart=False, store=store)
