"""Evaluation metrics, as the published numbers were computed (spec section (g)).

- VQA accuracy: the official GT-Vision-Lab ``vqaEval.py`` (Python 3 version, also LAVIS'
  ``vqa_tools/vqa_eval.py``), rule for rule, quirks included: the prediction gets the punctuation
  and the digit/article/contraction steps, the ten human answers only the punctuation step and only
  when they are not unanimous; each question scores the mean over the ten leave-one-out subsets of
  ``min(1, matches / 3)``; accuracies are ``100 x mean`` rounded to 2 decimals.
- GQA: exact match (LAVIS ``GQATask``) of the normalised prediction with the ground-truth answer, itself
  normalised too ("current", LAVIS today) or compared as given ("release", LAVIS when the paper was written).
- OK-VQA: spaCy lemmatisation of nouns and verbs in the predicted answer (LAVIS ``apply_lemmatizer``); spaCy
  is the ``eval`` extra, its English model a separate download (``load_lemmatizer`` says how).
- Captioning: pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE after PTB tokenisation.
  Java runs the Stanford PTB tokenizer and METEOR; without Java a pure-Python PTB-style tokenizer is
  used and METEOR/SPICE are reported as skipped. SPICE also needs Stanford CoreNLP 3.6.0, which is
  never downloaded here.
- Retrieval: recall@1/5/10 in both directions (LAVIS ``_report_metrics``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# ============================================================================ VQA normalisation
# Characters handled by the punctuation step (official list; apostrophe and colon are not in it).
VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Official pattern "(?!<=\d)(\.)(?!\d)": the first group was meant as a look-behind but is a
# look-ahead for the literal "<=" and never fires, so only "not followed by a digit" matters.
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (= 32) in the position of ``count``: at most 32 periods go.
_PERIOD_COUNT = 32

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table as "source target" pairs (GT-Vision-Lab/VQA, current master: all
# straight apostrophes; keys with capitals can never match lowercased text but are kept as published).
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll
someones someone's|somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've
therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll
theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd
wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split(" ") for pair in _CONTRACTION_PAIRS.replace("\n", "|").split("|") if pair.strip()
)


def vqa_punctuation(text: str) -> str:
    """The official punctuation step.

    Each listed character is deleted when it touches a space somewhere in the *input* string (or when the
    input contains digit-comma-digit anywhere), else replaced by a space; then every ``.`` not followed by
    a digit is removed.
    """
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in VQA_PUNCTUATION:
        if digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def vqa_digits_articles(text: str) -> str:
    """The official digit/article step: lowercase, number words -> digits, drop a/an/the, expand
    contractions (``dont`` -> ``don't``), single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """What the official evaluation compares for a *prediction*."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(answer))


def vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the human answers (usually 10).

    Mean over the leave-one-out subsets of ``min(1, matches / 3)``. The human answers get the punctuation
    step only when they are not all identical.
    """
    if not answers:
        raise ValueError("a VQA question needs at least one ground-truth answer")
    pred = normalize_vqa_answer(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [vqa_punctuation(a) for a in gts]
    total_matches = sum(1 for a in gts if a == pred)
    scores = []
    for a in gts:
        others = total_matches - (1 if a == pred else 0)
        scores.append(min(1.0, others / 3.0))
    return sum(scores) / len(scores)


def _percent(values: Sequence[float], digits: int = 2) -> float:
    return round(100.0 * sum(values) / len(values), digits) if values else 0.0


def vqa_accuracy(predictions: Mapping[str, str], truth: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Official VQA accuracy over the questions present in both ``predictions`` and ``truth``.

    ``truth[key]`` holds ``answers`` (list of strings), and optionally ``answer_type`` /
    ``question_type``. Returns ``accuracy`` (0-100), ``per_type`` (per answer type),
    ``per_question_type`` and ``num_questions``.
    """
    overall: list[float] = []
    by_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for key, gt in truth.items():
        if key not in predictions:
            continue
        acc = vqa_question_accuracy(predictions[key], gt["answers"])
        overall.append(acc)
        if gt.get("answer_type") is not None:
            by_type.setdefault(gt["answer_type"], []).append(acc)
        if gt.get("question_type") is not None:
            by_question_type.setdefault(gt["question_type"], []).append(acc)
    return {
        "accuracy": _percent(overall),
        "per_type": {t: _percent(v) for t, v in sorted(by_type.items())},
        "per_question_type": {t: _percent(v) for t, v in sorted(by_question_type.items())},
        "num_questions": len(overall),
    }


def gqa_accuracy(predictions: Mapping[str, str], truth: Mapping[str, str], scoring: str = "current") -> dict[str, Any]:
    """GQA exact match (LAVIS ``GQATask``). The prediction always gets the VQA normalisation (punctuation,
    then digits/articles/contractions); the ground-truth answer gets it too with ``scoring="current"``
    (LAVIS now: "t-shirt" becomes "t shirt" on both sides and matches) and is compared as given with
    ``"release"`` (LAVIS at release: a ground truth with punctuation, like "t-shirt", can never match)."""
    if scoring not in ("current", "release"):
        raise ValueError(f"GQA scoring must be 'current' or 'release', got {scoring!r}")
    hits = []
    for key, gt in truth.items():
        if key not in predictions:
            continue
        expected = normalize_vqa_answer(gt) if scoring == "current" else gt
        hits.append(float(normalize_vqa_answer(predictions[key]) == expected))
    return {"accuracy": _percent(hits), "num_questions": len(hits)}


# ============================================================================ OK-VQA lemmatisation
SPACY_MODEL_ENV = "BLIP2_SPACY_MODEL"  # a spaCy package name or a path to a model directory
SPACY_MODEL = "en_core_web_sm"  # LAVIS's
SPACY_INSTALL = 'pip install -e ".[eval]" && python -m spacy download en_core_web_sm'


def load_lemmatizer(model: str | None = None) -> tuple[Callable[[str], str] | None, str]:
    """spaCy lemmatiser of nouns and verbs (LAVIS ``_lemmatize``) from ``model`` (default: $BLIP2_SPACY_MODEL,
    else ``en_core_web_sm``; a package name or a model directory), or ``(None, reason)`` when spaCy or the
    model is missing. Nothing is downloaded; the reason is one line saying how to fetch or point to it."""
    name = model or os.environ.get(SPACY_MODEL_ENV, "").strip() or SPACY_MODEL
    try:
        import spacy
    except ImportError:
        return None, f"spaCy is not installed: {SPACY_INSTALL}"
    try:
        nlp = spacy.load(name)
    except OSError:
        return None, (f"spaCy model {name!r} is not installed: python -m spacy download {SPACY_MODEL}, "
                      f"or point {SPACY_MODEL_ENV} at a local copy")

    def lemmatize(answer: str) -> str:
        return " ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(answer))

    return lemmatize, ""


# ============================================================================ captioning
# Tokens the pycocoevalcap PTB wrapper removes after tokenising.
PTB_PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                             "-", "--", "...", ";"})
NO_JAVA_ENV = "BLIP2_EVAL_NO_JAVA"

