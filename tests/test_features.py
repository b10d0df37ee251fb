"""`blip2 embed`, `blip2 match`, `blip2 search`: embeddings equal transformers' Blip2ForImageTextRetrieval on
the same weights, indexes resume shard by shard, and search finds each caption's image (and each image's
caption) first in a tiny trained world."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Blip2ForImageTextRetrieval
from typer.testing import CliRunner

from blip2cli.checkpoint import load_model, save_model
from blip2cli.cli import app
from blip2cli.errors import Blip2Error
from blip2cli.inference.features import FeatureExtractor, build_index, load_index, search
from blip2cli.inference.inputs import collect_images
from blip2cli.models import Blip2ModelConfig, Blip2Stage1Model, Stage1LossConfig
from tests import tiny

N = 5
CAPTIONS = tiny.CAPTIONS[:N]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A stage-1 model trained (ITC + ITM, 60 steps, ~1 s) on five random pictures with a caption each,
    saved as a transformers-format checkpoint, and the pictures in a folder."""
    root = tmp_path_factory.mktemp("world")
    tok = tiny.bert_tokenizer()
    config = Blip2ModelConfig(
        vision={"kind": "eva", "config": tiny.vision_config(initializer_range=0.02).to_dict()},
        qformer=tiny.qformer_config(vocab_size=len(tok), hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0).to_dict(),
        num_query_tokens=tiny.NUM_QUERY_TOKENS, image_text_hidden_size=16, image_size=tiny.IMAGE_SIZE, stage=1,
    )
    torch.manual_seed(0)
    model = Blip2Stage1Model.from_config(config, Stage1LossConfig(itg_weight=0.0), dec_token_id=tok.bos_token_id,
                                         pad_token_id=tok.pad_token_id)
    images = tiny.random_images(N, seed=0)
    pixels = tiny.image_processor()(images, return_tensors="pt").pixel_values
    text = tok(CAPTIONS, padding="longest", return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.05)
    model.train()
    for _ in range(60):
        loss = model(pixels, text.input_ids, text.attention_mask)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    checkpoint = save_model(model, root / "stage1", tokenizer=tok, image_processor=tiny.image_processor())
    photos = root / "photos"
    photos.mkdir()
    for i, image in enumerate(images):
        image.save(photos / f"{i}.png")
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return {"model": checkpoint, "photos": photos, "captions": root / "captions.txt", "root": root}


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_embeddings_and_scores_equal_transformers_retrieval(world, tmp_path):
    hf, info = Blip2ForImageTextRetrieval.from_pretrained(world["model"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    _invoke("embed", world["photos"], "--out", tmp_path / "images", "--model", world["model"], "--workers", 0,
            "--batch-size", 2)
    _invoke("embed", "--texts", world["captions"], "--out", tmp_path / "texts", "--model", world["model"])
    image_info, image_embeds, image_items = load_index(tmp_path / "images")
    text_info, text_embeds, text_items = load_index(tmp_path / "texts")
    assert (image_info.kind, image_info.tensor, image_info.shape) == ("image", "image_embeds_proj", [tiny.NUM_QUERY_TOKENS, 16])
    assert [it["image"] for it in image_items] == [str(world["photos"] / f"{i}.png") for i in range(N)]
    assert [it["text"] for it in text_items] == CAPTIONS

    extractor = FeatureExtractor(load_model(world["model"]))
    pixels = extractor.pixel_values([r.load() for r in collect_images([str(world["photos"] / f"{i}.png") for i in range(N)])])
    ids, mask = extractor.tokenize(CAPTIONS)
    with torch.no_grad():
        itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    torch.testing.assert_close(image_embeds, itc.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_embeds, itc.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(extractor.model.itc_similarity(image_embeds, text_embeds), itc.logits_per_image,
                               atol=1e-5, rtol=0)
    assert torch.norm(image_embeds, dim=-1).sub(1).abs().max() < 1e-5  # normalised

    # match: per image, ITM probability and ITC similarity against every caption, as transformers has them
    # (transformers' ITM pairs image i with text i, so compare the diagonal per image)
    probs = itm.logits_per_image.softmax(-1)[:, 1]
    for i, picture in enumerate(collect_images([str(world["photos"] / f"{i}.png") for i in range(N)])):
        rows = extractor.match(picture.load(), CAPTIONS)
        assert abs(rows[i]["itm"] - probs[i].item()) < 1e-5
        assert abs(rows[i]["itm_logit"] - itm.logits_per_image[i, 1].item()) < 1e-5
        assert max(abs(r["itc"] - itc.logits_per_image[i, j].item()) for j, r in enumerate(rows)) < 1e-5

    # multimodal: the joint pass's query outputs; transformers' ITM head over them gives its ITM logits
    mm = extractor.multimodal(pixels, CAPTIONS)
    assert mm.shape == (N, tiny.NUM_QUERY_TOKENS, 32)
    torch.testing.assert_close(hf.itm_head(mm).mean(1), itm.logits_per_image, atol=1e-5, rtol=0)
    pairs = world["root"] / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": f"photos/{i}.png", "text": c}) + "\n" for i, c in enumerate(CAPTIONS)))
    _invoke("embed", "--pairs", pairs, "--out", tmp_path / "mm", "--model", world["model"], "--workers", 0)
    torch.testing.assert_close(load_index(tmp_path / "mm")[1], mm, atol=1e-5, rtol=0)


def test_search_finds_the_matching_caption_and_image_first(world, tmp_path):
    _invoke("embed", "--texts", world["captions"], "--out", tmp_path / "texts", "--model", world["model"])
    result = _invoke("embed", world["photos"], "--out", tmp_path / "images", "--model", world["model"], "--workers", 0)
    assert "5 image embeddings" in result.stderr and "1 unreadable skipped" in result.stderr
    for i, caption in enumerate(CAPTIONS):
        out = _invoke("search", tmp_path / "texts", "--image", world["photos"] / f"{i}.png", "--top-k", 3, "--json")
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["text"] == caption
        assert rows[0]["itc"] >= rows[1]["itc"] >= rows[2]["itc"]
        out = _invoke("search", tmp_path / "images", caption, "--top-k", 2, "--json")
        assert json.loads(out.stdout.splitlines()[0])["image"] == str(world["photos"] / f"{i}.png")

    # ITM re-ranking: score = ITM "match" logit + ITC, the same numbers `match` gives, best first
    extractor = FeatureExtractor(load_model(world["model"]))
    picture = collect_images([str(world["photos"] / "0.png")])[0].load()
    reranked = search(extractor, tmp_path / "texts", image=picture, top_k=N, rerank=N)
    by_text = {r["text"]: r for r in extractor.match(picture, CAPTIONS)}
    for row in reranked:
        expected = by_text[row["text"]]
        assert abs(row["score"] - (expected["itm_logit"] + expected["itc"])) < 1e-5
        assert abs(row["itm"] - expected["itm"]) < 1e-5
    assert [r["score"] for r in reranked] == sorted((r["score"] for r in reranked), reverse=True)
    images = search(extractor, tmp_path / "images", text=CAPTIONS[1], top_k=2, rerank=3)
    assert len(images) == 2 and all("score" in r for r in images)
    table = _invoke("search", tmp_path / "images", CAPTIONS[1], "--rerank", 3).stdout
    assert "score" in table and "itm" in table and "rank" in table


def test_index_resumes_shard_by_shard(world, tmp_path):
    extractor = FeatureExtractor(load_model(world["model"]))
    refs = collect_images([str(world["photos"])])
    full = build_index(extractor, "image", refs, tmp_path / "full", shard_size=2, show_progress=False)
    assert (full.embedded, full.reused, len(full.failed)) == (5, 0, 1)
    first = build_index(extractor, "image", refs, tmp_path / "idx", shard_size=2, batch_size=1, fmt="numpy",
                        show_progress=False, stop_after_shards=1)
    assert first.embedded == 2 and len(load_index(tmp_path / "idx")[2]) == 2
    rest = build_index(extractor, "image", refs, tmp_path / "idx", shard_size=2, fmt="numpy", show_progress=False)
    assert (rest.embedded, rest.reused) == (3, 2)
    info, embeds, items = load_index(tmp_path / "idx")
    assert [s["count"] for s in info.shards] == [2, 2, 1] and (tmp_path / "idx" / "embeds-00000.npy").exists()
    _, expected, expected_items = load_index(tmp_path / "full")
    assert items == expected_items
    torch.testing.assert_close(embeds, expected, atol=1e-6, rtol=0)
    again = build_index(extractor, "image", refs, tmp_path / "idx", shard_size=2, fmt="numpy", show_progress=False)
    assert (again.embedded, again.reused) == (0, 5)
    with pytest.raises(Blip2Error, match="another format"):
        build_index(extractor, "image", refs, tmp_path / "idx", shard_size=2, show_progress=False)


def test_match_command_and_stage2_limits(world, hf_opt_dir, tmp_path):
    out = _invoke("match", world["photos"] / "2.png", CAPTIONS[2], CAPTIONS[0], "--model", world["model"], "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in rows] == [CAPTIONS[2], CAPTIONS[0]] and all(0 <= r["itm"] <= 1 for r in rows)
    assert rows[0]["itc"] > rows[1]["itc"]
    # a stage-2 checkpoint: query-output image embeddings (B, NQ, H), and a one-line error for text
    stage2 = FeatureExtractor(load_model(hf_opt_dir))
    result = build_index(stage2, "image", collect_images([str(world["photos"] / "0.png")]), tmp_path / "s2",
                         show_progress=False)
    info, embeds, _ = load_index(tmp_path / "s2")
    assert result.embedded == 1 and info.tensor == "image_embeds" and embeds.shape == (1, tiny.NUM_QUERY_TOKENS, 32)
    with pytest.raises(Blip2Error, match="need a stage-1"):
        build_index(stage2, "text", CAPTIONS, tmp_path / "s2t", show_progress=False)
    with pytest.raises(Blip2Error, match="search an image index with text"):
        search(FeatureExtractor(load_model(world["model"])), tmp_path / "s2", image=tiny.random_images(1)[0])
