"""`blip2 demo`: the synthetic world, its eval files, the unimodal pretraining, and (slow) the whole demo."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from blip2cli.demo import world as W


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> W.World:
    return W.write_world(tmp_path_factory.mktemp("world"), "small", seed=3)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_held_out_pairs_never_appear_in_training_pictures_or_texts(small_world):
    held = set(W.HELD_OUT_PAIRS)
    assert not any(s.pair in held for s in small_world.train)
    # ...while every colour and every shape alone does
    assert {s.color for s in small_world.train} == set(W.COLORS)
    assert {s.shape for s in small_world.train} == set(W.SHAPES)
    texts = [r["caption"] for r in _rows(small_world.captions_csv) + _rows(small_world.vqa_csv)]
    assert len(texts) == (1 + W.QA_PER_IMAGE) * len(small_world.train)
    for color, shape in held:
        assert not any(f"{color} {shape}" in t for t in texts), (color, shape)
    # the held-out split really holds unseen pairs (half of it), with unique attribute tuples
    unseen = [s for s in small_world.test if s.pair in held]
    assert len(unseen) == len(small_world.test) // 2
    assert len(set(small_world.test)) == len(small_world.test)


def test_captions_identify_their_scene_and_questions_are_answerable():
    rng = random.Random(0)
    scene = W.Scene("large", "blue", "cross", "left", "dotted")
    for k in range(len(W.TEMPLATES)):
        words = W.caption(scene, k).split()
        for attr in ("large", "blue", "cross", "left", "dotted"):
            assert attr in words
    answers = {q: a for _, _, q, a in W.questions(scene, rng)}
    assert answers["what color is the shape?"] == "blue"
    assert answers["where is the shape?"] == "left"
    yes_no = [a for _, t, _, a in W.questions(scene, rng) if t == "yes/no"]
    assert set(yes_no) <= {"yes", "no"}


def test_url_lists_point_at_real_pictures(small_world):
    from PIL import Image

    rows = _rows(small_world.captions_csv)
    photo = _rows(small_world.captions_photo_csv)
    assert [r["url"] for r in photo] == [r["url"] for r in rows]
    assert all(p["caption"] == W.CAPTION_PROMPT + r["caption"] for p, r in zip(photo, rows))
    for row in rows[:5]:
        with Image.open(row["url"]) as im:
            assert im.size == (W.RENDER_SIZE, W.RENDER_SIZE)
    assert rows[0]["url"] == _rows(small_world.vqa_csv)[0]["url"] == _rows(small_world.vqa_csv)[1]["url"]
    assert W.qa_text("what shape is shown?", "cross") == "question what shape is shown? answer cross"


def test_eval_files_load_with_blip2_eval_and_score_as_expected(small_world, tmp_path):
    """The held-out split follows the eval data contract: `blip2 eval`'s own loader reads it, perfect
    predictions score 100, and the majority answer scores the baseline the demo reports."""
    from blip2cli.evaluation import load_eval_data, rescore

    n = len(small_world.test)
    vqa = load_eval_data("vqav2", data_dir=small_world.eval_dirs["vqav2"], split="test")
    assert len(vqa.items) == n * 7
    coco = load_eval_data("coco", data_dir=small_world.eval_dirs["coco"], split="test")
    assert len(coco.items) == n
    flickr = load_eval_data("flickr30k", data_dir=small_world.eval_dirs["flickr30k"], split="test")
    assert len(flickr.texts) == n * len(W.TEMPLATES)
    assert all(Path(it.image).is_file() for it in vqa.items[:10] + coco.items[:10])

    qs = json.loads((small_world.eval_dirs["vqav2"] / "questions_test.json").read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads(
        (small_world.eval_dirs["vqav2"] / "annotations_test.json").read_text())["annotations"]}
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps([{"question_id": q["question_id"],
                                    "answer": anns[q["question_id"]]["multiple_choice_answer"]} for q in qs]))
    assert rescore("vqav2", vqa, perfect).metrics["accuracy"] == pytest.approx(100.0)
    majority = small_world.train_answers.most_common(1)[0][0]
    const = tmp_path / "majority.json"
    const.write_text(json.dumps([{"question_id": q["question_id"], "answer": majority} for q in qs]))
    baseline = rescore("vqav2", vqa, const).metrics["accuracy"]
    assert baseline == pytest.approx(small_world.baselines()["vqa_majority"], abs=0.01)
    assert 5 < baseline < 40


def test_unimodal_pretraining_lowers_each_loss_and_saves_loadable_parts(small_world, tmp_path):
    from blip2cli.demo.unimodal import pretrain_bert, pretrain_lm, pretrain_vision
    from blip2cli.models.llm import end_token, load_language_model
    from blip2cli.models.vision_loading import load_vision_encoder

    def falls(losses, factor):
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        return last < factor * first

    images = sorted((small_world.root / "images" / "train").glob("*.jpg"))[:256]
    texts = small_world.text_corpus.read_text().splitlines()
    vision = pretrain_vision(images, tmp_path / "vision", steps=40, batch=32)
    lm = pretrain_lm(texts, tmp_path / "lm", steps=40, batch=32)
    bert = pretrain_bert(texts, tmp_path / "bert", steps=30, batch=32)
    assert falls(vision, 0.7), vision[:5] + vision[-5:]
    assert falls(lm, 0.6), lm[:5] + lm[-5:]
    assert falls(bert, 0.8), bert[:5] + bert[-5:]

    encoder, spec = load_vision_encoder(f"hf:{tmp_path / 'vision'}", image_size=32)
    assert spec["hidden_size"] == 64
    model, tokenizer = load_language_model(tmp_path / "lm")
    assert end_token(model, tokenizer) == "\n"  # OPT convention: captions end with "\n"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "bert").bos_token == "[DEC]"


def test_vision_pretraining_keeps_where_the_shape_is(small_world, tmp_path):
    """The patch-position term: an attention-pooling probe (8 queries cross-attending to the features the
    Q-Former reads: penultimate layer, normalised like ln_vision) learns the shape's position from labels;
    on the same encoder trained without the term it stays at chance (5 positions)."""
    import torch
    from transformers import ViTModel

    from blip2cli.demo.unimodal import _images_to_tensor, pretrain_vision

    images = sorted((small_world.root / "images" / "train").glob("*.jpg"))[:512]
    labels = torch.tensor([W.POSITIONS.index(scene.position) for scene in small_world.train[:512]])
    pixels = _images_to_tensor(images)

    def position_probe_accuracy(position_weight: float) -> float:
        out = tmp_path / f"vision_{position_weight}"
        pretrain_vision(images, out, steps=200, batch=32, position_weight=position_weight)
        with torch.no_grad():
            hidden = ViTModel.from_pretrained(out)(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        features = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:])
        torch.manual_seed(0)
        attention = torch.nn.MultiheadAttention(hidden.shape[-1], 4, batch_first=True)
        queries = torch.nn.Parameter(torch.randn(8, hidden.shape[-1]) * 0.3)
        head = torch.nn.Linear(8 * hidden.shape[-1], len(W.POSITIONS))
        opt = torch.optim.AdamW([queries, *attention.parameters(), *head.parameters()], 2e-3)

        def classify(f: torch.Tensor) -> torch.Tensor:
            return head(attention(queries.expand(len(f), -1, -1), f, f)[0].flatten(1))

        batches = torch.Generator().manual_seed(0)
        for _ in range(300):
            i = torch.randint(400, (64,), generator=batches)
            loss = torch.nn.functional.cross_entropy(classify(features[i]), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (classify(features[400:]).argmax(1) == labels[400:]).float().mean().item()

    # weight 0.1: the term shows within this test's 200 small steps (the demo's 0.05 needs its ~400 larger ones).
    # Over encoder seeds 0-2 on torch 2.6 and 2.14 the probe read 59-85% with the term and 15-17% without it,
    # so the bound sits well below the worst run and far above chance (20%).
    with_term, without = position_probe_accuracy(0.1), position_probe_accuracy(0.0)
    assert with_term > 0.45, with_term
    assert without < 0.3, without


def test_lm_pretraining_packs_related_documents_like_llm_pretraining(small_world):
    """A corpus line of two documents becomes "</s> doc1 \\n </s> doc2 \\n": in stage 2 the visual
    prompts stand where doc1 stood, in front of the second "</s>"."""
    from blip2cli.demo.unimodal import _packed_batch
    from blip2cli.demo.world import DOCUMENT_BREAK
    from blip2cli.tiny.tokenizers import train_opt_tokenizer

    lines = small_world.text_corpus.read_text().splitlines()
    packed = [line for line in lines if DOCUMENT_BREAK in line]
    assert len(packed) > len(lines) // 3  # half the corpus reads one document in the light of another
    tokenizer = train_opt_tokenizer([t.replace(DOCUMENT_BREAK, " ") for t in lines[:500]], vocab_size=300)
    first, second = packed[0].split(DOCUMENT_BREAK)
    ids, mask = _packed_batch(tokenizer, [packed[0], "a short one"])
    expected = tokenizer(first + "\n")["input_ids"] + tokenizer(second + "\n")["input_ids"]
    assert ids[0, : len(expected)].tolist() == expected and int(mask[0].sum()) == len(expected)
    assert expected.count(tokenizer.bos_token_id) == 2
    assert int(mask[1].sum()) == len(tokenizer("a short one\n")["input_ids"]) < ids.shape[1]


def test_read_metrics_finds_eval_output(tmp_path):
    from blip2cli.demo.runner import read_metrics
    from blip2cli.errors import Blip2Error

    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 71.5, "per_type": {"yes/no": 80.0}, "task": "x"}))
    assert read_metrics(tmp_path)["accuracy"] == 71.5
    with pytest.raises(Blip2Error):
        read_metrics(tmp_path / "missing")


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from blip2cli.demo.runner import DemoOptions, run_demo

    return run_demo(DemoOptions(out=tmp_path_factory.mktemp("demo") / "out", size="small"))


def _early_mean_loss(run_dir: Path) -> float:
    from blip2cli.demo.report import early_loss

    return early_loss(run_dir)


@pytest.mark.slow
def test_demo_small_learns_far_above_baselines(small_demo):
    """The whole demo at reduced size (real commands end to end): held-out metrics far above baselines."""
    m, b, out = small_demo.metrics, small_demo.baselines, small_demo.out
    chance = b["retrieval_chance_r1"]
    # R@1 at least 10x chance, with ITM re-ranking (the paper's protocol) and with ITC alone (the demo's
    # `--k-test 1` diagnostic; ITM learns late on this data, and re-ranking costs some R@1 here)
    assert m["stage1"]["txt_r1"] >= 10 * chance
    assert m["stage1"]["img_r1"] >= 10 * chance
    assert m["stage1_itc"]["txt_r1"] >= 10 * chance
    assert m["stage1_itc"]["img_r1"] >= 10 * chance
    # VQA: twice the majority answer, and above even the per-question-type majority (a language-only prior)
    assert m["stage2"]["accuracy"] >= 2 * b["vqa_majority"]
    assert m["stage2"]["accuracy"] > b["vqa_type_majority"] + 10
    assert m["stage2"]["CIDEr"] >= 2 * b["caption_constant_cider"]
    assert (out / "losses.png").is_file() and (out / "gallery.png").is_file()
    assert small_demo.ask["answer"]


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    from blip2cli.demo.runner import DemoOptions, run_demo

    return run_demo(DemoOptions(out=tmp_path_factory.mktemp("demo") / "out", size="full"))


@pytest.mark.slow
def test_demo_full_meets_issue_targets(full_demo):
    """`blip2 demo` as the README runs it (full size, 10.6-14.9 minutes on 2 cores) reaches every target of the
    demo's issue; the reduced size above does not reach them all (VQA ~66 of ~71.5 needed)."""
    m, b = full_demo.metrics, full_demo.baselines
    chance = b["retrieval_chance_r1"]
    assert m["stage1"]["txt_r1"] >= 10 * chance and m["stage1"]["img_r1"] >= 10 * chance
    majority = b["vqa_majority"]
    assert m["stage2"]["accuracy"] >= majority + 2 / 3 * (100 - majority)
    assert m["stage2"]["CIDEr"] >= 2 * b["caption_constant_cider"]
    # Figure 5: stage 1 helps stage 2 (captioning, and the LM loss early in training; on VQA the fresh
    # Q-Former catches up by the end of the 2400 steps)
    assert m["stage2"]["CIDEr"] > m["stage2_no_stage1"]["CIDEr"]
    out = full_demo.out
    assert _early_mean_loss(out / "runs" / "stage2") < _early_mean_loss(out / "runs" / "stage2_no_stage1")
