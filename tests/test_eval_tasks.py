"""`blip2 eval` end to end on tiny random models and official-format annotation files written here.

Each task runs on a few generated images; values are checked against the metric functions, against the
model called directly, and (retrieval) against a brute-force ITM + ITC ranking of every pair.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blip2cli.checkpoint import load_model, save_model
from blip2cli.cli import app
from blip2cli.errors import Blip2Error
from blip2cli.evaluation import EvalSettings, default_settings, evaluate, load_eval_data, rescore, run_eval
from blip2cli.evaluation import metrics as M
from blip2cli.evaluation.tasks import paper_numbers
from blip2cli.models import Blip2ModelConfig, Blip2Stage1Model
from blip2cli.models.text import decode_generated, generation_batch
from tests import tiny

SHAPES = [("red", "blue"), ("green", "yellow"), ("white", "black"), ("yellow", "red"), ("blue", "white"),
          ("black", "green")]
QUESTIONS = ["what colour is the square?", "is there a square?", "how many squares are there?",
             "what is the background?", "what colour is it?", "is it red?"]
ANSWER_TYPES = ["other", "yes/no", "number", "other", "other", "yes/no"]


# --------------------------------------------------------------------------------------------- data files
def _write_json(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def _coco_images(directory: Path, n: int, prefix: str = "COCO_val2014_") -> list[int]:
    directory.mkdir(parents=True, exist_ok=True)
    ids = [100 + i for i in range(n)]
    for image_id, (fg, bg) in zip(ids, SHAPES):
        tiny.shape_image(fg, bg).save(directory / f"{prefix}{image_id:012d}.jpg", quality=95)
    return ids


def vqa_dir(root: Path, n: int = 4, with_manifest: bool = True) -> Path:
    """VQAv2-format questions/annotations for ``n`` questions (question_id = 1000 + i)."""
    image_ids = _coco_images(root / "val2014", n)
    questions = {"info": {}, "task_type": "Open-Ended", "data_subtype": "val2014", "questions": [
        {"question_id": 1000 + i, "image_id": image_ids[i], "question": QUESTIONS[i]} for i in range(n)]}
    annotations = {"annotations": [
        {"question_id": 1000 + i, "image_id": image_ids[i], "answer_type": ANSWER_TYPES[i],
         "question_type": "what", "multiple_choice_answer": SHAPES[i][0],
         "answers": [{"answer": SHAPES[i][0] if j < 7 else SHAPES[i][1], "answer_confidence": "yes", "answer_id": j + 1}
                     for j in range(10)]}
        for i in range(n)]}
    _write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", questions)
    _write_json(root / "v2_mscoco_val2014_annotations.json", annotations)
    if with_manifest:
        _write_json(root / "manifest.json", {"task": "vqav2", "splits": {"val": {
            "questions": "v2_OpenEnded_mscoco_val2014_questions.json",
            "annotations": "v2_mscoco_val2014_annotations.json", "images": "val2014"}}})
    return root


def karpathy_dir(root: Path, task: str, n: int = 4, captions_per_image: int = 2) -> Path:
    """A Karpathy-style dataset JSON with ``n`` test images (and one train image that must be ignored)."""
    image_ids = _coco_images(root / "val2014", n + 1)
    images = []
    for i, image_id in enumerate(image_ids):
        fg, bg = SHAPES[i]
        sentences = [{"raw": f"A {fg} square on a {bg} background.", "tokens": []},
                     {"raw": f"a {bg} picture with a {fg} box in the middle"}][:captions_per_image]
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{image_id:012d}.jpg", "cocoid": image_id,
                       "imgid": i, "split": "test" if i < n else "train", "sentences": sentences})
    _write_json(root / "dataset.json", {"images": images, "dataset": "coco"})
    _write_json(root / "manifest.json", {"task": task, "splits": {"test": {"annotations": "dataset.json", "images": "."}}})
    return root


# --------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory) -> Path:
    tok = tiny.bert_tokenizer()
    config = Blip2ModelConfig(
        vision={"kind": "eva", "config": tiny.vision_config(initializer_range=0.02).to_dict()},
        qformer=tiny.qformer_config(vocab_size=len(tok)).to_dict(),
        num_query_tokens=tiny.NUM_QUERY_TOKENS, image_text_hidden_size=16, image_size=tiny.IMAGE_SIZE, stage=1,
    )
    torch.manual_seed(0)
    model = Blip2Stage1Model.from_config(config, dec_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # make the ITM logits matter as much as the ITC similarities
        model.itm_head.weight.mul_(20)
    return save_model(model, tmp_path_factory.mktemp("stage1") / "ckpt", tokenizer=tok,
                      image_processor=tiny.image_processor())


def _cli(*args: str):
    result = CliRunner().invoke(app, ["eval", *args], catch_exceptions=True)
    return result


def _read(path: Path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------- VQA
def test_vqav2_cli_end_to_end_opt(hf_opt_dir, tmp_path):
    data = vqa_dir(tmp_path / "vqav2")
    out = tmp_path / "run"
    result = _cli("vqav2", "--model", str(hf_opt_dir), "--data", str(data), "--out", str(out),
                  "--batch-size", "1", "--workers", "0", "--num-beams", "2", "--no-java")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "accuracy" in result.output

    predictions = _read(out / "predictions.json")
    assert [p["question_id"] for p in predictions] == [1000, 1001, 1002, 1003]
    metrics = _read(out / "metrics.json")
    # OPT defaults of the paper (its prompt, length penalty -1 with beam search), recorded with the results
    assert metrics["protocol"] == "paper" and metrics["settings"]["protocol"] == "paper"
    assert metrics["settings"]["prompt"] == "Question: {} Answer:"
    assert metrics["settings"]["length_penalty"] == -1.0 and metrics["settings"]["max_new_tokens"] == 10
    assert metrics["lemmatized"] is False  # VQAv2 is not lemmatised
    assert metrics["num_items"] == 4 and metrics["skipped"] == []
    # the metrics are those of the written predictions
    truth = load_eval_data("vqav2", data).vqa_truth
    expected = M.vqa_accuracy({str(p["question_id"]): p["answer"] for p in predictions}, truth)
    assert metrics["accuracy"] == expected["accuracy"] and metrics["per_type"] == expected["per_type"]
    assert set(metrics["per_type"]) == {"other", "yes/no", "number"}

    # each answer is what the model generates for that prompt when called directly
    loaded = load_model(hf_opt_dir)
    from PIL import Image

    for i, prediction in enumerate(predictions):
        image = Image.open(data / "val2014" / f"COCO_val2014_{100 + i:012d}.jpg").convert("RGB")
        pixels = loaded.image_processor(images=image, return_tensors="pt").pixel_values
        batch = generation_batch(loaded.tokenizer, [f"Question: {QUESTIONS[i]} Answer:"], False)
        ids = loaded.model.generate(pixels, batch["input_ids"], batch["attention_mask"], num_beams=2,
                                    max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
        assert prediction["answer"] == decode_generated(loaded.tokenizer, ids)[0]


def test_vqa_resume_generates_only_missing_items(hf_opt_dir, tmp_path):
    data = load_eval_data("vqav2", vqa_dir(tmp_path / "vqav2", n=6))
    out = tmp_path / "run"
    out.mkdir()
    # an interrupted run: three items done, then a torn line
    lines = [json.dumps({"key": str(1000 + i), "output": "sentinel"}) for i in (0, 2, 4)]
    (out / "predictions.jsonl").write_text("\n".join(lines) + '\n{"key": "1001", "outp')
    loaded = load_model(hf_opt_dir)
    settings = default_settings("vqav2", False)
    settings.num_beams = 1
    result = run_eval("vqav2", loaded, data, settings=settings, out_dir=out, batch_size=2, model_name="tiny",
                      show_progress=False)
    assert (result.generated, result.reused) == (3, 3)
    answers = {p["question_id"]: p["answer"] for p in _read(out / "predictions.json")}
    assert [answers[1000 + i] == "sentinel" for i in range(6)] == [True, False, True, False, True, False]
    assert _read(out / "run.json")["generated"] == 3
    # run again: nothing left to generate
    again = run_eval("vqav2", loaded, data, settings=settings, out_dir=out, batch_size=2, model_name="tiny",
                     show_progress=False)
    assert (again.generated, again.reused) == (0, 6)
    assert again.metrics["accuracy"] == result.metrics["accuracy"]
    # the raw JSONL re-scores to the same numbers
    assert rescore("vqav2", data, out / "predictions.jsonl").metrics["accuracy"] == result.metrics["accuracy"]
    # other settings in the same directory: refused in one line, unless --restart
    settings.prompt = "Q: {} A:"
    with pytest.raises(Blip2Error, match="different settings.prompt"):
        run_eval("vqav2", loaded, data, settings=settings, out_dir=out, model_name="tiny", show_progress=False)
    fresh = run_eval("vqav2", loaded, data, settings=settings, out_dir=out, model_name="tiny", restart=True,
                     show_progress=False, limit=2)
    assert (fresh.generated, fresh.reused) == (2, 0) and fresh.metrics["num_questions"] == 2


def test_okvqa_flant5_defaults_and_lemmatisation_report(hf_t5_dir, tmp_path):
    data = vqa_dir(tmp_path / "okvqa", n=3)
    out = tmp_path / "run"
    result = _cli("okvqa", "--model", str(hf_t5_dir), "--data", str(data), "--out", str(out), "--workers", "0",
                  "--num-beams", "2", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = _read(out / "metrics.json")
    assert metrics["settings"]["prompt"] == "Question: {} Short answer:"
    assert metrics["settings"]["length_penalty"] == -1.0 and metrics["settings"]["lemmatize"] is True
    assert metrics["settings"]["max_new_tokens"] == 4
    lemmatizer, _ = M.load_lemmatizer()
    assert metrics["lemmatized"] is (lemmatizer is not None)
    if lemmatizer is None:  # reported, not a crash
        assert "lemmatization" in metrics["skipped"]
        assert any("lemmatisation skipped" in note and "python -m spacy download en_core_web_sm" in note
                   for note in metrics["notes"])


def test_gqa_official_format(hf_t5_dir, tmp_path):
    root = tmp_path / "gqa"
    (root / "images").mkdir(parents=True)
    questions = {}
    for i, (fg, bg) in enumerate(SHAPES[:3]):
        tiny.shape_image(fg, bg).save(root / "images" / f"n{i}.jpg")
        questions[f"20{i}"] = {"imageId": f"n{i}", "question": QUESTIONS[i], "answer": fg, "types": {}}
    qfile = _write_json(root / "testdev_balanced_questions.json", questions)
    out = tmp_path / "run"
    result = _cli("gqa", "--model", str(hf_t5_dir), "--questions", str(qfile), "--images", str(root / "images"),
                  "--out", str(out), "--workers", "0", "--num-beams", "1")
    assert result.exit_code == 0, result.output + repr(result.exception)
    predictions = _read(out / "predictions.json")
    assert [p["questionId"] for p in predictions] == ["200", "201", "202"]
    metrics = _read(out / "metrics.json")
    expected = M.gqa_accuracy({p["questionId"]: p["prediction"] for p in predictions},
                              {k: v["answer"] for k, v in questions.items()})
    assert metrics["accuracy"] == expected["accuracy"] and metrics["split"] == "testdev"
    # the manifest written by `blip2 download eval gqa` names the files with an image_pattern
    _write_json(root / "manifest.json", {"task": "gqa", "splits": {"testdev": {
        "questions": qfile.name, "images": "images", "image_pattern": "{image_id}.jpg"}}})
    assert [it.image.name for it in load_eval_data("gqa", root).items] == ["n0.jpg", "n1.jpg", "n2.jpg"]


def test_rescore_vqa_predictions_without_model(tmp_path):
    data_dir = vqa_dir(tmp_path / "vqav2")
    # answers by hand: 7 annotators say fg, 3 say bg
    predictions = [{"question_id": 1000, "answer": "Red."},  # 1.0
                   {"question_id": 1001, "answer": "yellow"},  # the minority answer (3 of 10): 0.9
                   {"question_id": 1002, "answer": "purple"},  # 0
                   {"question_id": 1003, "answer": "the yellow"}]  # 1.0
    pfile = _write_json(tmp_path / "preds.json", predictions)
    out = tmp_path / "rescored"
    result = _cli("vqav2", "--data", str(data_dir), "--predictions", str(pfile), "--out", str(out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = _read(out / "metrics.json")
    assert metrics["accuracy"] == 72.5
    assert metrics["per_type"] == {"number": 0.0, "other": 100.0, "yes/no": 90.0}
    # a partial file scores what it has and says so
    partial = rescore("vqav2", load_eval_data("vqav2", data_dir), _write_json(tmp_path / "p2.json", predictions[:2]))
    assert partial.metrics["accuracy"] == 95.0 and "2 items have no prediction" in partial.metrics["notes"][0]


# --------------------------------------------------------------------------------------------- captioning
def test_coco_captioning_and_skipped_java_metrics(hf_opt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(M.NO_JAVA_ENV, "1")
    data = karpathy_dir(tmp_path / "coco", "coco", n=3)
    out = tmp_path / "run"
    result = _cli("coco", "--model", str(hf_opt_dir), "--data", str(data), "--out", str(out), "--workers", "0",
                  "--num-beams", "2", "--max-new-tokens", "6", "--min-new-tokens", "2")
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = _read(out / "metrics.json")
    assert metrics["settings"]["prompt"] == "a photo of"
    assert metrics["METEOR"] is None and metrics["SPICE"] is None
    assert metrics["skipped"] == ["METEOR", "SPICE"] and metrics["tokenizer"] == "python-ptb"
    predictions = _read(out / "predictions.json")
    assert [p["image_id"] for p in predictions] == [100, 101, 102]  # the train image is not evaluated
    refs = load_eval_data("coco", data).captions
    expected = M.caption_metrics({str(p["image_id"]): p["caption"] for p in predictions}, refs, use_java=False)
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert metrics[key] == expected[key]
    assert "skipped: METEOR, SPICE" in result.output or "skipped" in result.output

    # re-scoring perfect captions gives perfect n-gram scores
    perfect = [{"image_id": int(k), "caption": v[0]} for k, v in refs.items()]
    rescored = rescore("coco", load_eval_data("coco", data), _write_json(tmp_path / "perfect.json", perfect),
                       use_java=False)
    assert rescored.metrics["BLEU-4"] == 100.0 and rescored.metrics["CIDEr"] > metrics["CIDEr"]


def test_nocaps_domains(hf_t5_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(M.NO_JAVA_ENV, "1")
    root = tmp_path / "nocaps"
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, (fg, bg) in enumerate(SHAPES[:4]):
        tiny.shape_image(fg, bg).save(root / "images" / f"{i:04d}.jpg")
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "domain": ["in-domain", "near-domain", "out-domain"][i % 3]})
        annotations += [{"image_id": i, "id": 10 * i + j, "caption": f"a {fg} square on {bg}"} for j in range(2)]
    ann = _write_json(root / "nocaps_val_4500_captions.json", {"images": images, "annotations": annotations})
    out = tmp_path / "run"
    result = _cli("nocaps", "--model", str(hf_t5_dir), "--captions", str(ann), "--images", str(root / "images"),
                  "--out", str(out), "--workers", "0", "--num-beams", "1", "--max-new-tokens", "4", "--min-new-tokens", "1")
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = _read(out / "metrics.json")
    assert set(metrics["per_domain"]) == {"in-domain", "near-domain", "out-domain"}
    assert metrics["per_domain"]["in-domain"]["num_images"] == 2
    assert metrics["num_images"] == 4 and metrics["split"] == "val"


# --------------------------------------------------------------------------------------------- retrieval
def _brute_force_rankings(stage1_dir: Path, data, k: int | None = None):
    """Every pair scored: ITM match logit + ITC similarity; with ``k``, only ITC's top-k per row are candidates."""
    from PIL import Image

    from blip2cli.models.text import normalize_caption

    loaded = load_model(stage1_dir)
    model, tok = loaded.model, loaded.tokenizer
    pixels = torch.cat([loaded.image_processor(images=Image.open(it.image).convert("RGB"), return_tensors="pt").pixel_values
                        for it in data.items])
    text = tok([normalize_caption(t) for t in data.texts], padding="max_length", truncation=True, max_length=35,
               return_tensors="pt")
    with torch.no_grad():
        feats, vit = model.image_embeddings(pixels)
        sim = model.itc_similarity(feats, model.text_embeddings(text.input_ids, text.attention_mask))
        n, t = sim.shape
        itm = torch.empty(n, t)
        for i in range(n):
            itm[i] = model.itm_scores(vit[i:i + 1].expand(t, -1, -1), text.input_ids, text.attention_mask)[:, 1]
    score = itm + sim
    i2t_score = torch.full_like(score, -100.0)
    t2i_score = torch.full_like(score.T, -100.0)
    ki, kt = min(k or t, t), min(k or n, n)
    for i in range(n):
        top = sim[i].topk(ki).indices
        i2t_score[i, top] = score[i, top]
    for j in range(t):
        top = sim[:, j].topk(kt).indices
        t2i_score[j, top] = score[top, j]
    i2t = [M.rank_scores(row.tolist()) for row in i2t_score]
    t2i = [M.rank_scores(row.tolist()) for row in t2i_score]
    return i2t, t2i, sim


