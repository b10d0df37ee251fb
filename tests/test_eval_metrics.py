"""Evaluation metrics against values computed by hand (official VQA rules, GQA, captioning, retrieval)."""

from __future__ import annotations

import shutil

import pytest

from blip2cli.evaluation import metrics as M


# --------------------------------------------------------------------------------------------- VQA rules
@pytest.mark.parametrize(
    "text, expected",
    [
        ("hello, world", "hello world"),  # ", " touches a space: deleted
        ("a,b", "a b"),  # no space next to it: replaced by a space
        ("t-shirt", "t shirt"),
        ("a-b -c", "ab c"),  # " -" occurs somewhere in the input, so every "-" is deleted
        ("1,000", "1000"),  # digit-comma-digit: all listed characters deleted
        ("1,000 (approx)", "1000 approx"),
        ("x (approx)", "x approx "),  # " (" deletes "(", the lone ")" becomes a space
        ("yes!", "yes "),
        ("3.5", "3.5"),  # a period before a digit stays
        ("end.", "end"),  # any other period goes
        ("it's 5:30", "it's 5:30"),  # apostrophes and colons are not in the list
    ],
)
def test_vqa_punctuation_step(text, expected):
    assert M.vqa_punctuation(text) == expected


def test_vqa_period_quirk_removes_at_most_32_periods():
    # The official call passes re.UNICODE (32) where re.sub expects ``count``.
    assert M.vqa_punctuation("a" + "." * 40) == "a" + "." * 8


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"), ("eleven", "eleven"),  # number words
        ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),  # articles
        ("dont", "don't"), ("isnt it", "isn't it"), ("Im", "im"),  # contractions (capitalised keys never match)
        ("  Yes.\n", "yes"), ("red\tcar", "red car"),  # whitespace, case, final period
        ("the two-way street!", "2 way street"),  # punctuation first, then the word steps
    ],
)
def test_vqa_prediction_normalisation(prediction, expected):
    assert M.normalize_vqa_answer(prediction) == expected


def test_contraction_table_is_the_official_one():
    assert len(M.CONTRACTIONS) == 120
    assert M.CONTRACTIONS["somebody'd"] == "somebodyd"  # an official oddity, kept
    assert M.CONTRACTIONS["twas"] == "'twas" and M.CONTRACTIONS["y'allll"] == "y'all'll"
    assert all("\u2019" not in k + v for k, v in M.CONTRACTIONS.items())  # current file: straight apostrophes


