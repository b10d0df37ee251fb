"""Training on question-answer data: VQA-format files -> shards -> the LLM learns the answer behind its prompt.

``blip2 download pretrain vqa`` turns official-format questions + annotations + images into shards whose
samples carry the question and the answers; stage 2 (and ``blip2 finetune vqa``) then trains the frozen LLM on
the answer alone, the question reaching it through the model's VQA template, masked from the loss like any
prompt. Labelling the whole "Question: ... Answer: ..." text instead spends most of the loss on predicting
questions, and a real LLM that has learnt to end a text after "Answer:" answers with nothing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from blip2cli.data.download import VqaSource, download_pretrain, write_vqa_url_list
from blip2cli.data.training import make_train_loader
from blip2cli.errors import Blip2Error
from blip2cli.models.text import IGNORE_INDEX
from blip2cli.recipes import load_recipe
from blip2cli.training.builders import build_model
from blip2cli.training.loop import train
from blip2cli.training.text_batching import TextBatcher
from tests import tiny
from tests.test_eval_tasks import vqa_dir


def _qa_shards(directory: Path, n: int = 12) -> list[str]:
    """Shards of question-answer samples, as `blip2 download pretrain vqa` writes them (answers as JSON text)."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    colours = list(tiny.COLOURS)
    path = directory / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            fg, bg = colours[i % len(colours)], colours[(i + 1) % len(colours)]
            buffer = io.BytesIO()
            tiny.shape_image(fg, bg).save(buffer, format="JPEG", quality=95)
            question = "What colour is the square?"
            sink.write({"__key__": f"{i:06d}", "jpg": buffer.getvalue(), "txt": f"{question} {fg}",
                        "json": {"question": question, "answers": json.dumps([fg] * 9 + [bg])}})
    return [str(path)]


def test_vqa_files_become_a_url_list_with_questions_and_answers(tmp_path):
    data = vqa_dir(tmp_path / "vqa")
    out = tmp_path / "list.parquet"
    rows = write_vqa_url_list(VqaSource(data / "v2_OpenEnded_mscoco_val2014_questions.json",
                                        data / "v2_mscoco_val2014_annotations.json", data / "val2014"), out)
    frame = pd.read_parquet(out)
    assert rows == len(frame) == 4
    first = frame.iloc[0]
    answers = json.loads(first["answers"])
    assert len(answers) == 10 and Path(first["url"]).is_file()
    assert first["caption"] == f"{first['question']} {max(answers, key=answers.count)}"


def test_vqa_download_flags_are_checked(tmp_path):
    with pytest.raises(Blip2Error, match="also needs --images"):
        download_pretrain("vqa", None, tmp_path / "out", vqa=VqaSource(tmp_path / "q.json", tmp_path / "a.json", None))
    with pytest.raises(Blip2Error, match="takes --questions"):
        download_pretrain("vqa", tmp_path / "list.csv", tmp_path / "out")
    with pytest.raises(Blip2Error, match="cc3m needs --url-list"):
        download_pretrain("cc3m", None, tmp_path / "out")


def test_question_is_the_masked_prompt_and_the_answer_the_target(tmp_path):
    """Stage-2 labels cover the answer and the end token only; the question reaches the LLM through the VQA
    template the checkpoint records; captions in the same batch keep their own layout."""
    shards = _qa_shards(tmp_path / "qa")
    recipe = load_recipe("tiny_stage2_opt", ["eval.prompt_template=q: {} a:", "data.shuffle_buffer=0",
                                              "data.micro_batch_size=4", "data.global_batch_size=4"])
    built = build_model(recipe, corpus=tiny.CAPTIONS + ["what colour is the square red green blue"])
    loader = make_train_loader(shards, micro_batch_size=4, image_size=32, shuffle_buffer=0)
    batch = next(iter(loader))
    assert batch["question"] == ["what colour is the square?"] * 4  # normalised as eval does (LAVIS keeps "?")
    assert all(t in tiny.COLOURS for t in batch["text"])
    batch = {**batch, "question": [*batch["question"][:3], None], "text": [*batch["text"][:3], "a red square"]}
    inputs = TextBatcher(recipe, built)(batch, step=0, device=torch.device("cpu"))
    tokenizer = built.llm_tokenizer
    for row in range(4):
        labels = inputs["labels"][row]
        target = tokenizer.decode(labels[labels != IGNORE_INDEX])
        seen = tokenizer.decode(inputs["input_ids"][row][inputs["attention_mask"][row].bool()],
                                skip_special_tokens=True)
        if row < 3:
            assert target == f" {batch['text'][row]}\n"  # the answer and OPT's end token, nothing of the question
            assert seen == f"q: what colour is the square? a: {batch['text'][row]}\n"
        else:
            assert target == "a red square\n" and seen == "a red square\n"


def test_stage2_trains_on_question_answer_shards(tmp_path):
    shards = _qa_shards(tmp_path / "qa")
    recipe = load_recipe("tiny_stage2_opt", ["train.max_steps=2", "optim.warmup_steps=0", "data.shuffle_buffer=4",
                                              "train.log_every=1"])
    result = train(recipe, tmp_path / "run", shards, device="cpu")
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)


@pytest.mark.slow
def test_vqa_files_download_into_shards_training_reads(tmp_path):
    data = vqa_dir(tmp_path / "vqa")
    out = tmp_path / "shards"
    summary = download_pretrain("vqa", None, out, image_size=32, threads=2, shard_size=10, quiet=True,
                                vqa=VqaSource(data / "v2_OpenEnded_mscoco_val2014_questions.json",
                                              data / "v2_mscoco_val2014_annotations.json", data / "val2014"))
    assert (summary.successes, summary.failed) == (4, 0)
    batch = next(iter(make_train_loader(str(out), micro_batch_size=4, image_size=32, shuffle_buffer=0)))
    assert all(q for q in batch["question"]) and all(batch["text"])