def test_flickr30k_retrieval_matches_brute_force(stage1_dir, tmp_path):
    data_dir = karpathy_dir(tmp_path / "flickr", "flickr30k", n=5)
    out = tmp_path / "run"
    result = _cli("flickr30k", "--model", str(stage1_dir), "--data", str(data_dir), "--out", str(out),
                  "--workers", "0", "--batch-size", "2")
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = _read(out / "metrics.json")
    data = load_eval_data("flickr30k", data_dir)
    i2t, t2i, _ = _brute_force_rankings(stage1_dir, data)  # k_test 128 > gallery: every pair re-ranked
    expected = M.retrieval_metrics(i2t, t2i, data.img2txt, data.txt2img)
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert metrics[key] == pytest.approx(expected[key]), key
    predictions = _read(out / "predictions.json")
    assert predictions["i2t"] == [r[:10] for r in i2t] and predictions["t2i"] == [r[:10] for r in t2i]
    assert metrics["num_images"] == 5 and metrics["num_texts"] == 10

    # k_test=1: only ITC's best candidate is re-ranked, so it is always ranked first
    out1 = tmp_path / "run-k1"
    result = _cli("flickr30k", "--model", str(stage1_dir), "--data", str(data_dir), "--out", str(out1),
                  "--workers", "0", "--k-test", "1")
    assert result.exit_code == 0, result.output + repr(result.exception)
    i2t1, t2i1, sim = _brute_force_rankings(stage1_dir, data, k=1)
    ranked = _read(out1 / "predictions.json")
    assert [r[0] for r in ranked["i2t"]] == sim.argmax(dim=1).tolist()
    assert ranked["i2t"] == [r[:10] for r in i2t1] and ranked["t2i"] == [r[:10] for r in t2i1]

    # re-scoring the rankings file reproduces the metrics
    again = rescore("flickr30k", data, out / "predictions.json")
    assert again.metrics["r_mean"] == metrics["r_mean"]