def test_vqa_accuracy_unanimous_and_split_annotators():
    acc = M.vqa_question_accuracy
    assert acc("yes", ["yes"] * 10) == 1.0
    assert acc("Yes.", ["yes"] * 10) == 1.0
    assert acc("no", ["yes"] * 10) == 0.0
    # Unanimous answers are NOT normalised: "t-shirt" -> "t shirt" never equals the raw "t-shirt".
    assert acc("t-shirt", ["t-shirt"] * 10) == 0.0
    # ... but non-unanimous ones get the punctuation step, so the same prediction now scores.
    assert acc("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
    # 2 "red", 8 "blue", prediction "red": dropping a red leaves 1 match (1/3), dropping a blue 2 (2/3).
    assert acc("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert acc("blue", ["red"] * 2 + ["blue"] * 8) == 1.0
    # 3 of 10 agree: (3 x 2/3 + 7 x 1) / 10 = 0.9; 1 of 10: (0 + 9 x 1/3) / 10 = 0.3.
    assert acc("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert acc("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # Number words in the prediction only: "two" becomes "2"; the answers stay as annotated.
    assert acc("two", ["2"] * 4 + ["two"] * 6) == 1.0  # 4 "2"s among the others -> always >= 3
    assert acc("two", ["2"] * 2 + ["two"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_vqa_accuracy_overall_and_per_type():
    truth = {
        "1": {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        "2": {"answers": ["3"] * 2 + ["4"] * 8, "answer_type": "number", "question_type": "how many"},
        "3": {"answers": ["cat"] + ["dog"] * 9, "answer_type": "other", "question_type": "what is"},
        "4": {"answers": ["red"] * 10, "answer_type": "other", "question_type": "what color"},
        "5": {"answers": ["blue"] * 10, "answer_type": "other", "question_type": "what color"},  # no prediction
    }
    predictions = {"1": "yes", "2": "three", "3": "a cat", "4": "Red"}
    result = M.vqa_accuracy(predictions, truth)
    # per question: 1.0, 0.6, 0.3, 1.0
    assert result["accuracy"] == 72.5
    assert result["per_type"] == {"number": 60.0, "other": 65.0, "yes/no": 100.0}
    assert result["per_question_type"]["what color"] == 100.0
    assert result["num_questions"] == 4
    # rounding to 2 decimals, as the official code
    assert M.vqa_accuracy({"1": "cat"}, {"1": {"answers": ["cat"] + ["dog"] * 9}})["accuracy"] == 30.0
    assert M.vqa_accuracy({"1": "x", "2": "y", "3": "x"},
                          {k: {"answers": ["x"] * 10} for k in "123"})["accuracy"] == 66.67


def test_gqa_exact_match_both_scorings():
    truth = {"a": "dog", "b": "dog", "c": "2", "d": "t-shirt", "e": "left", "f": "The Left"}
    predictions = {"a": "The dog.", "b": "dogs", "c": "two", "d": "t-shirt", "e": "left.", "f": "left"}
    # The prediction is normalised in both: a "The dog." -> "dog" (hit), b "dogs" (miss), c "two" -> "2"
    # (hit), d "t-shirt" -> "t shirt", e "left." -> "left" (hit), f "left".
    # release (LAVIS at release, the paper's numbers): the ground truth as given, so d misses "t-shirt" and
    # f misses "The Left" -> 3 of 6.
    assert M.gqa_accuracy(predictions, truth, "release") == {"accuracy": 50.0, "num_questions": 6}
    # current (LAVIS today): the ground truth is normalised too, "t-shirt" -> "t shirt" and "The Left" ->
    # "left" -> 5 of 6.
    assert M.gqa_accuracy(predictions, truth, "current") == {"accuracy": 83.33, "num_questions": 6}
    assert M.gqa_accuracy(predictions, truth) == M.gqa_accuracy(predictions, truth, "current")  # the default
    with pytest.raises(ValueError, match="current.*release"):
        M.gqa_accuracy(predictions, truth, "paper")


# --------------------------------------------------------------------------------------------- retrieval
def test_retrieval_recalls_by_hand():
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    i2t = [[1, 4, 2], [5, 4, 3, 0, 1], [0, 1, 2, 3]]  # ranks 0, 2, miss (truncated list)
    t2i = [[0], [1, 0], [1], [0, 2, 2, 2, 2, 1], [2], [0] * 9 + [2]]  # ranks 0, 1, 0, 5, 0, 9
    out = M.retrieval_metrics(i2t, t2i, img2txt, txt2img)
    assert out["txt_r1"] == pytest.approx(100 / 3, abs=1e-3)
    assert out["txt_r5"] == pytest.approx(200 / 3, abs=1e-3) and out["txt_r10"] == pytest.approx(200 / 3, abs=1e-3)
    assert out["img_r1"] == 50.0 and out["img_r5"] == pytest.approx(400 / 6, abs=1e-3) and out["img_r10"] == 100.0
    assert out["txt_r_mean"] == pytest.approx((100 / 3 + 400 / 3) / 3, abs=1e-3)
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + out["img_r_mean"]) / 2, abs=1e-3)
    with pytest.raises(ValueError):
        M.retrieval_metrics(i2t[:2], t2i, img2txt, txt2img)


def test_rank_scores_orders_by_score_then_index():
    assert M.rank_scores([0.1, 0.5, 0.5, -1.0, 0.9], top=4) == [4, 1, 2, 0]


# --------------------------------------------------------------------------------------------- captioning
REFS = {
    "1": ["A dog runs on the grass.", "a brown dog running across a field"],
    "2": ["Two cats sleeping on a red sofa.", "two cats asleep on a couch"],
    "3": ["A man rides a bike down the street.", "a person riding a bicycle on a road"],
}


def test_python_ptb_tokenizer():
    text = "A man's dog, (sitting) on a \"big\" chair... He doesn't care. U.S. flag, 3.5 m, 1,000 t-shirts!"
    assert M.python_ptb_tokenize(text) == (
        "a man 's dog -lrb- sitting -rrb- on a big chair he does n't care u.s. flag 3.5 m 1,000 t-shirts"
    )
    assert M.python_ptb_tokenize("they're here at 10:30; can't stop?!") == "they 're here at 10:30 ca n't stop ?!"


def test_caption_metrics_without_java_skip_meteor_and_spice(monkeypatch):
    monkeypatch.setenv(M.NO_JAVA_ENV, "1")
    assert not M.java_available()
    perfect = {k: v[0] for k, v in REFS.items()}
    out = M.caption_metrics(perfect, REFS)
    assert out["tokenizer"] == "python-ptb"
    assert out["METEOR"] is None and out["SPICE"] is None
    assert out["skipped"] == ["METEOR", "SPICE"]
    assert out["skipped_reasons"]["SPICE"] == "needs Java"
    assert out["BLEU-1"] == 100.0 and out["BLEU-4"] == 100.0 and out["ROUGE-L"] == 100.0
    bad = {"1": "a plate of food", "2": "a red bus on the road", "3": "two cats on a sofa"}
    worse = M.caption_metrics(bad, REFS)
    assert worse["CIDEr"] < out["CIDEr"] and worse["BLEU-4"] < out["BLEU-4"]
    # an empty caption scores 0 instead of crashing ROUGE-L
    empty = M.caption_metrics({"1": "", "2": perfect["2"], "3": perfect["3"]}, REFS)
    assert empty["ROUGE-L"] == pytest.approx(200 / 3, abs=0.01)
    # only images present on both sides are scored
    assert M.caption_metrics({"1": perfect["1"], "9": "x"}, REFS)["num_images"] == 1


def test_spice_needs_corenlp(monkeypatch):
    monkeypatch.delenv(M.NO_JAVA_ENV, raising=False)
    ok, reason = M.spice_available()
    if shutil.which("java") is None:
        assert (ok, reason) == (False, "needs Java")
    elif not ok:
        assert "CoreNLP 3.6.0" in reason


def test_lemmatizer_reports_why_it_is_missing(monkeypatch):
    lemmatize, reason = M.load_lemmatizer()
    if lemmatize is None:
        # one line saying how to get it: the eval extra, and the model's download (or a local copy)
        assert "\n" not in reason and "spaCy" in reason and "en_core_web_sm" in reason
        assert 'pip install -e ".[eval]"' in reason or M.SPACY_MODEL_ENV in reason
    else:
        assert lemmatize("two dogs running") == "two dog run"
    # a model that is not there (a path, as BLIP2_SPACY_MODEL may give) is reported, never downloaded
    monkeypatch.setenv(M.SPACY_MODEL_ENV, "/nonexistent/spacy-model")
    lemmatize, reason = M.load_lemmatizer()
    assert lemmatize is None and ("/nonexistent/spacy-model" in reason or "spaCy is not installed" in reason)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")
def test_python_tokenizer_matches_stanford_ptb_and_java_metrics(monkeypatch):
    monkeypatch.delenv(M.NO_JAVA_ENV, raising=False)
    captions = [
        "A man's dog, (sitting) on a \"big\" chair... He doesn't care.", "U.S. flag at 3.5 m and 1,000 t-shirts!",
        "Two people walking down the street; one's holding an umbrella.", "It's 10:30 a.m. on a sunny day",
        "The 'best' pizza in town?", "kids' toys on the floor", "they're we've I'll can't won't", "a [big] {red} (car)",
        "Mr. Smith and Dr. Who", "end with ?!", "a---b", "a plate with food: rice & beans",
    ]
    java, name = M._tokenize({str(i): [c] for i, c in enumerate(captions)}, True)
    assert name == "stanford-ptb"
    for i, caption in enumerate(captions):
        assert M.python_ptb_tokenize(caption) == java[str(i)][0], caption
    out = M.caption_metrics({k: v[1] for k, v in REFS.items()}, REFS, use_java=True)
    assert out["tokenizer"] == "stanford-ptb" and 0 < out["METEOR"] <= 100
    python = M.caption_metrics({k: v[1] for k, v in REFS.items()}, REFS, use_java=False)
    assert python["CIDEr"] == out["CIDEr"] and python["BLEU-4"] == out["BLEU-4"]