_PTB_CLITICS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PTB_SPLIT_CHARS = re.compile(r"([\"`;(){}\[\]%#@&$*=+|~^]|[?!]+)")
_PTB_COMMA = re.compile(r",(?!\d)|(?<!\d),")
_PTB_COLON = re.compile(r":(?!\d)|(?<!\d):")
_PTB_DASHES = re.compile(r"--+|\.\.\.+")
# With -lowerCase, PTB's bracket tokens come out lowercased and so survive pycocoevalcap's filter.
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co.", "ltd.",
                                "no.", "mt.", "ave.", "e.g.", "i.e."})


def python_ptb_tokenize(text: str) -> str:
    """A pure-Python approximation of ``PTBTokenizer -preserveLines -lowerCase`` followed by the removal of
    pycocoevalcap's punctuation tokens, for machines without Java. Clitics (``n't``, ``'s``...) become
    tokens, hyphenated words, abbreviations and numbers such as ``3.5`` / ``1,000`` / ``10:30`` stay whole,
    brackets become ``-lrb-``-style tokens (which, lowercased, the official filter keeps), sentence
    punctuation and quotes go. tests/test_eval_metrics.py compares it with the Java tokenizer.
    """
    text = text.replace("\n", " ").lower()
    text = _PTB_DASHES.sub(" ", text)
    text = _PTB_CLITICS.sub(r"\1 \2", text)
    text = _PTB_SPLIT_CHARS.sub(r" \1 ", text)
    text = _PTB_COMMA.sub(" , ", text)
    text = _PTB_COLON.sub(" : ", text)
    tokens: list[str] = []
    for token in text.split():
        # Quotes around words: a leading apostrophe that is not a clitic, trailing apostrophes and periods.
        if token.startswith("'") and token not in ("'s", "'re", "'ve", "'ll", "'d", "'m") and len(token) > 1:
            tokens.append("'")
            token = token[1:]
        trailing: list[str] = []
        while len(token) > 1 and token[-1] in ".'" and not _is_abbreviation(token):
            trailing.insert(0, token[-1])
            token = token[:-1]
        tokens.append(_PTB_BRACKETS.get(token, token))
        tokens.extend(trailing)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t not in ('"', "-"))


def _is_abbreviation(token: str) -> bool:
    """``u.s.``, ``a.m.``, ``mr.``: PTB keeps their final period."""
    return token in _PTB_ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.){2,}", token) is not None


def java_available() -> bool:
    """A ``java`` executable on PATH, unless ``BLIP2_EVAL_NO_JAVA`` is set."""
    if os.environ.get(NO_JAVA_ENV, "").strip() not in ("", "0"):
        return False
    return shutil.which("java") is not None


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap

    return Path(list(pycocoevalcap.__path__)[0])