def test_retrieval_resume_and_stage_check(stage1_dir, hf_opt_dir, tmp_path):
    data = load_eval_data("coco_retrieval", karpathy_dir(tmp_path / "coco", "coco_retrieval", n=4))
    out = tmp_path / "run"
    loaded = load_model(stage1_dir)
    first = run_eval("coco_retrieval", loaded, data, out_dir=out, show_progress=False, model_name="tiny")
    assert (first.generated, first.reused) == (4, 0)
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:3]) + "\n")  # the last image "was interrupted"
    second = run_eval("coco_retrieval", loaded, data, out_dir=out, show_progress=False, model_name="tiny")
    assert (second.generated, second.reused) == (1, 3)
    assert second.metrics["r_mean"] == first.metrics["r_mean"]
    with pytest.raises(Blip2Error, match="needs a stage-2 checkpoint"):
        run_eval("coco", loaded, data, show_progress=False)
    with pytest.raises(Blip2Error, match="needs a stage-1"):
        run_eval("coco_retrieval", load_model(hf_opt_dir), data, show_progress=False)


# --------------------------------------------------------------------------------------------- in-loop, report, errors
def test_evaluate_for_training_restores_mode(hf_opt_dir, tmp_path):
    data = load_eval_data("vqav2", vqa_dir(tmp_path / "vqav2"))
    loaded = load_model(hf_opt_dir)
    loaded.model.train()
    settings = EvalSettings(prompt="Question: {} Answer:", num_beams=1, max_new_tokens=3)
    metrics = evaluate("vqav2", loaded.model, data, limit=2, tokenizer=loaded.tokenizer,
                       image_processor=loaded.image_processor, settings=settings)
    assert metrics["num_questions"] == 2 and 0.0 <= metrics["accuracy"] <= 100.0
    assert loaded.model.training and not loaded.model.language_model.training  # frozen LLM stays in eval
    assert not any(tmp_path.glob("**/predictions*.jsonl"))  # in memory only


