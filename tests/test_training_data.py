"""Training data pipeline: transforms, shard lists, CapFilt captions, skips, ranks, mixtures, resume."""

from __future__ import annotations

import io
import json
import random
import time

import pytest
import torch
import webdataset as wds
from PIL import Image

from blip2cli.data.training import (
    SampleDecoder,
    SkipCounter,
    choose_caption,
    expand_shards,
    image_transform,
    make_eval_loader,
    make_train_loader,
    read_captions,
)
from blip2cli.errors import Blip2Error
from blip2cli.models.config import CLIP_MEAN, CLIP_STD


def _jpeg(seed: int, size=(32, 32)) -> bytes:
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _write_shard(path, prefix: str, n: int, start: int = 0, capfilt: bool = False, bad: dict | None = None):
    """n good samples keyed f"{prefix}{i}"; `bad` adds {"corrupt"|"nocap"|"noimg": count} samples."""
    with wds.TarWriter(str(path)) as w:
        for i in range(start, start + n):
            sample = {"__key__": f"{prefix}{i:04d}", "jpg": _jpeg(i), "txt": f"A photo of {prefix} number {i}."}
            if capfilt:
                sample["json"] = {"captions": [f"best {i}", f"second {i}", f"third {i}"]}
            w.write(sample)
        for kind, count in (bad or {}).items():
            for j in range(count):
                key = f"{prefix}{kind}{j}"
                if kind == "corrupt":
                    w.write({"__key__": key, "jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": "corrupt"})
                elif kind == "nocap":
                    w.write({"__key__": key, "jpg": _jpeg(j), "json": {"url": "x"}})
                elif kind == "noimg":
                    w.write({"__key__": key, "txt": "no image here"})
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    a = [_write_shard(d / f"a-{s:05d}.tar", f"a{s}_", 6, start=s * 6) for s in range(4)]
    b = [_write_shard(d / f"b-{s:05d}.tar", f"b{s}_", 6) for s in range(2)]
    return {"dir": d, "a": a, "b": b}


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _keys(batches):
    return [k for b in batches for k in b["key"]]