def spice_available() -> tuple[bool, str]:
    """SPICE needs Java and Stanford CoreNLP 3.6.0 jars next to pycocoevalcap's spice jar."""
    if not java_available():
        return False, "needs Java"
    lib = _pycocoevalcap_dir() / "spice" / "lib"
    needed = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        return False, f"Stanford CoreNLP 3.6.0 jars missing in {lib} ({', '.join(missing)})"
    return True, ""


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence what child processes (the JVM's progress lines) write to file descriptor 2."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize(texts: Mapping[str, Sequence[str]], use_java: bool) -> tuple[dict[str, list[str]], str]:
    if use_java:
        try:
            from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

            data = {k: [{"caption": c} for c in v] for k, v in texts.items()}
            with contextlib.redirect_stdout(io.StringIO()), _quiet_stderr_fd():
                return PTBTokenizer().tokenize(data), "stanford-ptb"
        except Exception:  # unwritable site-packages, broken JVM...: fall back, never crash
            pass
    return {k: [python_ptb_tokenize(c) for c in v] for k, v in texts.items()}, "python-ptb"


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    use_java: bool | None = None,
) -> dict[str, Any]:
    """COCO caption metrics (x100) over the images present in both mappings.

    Keys: ``BLEU-1``..``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr``, ``SPICE`` (``None`` when skipped),
    ``skipped`` (metric names with the reason in ``skipped_reasons``), ``tokenizer`` and ``num_images``.
    ``use_java`` None: use Java when ``java_available()``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = [k for k in references if k in predictions]
    if not keys:
        raise ValueError("no prediction matches a ground-truth image")
    java = java_available() if use_java is None else (use_java and shutil.which("java") is not None)
    gts, tokenizer = _tokenize({k: list(references[k]) for k in keys}, java)
    res, _ = _tokenize({k: [predictions[k]] for k in keys}, java and tokenizer == "stanford-ptb")

    out: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"BLEU-{n}"] = round(100.0 * value, 2)

    out["METEOR"] = None
    if java:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            try:
                score, _ = meteor.compute_score(gts, res)
            finally:
                del meteor
            out["METEOR"] = round(100.0 * score, 2)
        except Exception as err:
            skipped["METEOR"] = f"METEOR failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    else:
        skipped["METEOR"] = "needs Java"

    # ROUGE-L per image as pycocoevalcap, but an empty hypothesis scores 0 instead of dividing by zero.
    rouge = Rouge()
    per_image = [rouge.calc_score(res[k], gts[k]) if res[k][0].strip() else 0.0 for k in keys]
    out["ROUGE-L"] = round(100.0 * sum(per_image) / len(per_image), 2)

    cider, _ = Cider().compute_score(gts, res)
    out["CIDEr"] = round(100.0 * float(cider), 2)

    out["SPICE"] = None
    ok, reason = spice_available() if java else (False, "needs Java")
    if ok:
        try:
            from pycocoevalcap.spice.spice import Spice

            with contextlib.redirect_stdout(io.StringIO()):
                score, _ = Spice().compute_score(gts, res)
            out["SPICE"] = round(100.0 * float(score), 2)
        except Exception as err:
            skipped["SPICE"] = f"SPICE failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    else:
        skipped["SPICE"] = reason
    out["skipped"] = sorted(skipped)
    out["skipped_reasons"] = skipped
    out["tokenizer"] = tokenizer
    out["num_images"] = len(keys)
    return out


# ============================================================================ retrieval
def _first_hit(ranking: Sequence[int], targets: Iterable[int]) -> float:
    """Position (0-based) of the first target in ``ranking``; inf when none is listed."""
    wanted = set(targets)
    for position, index in enumerate(ranking):
        if index in wanted:
            return position
    return float("inf")


def retrieval_metrics(
    i2t_rankings: Sequence[Sequence[int]],
    t2i_rankings: Sequence[Sequence[int]],
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
) -> dict[str, float]:
    """Recall@1/5/10 (0-100) for text retrieval (each image's ranked texts; correct at the best rank of any
    of its captions) and image retrieval (each text's ranked images), their means and the overall mean.

    Rankings may be truncated (e.g. to the top 10): an unlisted ground truth counts as a miss.
    """
    if len(i2t_rankings) != len(img2txt) or len(t2i_rankings) != len(txt2img):
        raise ValueError("one ranking per image and one per text are needed")
    text_ranks = [_first_hit(r, img2txt[i]) for i, r in enumerate(i2t_rankings)]
    image_ranks = [_first_hit(r, [txt2img[t]]) for t, r in enumerate(t2i_rankings)]

    def recall(ranks: list[float], k: int) -> float:
        return 100.0 * sum(1 for r in ranks if r < k) / len(ranks) if ranks else 0.0

    out = {f"txt_r{k}": recall(text_ranks, k) for k in (1, 5, 10)}
    out.update({f"img_r{k}": recall(image_ranks, k) for k in (1, 5, 10)})
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return {k: round(v, 4) for k, v in out.items()}


def rank_scores(scores: Sequence[float], top: int = 10) -> list[int]:
    """Indices of the ``top`` highest scores, ties broken by the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:top]