def test_report_compares_with_the_paper(tmp_path):
    run = tmp_path / "vqav2-blip2-flan-t5-xxl"
    _write_json(run / "metrics.json", {"task": "vqav2", "split": "val", "model": "Salesforce/blip2-flan-t5-xxl",
                                       "accuracy": 64.7, "num_items": 214354})
    other = tmp_path / "flickr"
    _write_json(other / "metrics.json", {"task": "flickr30k", "split": "test", "model": "/ckpt/mine", "txt_r1": 90.0,
                                         "txt_r5": 99.0, "txt_r10": 100.0, "img_r1": 80.0, "img_r5": 95.0,
                                         "img_r10": 97.0, "r_mean": 93.5})
    assert paper_numbers("vqav2", "Salesforce/blip2-flan-t5-xxl") == {"accuracy": 65.2}
    result = CliRunner().invoke(app, ["eval", "report", str(run), str(other)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "65.20" in result.output and "-0.50" in result.output and "ViT-g + FlanT5-XXL" in result.output
    assert "txt_r1" in result.output and "90.00" in result.output
    bad = CliRunner().invoke(app, ["eval", "report", str(tmp_path / "nothing")])
    assert isinstance(bad.exception, Blip2Error) and "no `blip2 eval` output" in str(bad.exception)


def test_report_skips_non_eval_directories_and_names_runs(tmp_path):
    """`blip2 eval report runs/` on a folder mixing evaluation and training runs: one row per evaluation run,
    named by its run (not `final`), a warning per skipped directory, and recall beyond --k-test marked n/a."""
    runs = tmp_path / "runs"
    _write_json(runs / "vqa-stage2-final" / "metrics.json", {
        "task": "vqav2", "split": "val", "model": "/work/runs/stage2/final", "accuracy": 61.25, "num_items": 10})
    _write_json(runs / "flickr-itc" / "metrics.json", {
        "task": "flickr30k", "split": "test", "model": "/work/runs/stage1/step-00000040", "txt_r1": 71.0,
        "txt_r5": 72.0, "txt_r10": 73.0, "img_r1": 65.6, "img_r5": 66.0, "img_r10": 67.0, "r_mean": 69.1,
        "settings": {"k_test": 1}})
    (runs / "stage1" / "final").mkdir(parents=True)  # a training run: no metrics.json
    (runs / "stage1" / "metrics.jsonl").write_text("{}\n")
    _write_json(runs / "broken" / "metrics.json", {"no": "task"})
    result = CliRunner().invoke(app, ["eval", "report", str(runs)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    table = result.stdout
    rows = [line for line in table.splitlines() if "vqa-stage2-final" in line or "flickr-itc" in line]
    assert len(rows) == 2, table  # one row per run (its metrics are lines within the row)
    vqa_row = next(line for line in rows if "vqa-stage2-final" in line)
    assert " stage2 " in vqa_row and "final" not in vqa_row.replace("vqa-stage2-final", "")
    assert "stage1/step-00000040" in table
    assert "n/a (72.00)" in table and "n/a (73.00)" in table and "71.00" in table
    assert "n/a (71.00)" not in table and "--k-test" in table  # R@1 applies; the caption explains n/a
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, result.stderr
    assert any("stage1" in w and "no metrics.json" in w for w in warnings)
    assert any("broken" in w and "no 'task'" in w for w in warnings)


def test_one_line_errors_for_bad_input(tmp_path):
    with pytest.raises(Blip2Error, match="no manifest.json in .*blip2 download eval vqav2"):
        load_eval_data("vqav2", tmp_path)
    with pytest.raises(Blip2Error, match="unknown task 'vqa3'"):
        load_eval_data("vqa3", tmp_path)
    root = vqa_dir(tmp_path / "vqa")
    with pytest.raises(Blip2Error, match="no split 'test'"):
        load_eval_data("vqav2", root, split="test")
    with pytest.raises(Blip2Error, match="questions file not found: .*nope.json"):
        load_eval_data("vqav2", root, questions=root / "nope.json")
    _write_json(root / "bad.json", {"questions": [{"question_id": 1, "question": "what?"}]})
    with pytest.raises(Blip2Error, match="a question has no 'image_id' key"):
        load_eval_data("vqav2", root, questions=root / "bad.json")
    _write_json(root / "list.json", [1, 2])
    with pytest.raises(Blip2Error, match="with a 'questions' list"):
        load_eval_data("vqav2", root, questions=root / "list.json")
    (root / "torn.json").write_text("{not json")
    with pytest.raises(Blip2Error, match="not valid JSON"):
        load_eval_data("vqav2", root, questions=root / "torn.json")
    with pytest.raises(Blip2Error, match="image directory not found"):
        load_eval_data("vqav2", root, images=root / "missing")
    karpathy = karpathy_dir(tmp_path / "k", "coco", n=2)
    with pytest.raises(Blip2Error, match="manifest.json has no split 'val' .splits: test.; pass --split"):
        load_eval_data("coco", karpathy, split="val")
    with pytest.raises(Blip2Error, match="no image in split 'val' .splits present: test, train"):
        load_eval_data("coco", annotations=karpathy / "dataset.json", images=karpathy, split="val")
    # a missing image is named before any model work
    (root / "val2014" / "COCO_val2014_000000000101.jpg").unlink()
    data = load_eval_data("vqav2", root)
    from blip2cli.evaluation.runner import check_images

    with pytest.raises(Blip2Error, match="image not found: .*COCO_val2014_000000000101.jpg"):
        check_images(data.items)
    # the CLI prints such errors as one line (main() turns Blip2Error into "blip2: error: ...")
    result = _cli("vqav2", "--data", str(tmp_path / "empty"), "--predictions", str(tmp_path / "p.json"))
    assert isinstance(result.exception, Blip2Error) and "\n" not in str(result.exception)


def test_image_file_names_and_limit(tmp_path):
    root = vqa_dir(tmp_path / "vqa", with_manifest=False)
    # bare %012d names are found as well as COCO_val2014_ ones
    for path in (root / "val2014").iterdir():
        path.rename(path.with_name(path.name.replace("COCO_val2014_", "")))
    data = load_eval_data("vqav2", questions=root / "v2_OpenEnded_mscoco_val2014_questions.json",
                          annotations=root / "v2_mscoco_val2014_annotations.json", images=root / "val2014")
    assert [it.image.name for it in data.items][:2] == ["000000000100.jpg", "000000000101.jpg"]
    assert all(it.image.is_file() for it in data.items)
    pattern = load_eval_data("vqav2", questions=root / "v2_OpenEnded_mscoco_val2014_questions.json",
                             images=root / "val2014", image_pattern="{image_id:012d}.jpg")
    assert pattern.items[0].image == data.items[0].image and not pattern.vqa_truth  # test-dev style: no answers
    limited = data.limited(2)
    assert len(limited.items) == 2 and set(limited.vqa_truth) == {"1000", "1001"}
    # OK-VQA's evaluation set is often called "test": the manifest's name for the default split is used
    _write_json(root / "manifest.json", {"task": "okvqa", "splits": {"test": {
        "questions": "v2_OpenEnded_mscoco_val2014_questions.json", "images": "val2014",
        "image_pattern": "{image_id:012d}.jpg"}}})
    assert load_eval_data("okvqa", root).split == "test"
    with pytest.raises(Blip2Error, match="no split 'val'"):
        load_eval_data("vqav2", root, split="val")  # an explicit split is never replaced
    retrieval = load_eval_data("flickr30k", karpathy_dir(tmp_path / "f", "flickr30k", n=3)).limited(2)
    assert retrieval.txt2img == [0, 0, 1, 1] and retrieval.img2txt == [[0, 1], [2, 3]]


# --------------------------------------------------------------------------------------------- data parallel
def _dist_worker(rank: int, world: int, init_file: str, task: str, model_dir: str, data_dir: str, out_dir: str,
                 queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        settings = default_settings(task, False)
        settings.num_beams = 1 if task == "vqav2" else 0
        result = run_eval(task, load_model(model_dir), load_eval_data(task, data_dir), settings=settings,
                          out_dir=out_dir, batch_size=1, model_name="tiny", show_progress=False)
        queue.put((rank, result.generated, result.metrics))
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, task: str, model_dir: Path, data_dir: Path) -> list:
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, str(tmp_path / f"init-{task}"), task, str(model_dir),
                                                     str(data_dir), str(tmp_path / f"dist-{task}"), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs)
    return sorted((queue.get(timeout=5) for _ in procs), key=lambda r: r[0])


@pytest.mark.slow
def test_data_parallel_runs_match_single_process(hf_opt_dir, stage1_dir, tmp_path):
    for task, model_dir, data_dir in (("vqav2", hf_opt_dir, vqa_dir(tmp_path / "vqav2", n=5)),
                                      ("flickr30k", stage1_dir, karpathy_dir(tmp_path / "flickr", "flickr30k", n=5))):
        settings = default_settings(task, False)
        settings.num_beams = 1 if task == "vqav2" else 0
        single = run_eval(task, load_model(model_dir), load_eval_data(task, data_dir), settings=settings,
                          out_dir=tmp_path / f"single-{task}", batch_size=1, model_name="tiny", show_progress=False)
        reports = _run_two_ranks(tmp_path, task, model_dir, data_dir)
        # results gathered once: every rank knows the total and gets the same metrics as one process
        assert [r[1] for r in reports] == [5, 5]
        for key in ("accuracy", "r_mean", "txt_r1", "img_r1"):
            if key in single.metrics:
                assert reports[0][2][key] == reports[1][2][key] == pytest.approx(single.metrics[key]), (task, key)
        out = tmp_path / f"dist-{task}"
        shards = [len((out / name).read_text().splitlines()) for name in ("predictions.jsonl", "predictions.rank1.jsonl")]
        assert shards == [3, 2], task  # items split over the ranks
        assert _read(out / "predictions.json") == _read(tmp_path / f"single-{task}" / "predictions.json"), task


# --------------------------------------------------------------------------------------------- output sanity notes
def _vqa_data(majority: list[str], with_truth: bool = True):
    """VQA EvalData built directly: question i has 7 human answers ``majority[i]`` and 3 ``other``."""
    from blip2cli.evaluation.datasets import EvalData, EvalItem

    items = [EvalItem(key=str(i), id=i, image=Path(f"/nonexistent/{i}.jpg"), text="q?") for i in range(len(majority))]
    truth = {str(i): {"answers": [a] * 7 + ["other"] * 3, "answer_type": "other"} for i, a in enumerate(majority)}
    return EvalData(task="vqav2", split="val", kind="vqa", items=items, vqa_truth=truth if with_truth else {})


def _score(data, outputs: list[str]):
    from blip2cli.evaluation.runner import score_outputs

    metrics, _ = score_outputs(data, {str(i): o for i, o in enumerate(outputs)}, default_settings(data.task),
                               use_java=False)
    return metrics


def test_output_stats_note_for_mostly_empty_answers():
    from blip2cli.evaluation.runner import DEGENERATE_OUTPUT_FRACTION

    assert DEGENERATE_OUTPUT_FRACTION == 0.2
    colours = ["red", "green", "blue", "white", "black", "pink", "grey", "brown", "cyan", "gold"]
    data = _vqa_data(colours)
    # 3 of 10 empty (30%): noted, with the counts in output_stats
    metrics = _score(data, ["", " ", "\n"] + colours[3:])
    stats = metrics["output_stats"]
    assert (stats["num_outputs"], stats["num_empty"], stats["empty_fraction"]) == (10, 3, 0.3)
    assert stats["top_output"] == "" and stats["top_fraction"] == 0.3
    empty_notes = [n for n in metrics["notes"] if "are empty" in n]
    assert empty_notes == ["3 of 10 answers (30%) are empty: the model may not have been trained with this prompt "
                           "template, or stops at once"]
    assert stats["warnings"] == empty_notes and metrics["accuracy"] == 70.0
    # 2 of 10 (20%, not more): no note at all
    metrics = _score(data, ["", ""] + colours[2:])
    assert (metrics["output_stats"]["num_empty"], metrics["output_stats"]["empty_fraction"]) == (2, 0.2)
    assert "notes" not in metrics and metrics["output_stats"]["warnings"] == []
    # the case seen in practice, and without ground truth too
    many = _vqa_data(["yes"] * 176, with_truth=False)
    metrics = _score(many, [""] * 173 + ["yes"] * 3)
    assert ("173 of 176 answers (98%) are empty: the model may not have been trained with this prompt template, "
            "or stops at once") in metrics["notes"]
    assert metrics["output_stats"]["num_empty"] == 173 and "top_truth_fraction" not in metrics["output_stats"]


def test_output_stats_note_for_one_identical_caption():
    from blip2cli.evaluation.datasets import EvalData, EvalItem

    items = [EvalItem(key=str(i), id=i, image=Path(f"/nonexistent/{i}.jpg")) for i in range(20)]
    refs = {str(i): [f"a {c} square" for c in ("red", "blue")] for i in range(20)}
    data = EvalData(task="coco", split="test", kind="caption", items=items, captions=refs)
    distinct = [f"a square number {i}" for i in range(20)]
    # 9 of 20 (45%) the same caption, however cased and spaced
    outputs = ["a photo of a cat"] * 5 + ["A photo of  a cat "] * 4 + distinct[9:]
    metrics = _score(data, outputs)
    assert '"a photo of a cat" is 45% of the captions' in metrics["notes"]
    stats = metrics["output_stats"]
    assert stats["top_output"] == "a photo of a cat" and stats["top_fraction"] == 0.45 and stats["num_empty"] == 0
    assert "CIDEr" in metrics  # the metrics are still computed
    # 4 of 20 (20%): no note; 5 of 20 empty captions (25%): the empty note, for captions
    metrics = _score(data, ["a photo of a cat"] * 4 + distinct[4:])
    assert "notes" not in metrics and metrics["output_stats"]["top_fraction"] == 0.2
    metrics = _score(data, [""] * 5 + distinct[5:])
    assert metrics["notes"] == ["5 of 20 captions (25%) are empty: the model may not have been trained with this "
                                "prompt template, or stops at once"]


def test_output_stats_note_for_an_answer_biased_against_the_truth():
    from blip2cli.evaluation.datasets import EvalData, EvalItem

    truth = ["yes"] * 4 + ["no"] * 3 + ["2", "red", "dog"]  # "yes" is the majority answer of 40% of the questions
    data = _vqa_data(truth)
    # "yes" predicted for 70% (> 20% and > 1.5 x 40%): noted
    metrics = _score(data, ["Yes."] * 7 + ["2", "red", "dog"])
    assert '"yes" is 70% of the answers (ground truth: 40%)' in metrics["notes"]
    stats = metrics["output_stats"]
    assert (stats["top_output"], stats["top_fraction"], stats["top_truth_fraction"]) == ("yes", 0.7, 0.4)
    # the same share as the truth (a perfect model): no note
    metrics = _score(data, truth)
    assert "notes" not in metrics and metrics["output_stats"]["top_fraction"] == 0.4
    assert metrics["output_stats"]["top_truth_fraction"] == 0.4 and metrics["accuracy"] == 100.0
    # without ground truth only the empty rule applies
    metrics = _score(_vqa_data(truth, with_truth=False), ["yes"] * 10)
    assert "top_truth_fraction" not in metrics["output_stats"]
    assert not any("of the answers" in n for n in metrics.get("notes", []))
    # GQA: the single ground-truth answer per question
    items = [EvalItem(key=str(i), id=str(i), image=Path(f"/nonexistent/{i}.jpg"), text="q?") for i in range(10)]
    gqa = EvalData(task="gqa", split="testdev", kind="gqa", items=items,
                   gqa_truth={str(i): a for i, a in enumerate(truth)})
    assert '"no" is 90% of the answers (ground truth: 30%)' in _score(gqa, ["no"] * 9 + ["yes"])["notes"]
    assert "notes" not in _score(gqa, truth)


def test_output_stats_in_rescored_metrics_json_and_report(tmp_path):
    from blip2cli.demo.runner import read_metrics

    data_dir = vqa_dir(tmp_path / "vqav2")
    predictions = [{"question_id": 1000, "answer": "red"}] + [{"question_id": 1000 + i, "answer": ""} for i in (1, 2, 3)]
    out = tmp_path / "rescored"
    result = rescore("vqav2", load_eval_data("vqav2", data_dir), _write_json(tmp_path / "p.json", predictions),
                     out_dir=out)
    metrics = _read(out / "metrics.json")
    assert metrics["output_stats"]["num_outputs"] == 4 and metrics["output_stats"]["num_empty"] == 3
    assert metrics["output_stats"]["empty_fraction"] == 0.75
    assert any(n.startswith("3 of 4 answers (75%) are empty") for n in metrics["notes"])
    assert result.metrics["output_stats"] == metrics["output_stats"]
    # numeric-only consumers keep the metric itself: the in-loop filter and the demo's flattened read
    numeric = {k for k, v in result.metrics.items() if isinstance(v, (int, float))}
    assert "accuracy" in numeric and not numeric & {"num_outputs", "num_empty", "empty_fraction", "top_fraction"}
    flat = read_metrics(out)
    assert flat["accuracy"] == metrics["accuracy"] == 25.0 and flat["empty_fraction"] == 0.75
    # `blip2 eval report` marks the run's values
    clean = tmp_path / "clean"
    _write_json(clean / "metrics.json", {"task": "vqav2", "split": "val", "model": "m", "accuracy": 50.0})
    report = CliRunner().invoke(app, ["eval", "report", str(out), str(clean)], env={"COLUMNS": "250"})
    assert report.exit_code == 0, report.output
    assert "⚠ 25.00" in report.output and "⚠ 50.00" not in report.output and "suspicious outputs" in report.output
    plain = CliRunner().invoke(app, ["eval", "report", str(clean)], env={"COLUMNS": "250"})
    assert "⚠" not in plain.output