# ----------------------------------------------------------------- transforms
def test_eval_transform_is_square_resize_normalised():
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    x = image_transform(24, train=False)(img)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    expected = torch.tensor([(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]])
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-2)  # no crop: a uniform image stays uniform
    # left half red, right half blue: a square resize squeezes the 2:1 image, keeping both halves side
    # by side (a shortest-side resize + center crop would cut away half of each colour)
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))
    x = image_transform(16, train=False, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert x[0, :, :7].min() > 0.9 and x[2, :, 9:].min() > 0.9


def test_train_transform_shape_and_randomness():
    img = Image.frombytes("RGB", (48, 40), bytes(random.Random(0).randbytes(48 * 40 * 3)))
    t = image_transform(32, train=True, rrc_scale=(0.5, 1.0))
    torch.manual_seed(0)
    a, b = t(img), t(img)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)
    names = [type(s).__name__ for s in t.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert "RandomHorizontalFlip" not in [type(s).__name__ for s in image_transform(32, True, hflip=False).transforms]


# ----------------------------------------------------------------- shard lists
def test_expand_shards(shards, tmp_path):
    d = shards["dir"]
    assert expand_shards(str(d / "a-{00000..00003}.tar")) == shards["a"]
    assert expand_shards(str(d)) == sorted(shards["a"] + shards["b"])
    assert expand_shards([shards["a"][0], "https://host/x-{0..2}.tar"]) == [
        shards["a"][0], "https://host/x-0.tar", "https://host/x-1.tar", "https://host/x-2.tar"]
    assert expand_shards("pipe:curl -s http://h/{0..1}.tar") == ["pipe:curl -s http://h/0.tar", "pipe:curl -s http://h/1.tar"]
    with pytest.raises(Blip2Error, match="shard not found") as e:
        expand_shards(str(d / "a-{00000..00009}.tar"))
    assert "\n" not in str(e.value)
    with pytest.raises(Blip2Error, match="no .tar shards"):
        expand_shards(str(tmp_path))


# ----------------------------------------------------------------- captions
def test_capfilt_caption_is_one_of_top_k():
    rng = random.Random(0)
    meta = {"captions": ["first", "second", "third"]}
    seen = [choose_caption(meta, "web", 2, rng) for _ in range(200)]
    assert set(seen) == {"first", "second"}
    assert choose_caption(meta, "web", 2, None) == "first"
    assert choose_caption({"url": "u"}, "web", 2, rng) == "web"
    assert choose_caption({"captions": []}, None, 2, rng) is None


def test_decoder_normalises_and_counts():
    dec = SampleDecoder(image_transform(16, False), captions_top_k=2, max_words=3)
    counter = SkipCounter()
    x, text, question = dec({"__key__": "k", "jpg": _jpeg(1), "txt": b"A (Big) dog: runs far."}, random.Random(0), counter)
    assert x.shape == (3, 16, 16) and text == "a big dog" and question is None
    assert dec({"__key__": "k", "jpg": b"junk", "txt": b"x"}, random.Random(0), counter) is None
    assert dec({"__key__": "k", "txt": b"x"}, random.Random(0), counter) is None
    assert dec({"__key__": "k", "png": _jpeg(1), "json": b"{bad json"}, random.Random(0), counter) is None
    assert counter.counts == {"bad_image": 1, "no_image": 1, "no_caption": 1}


def test_question_answer_samples_carry_their_question():
    """A VQA sample (blip2 download pretrain vqa) yields its answer as the text and its question apart; answers
    are drawn by frequency in training, the most frequent one in eval."""
    dec = SampleDecoder(image_transform(16, False), max_words=10)
    meta = {"question": "What colour is it?", "answers": ["red", "red", "red", "dark red"]}
    raw = {"__key__": "k", "jpg": _jpeg(1), "txt": b"what colour is it red", "json": json.dumps(meta).encode()}
    _, text, question = dec(raw, None, SkipCounter())
    assert (text, question) == ("red", "what colour is it?")  # LAVIS blip_question keeps "?"
    drawn = [dec(raw, random.Random(seed), SkipCounter())[1] for seed in range(200)]
    assert set(drawn) == {"red", "dark red"} and 0.6 < drawn.count("red") / 200 < 0.9
    no_answers = {**raw, "json": json.dumps({"question": "q?", "answers": []}).encode()}
    assert dec(no_answers, None, SkipCounter())[1:] == ("what colour is it red", None)  # falls back to the caption


# ----------------------------------------------------------------- skips
@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    d = tmp_path_factory.mktemp("dirty")
    good = _write_shard(d / "00000.tar", "g", 8, bad={"corrupt": 1, "nocap": 1, "noimg": 1})
    good2 = _write_shard(d / "00001.tar", "h", 8)
    full = (d / "00001.tar").read_bytes()
    (d / "00002.tar").write_bytes(full[: len(full) // 2 + 100])  # truncated mid-way
    (d / "00003.tar").write_bytes(b"this is not a tar file at all" * 20)
    return {"dir": d, "good": [good, good2]}


def test_eval_loader_skips_and_counts_bad_samples(dirty):
    batches = list(make_eval_loader(str(dirty["dir"]), batch_size=5, image_size=16))
    keys = _keys(batches)
    skipped = SkipCounter()
    for b in batches:
        skipped.update(b["skipped"])
    assert [b["pixel_values"].shape[0] for b in batches][:-1] == [5] * (len(batches) - 1)
    good = [f"g{i:04d}" for i in range(8)] + [f"h{i:04d}" for i in range(8)]
    assert keys[:16] == good  # in order; then what survived of the truncated copy of shard 00001
    assert set(keys[16:]) <= {f"h{i:04d}" for i in range(8)} and len(keys) > 16
    assert skipped.counts["bad_image"] == 1 and skipped.counts["no_image"] == 1
    assert skipped.counts["bad_shard"] == 2
    assert skipped.counts["no_caption"] >= 1  # plus possibly the torn last sample of the truncated shard
    # eval is deterministic and the texts are normalised web captions
    again = list(make_eval_loader(str(dirty["dir"]), batch_size=5, image_size=16))
    assert _keys(again) == keys and batches[0]["text"][0] == "a photo of g number 0"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_skips_bad_samples_and_shards(dirty, num_workers):
    loader = make_train_loader(str(dirty["dir"]), micro_batch_size=4, image_size=16, num_workers=num_workers,
                               shuffle_buffer=8, seed=1, timeout=60)
    start = time.monotonic()
    batches = _take(loader, 30)
    assert time.monotonic() - start < 60
    assert all(b["pixel_values"].shape == (4, 3, 16, 16) for b in batches)
    assert all(len(b["text"]) == 4 for b in batches)
    keys = set(_keys(batches))
    assert {f"g{i:04d}" for i in range(8)} <= keys and {f"h{i:04d}" for i in range(8)} <= keys
    assert not any(k.startswith(("gcorrupt", "gnocap", "gnoimg")) for k in keys)
    # the counts arrive in the main process through the batches' deltas, even from worker processes
    totals = SkipCounter()
    for b in batches:
        totals.update(b["skipped"])
    assert totals.counts == loader.skipped.counts
    for reason in ("bad_image", "no_image", "no_caption", "bad_shard"):
        assert loader.skipped.counts.get(reason, 0) > 0, loader.skipped.counts


def test_unreadable_dataset_raises_instead_of_hanging(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"garbage" * 10)
    loader = make_train_loader(str(tmp_path / "x.tar"), micro_batch_size=2, image_size=16, shuffle_buffer=0)
    with pytest.raises(Blip2Error, match="no readable samples"):
        next(iter(loader))


# ----------------------------------------------------------------- ranks, mixtures, determinism
def test_ranks_get_different_samples(shards):
    spec = str(shards["dir"] / "a-{00000..00003}.tar")
    r0 = _take(make_train_loader(spec, micro_batch_size=4, image_size=16, rank=0, world_size=2, seed=3), 6)
    r1 = _take(make_train_loader(spec, micro_batch_size=4, image_size=16, rank=1, world_size=2, seed=3), 6)
    assert all(b["pixel_values"].shape[0] == 4 for b in r0 + r1)
    assert not set(_keys(r0)) & set(_keys(r1))  # 4 shards over 2 ranks: disjoint halves


def test_weighted_mixture(shards):
    specs = [str(shards["dir"] / "a-{00000..00003}.tar"), str(shards["dir"] / "b-{00000..00001}.tar")]
    only_a = _keys(_take(make_train_loader(specs, [1, 0], micro_batch_size=4, image_size=16), 10))
    assert all(k.startswith("a") for k in only_a)
    both = _keys(_take(make_train_loader(specs, [1, 1], micro_batch_size=4, image_size=16, seed=5), 10))
    assert any(k.startswith("a") for k in both) and any(k.startswith("b") for k in both)
    with pytest.raises(Blip2Error, match="weights"):
        make_train_loader(specs, [1], micro_batch_size=4, image_size=16)


def test_capfilt_captions_in_stream(tmp_path):
    path = _write_shard(tmp_path / "c.tar", "c", 4, capfilt=True)
    texts = [t for b in _take(make_train_loader(path, micro_batch_size=4, image_size=16, shuffle_buffer=0), 25)
             for t in b["text"]]
    assert {t.split()[0] for t in texts} == {"best", "second"}


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["text"] == y["text"]
        assert torch.equal(x["pixel_values"], y["pixel_values"])


def test_determinism_and_seed(shards):
    spec = str(shards["dir"])
    kw = dict(micro_batch_size=4, image_size=16, shuffle_buffer=10)
    _same(_take(make_train_loader(spec, seed=7, **kw), 5), _take(make_train_loader(spec, seed=7, **kw), 5))
    other = _take(make_train_loader(spec, seed=8, **kw), 5)
    assert _keys(other) != _keys(_take(make_train_loader(spec, seed=7, **kw), 5))


# ----------------------------------------------------------------- resume
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reproduces_the_stream(dirty, num_workers):
    kw = dict(micro_batch_size=3, image_size=16, shuffle_buffer=6, seed=11, num_workers=num_workers, timeout=60)
    spec = str(dirty["dir"])  # with bad samples and shards, so the replay must skip exactly as the run did
    full = _take(make_train_loader(spec, **kw), 9)
    k = 5
    _same(_take(make_train_loader(spec, skip_batches=k, **kw), 4), full[k:])
    # decode-free resume from the state of a run interrupted after k batches
    interrupted = make_train_loader(spec, **kw)
    _take(interrupted, k)
    state = interrupted.state_dict()
    resumed = make_train_loader(spec, resume_state=state, **kw)
    _same(_take(resumed, 4), full[k:])
    assert resumed.state_dict()["batches"] == 9
    # reseeding is O(1) and yields full batches, but a different stream
    fresh = _take(make_train_loader(spec, skip_batches=k, reseed=True, **kw), 4)
    assert all(b["pixel_values"].shape[0] == 3 for b in fresh)


def test_resume_state_layout_must_match(shards):
    loader = make_train_loader(str(shards["dir"]), micro_batch_size=2, image_size=16)
    _take(loader, 2)
    with pytest.raises(Blip2Error, match="num_workers"):
        make_train_loader(str(shards["dir"]), micro_batch_size=2, image_size=16, num_workers=2,
                          resume_state=loader.state_dict())


def test_epoch_samples_continue_the_stream(shards):
    kw = dict(micro_batch_size=4, image_size=16, seed=2)
    loader = make_train_loader(str(shards["dir"]), epoch_samples=12, **kw)
    assert len(loader) == 3
    first, second = list(loader), list(loader)
    _same(first + second, _take(make_train_loader(str(shards["dir"]), **kw), 6))


def test_read_captions(shards, tmp_path):
    caps = read_captions([shards["a"][0]], limit=4)
    assert caps == [f"a photo of a0_ number {i}" for i in range(4)]
    path = _write_shard(tmp_path / "c.tar", "c", 1, capfilt=True)
    assert read_captions(path) == ["best 0", "second 0", "third 0", "a photo of c number 0"]
