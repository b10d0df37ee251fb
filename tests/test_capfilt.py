"""`blip2 capfilt` with a tiny random transformers BLIP captioner and a tiny open_clip ranker (offline, CPU).

The models are real (random weights, saved and loaded the way a user's local checkpoints would be);
where the test needs to know which caption must win, a ranker with a known preference replaces CLIP.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blip2cli.data.capfilt import (
    BlipCaptioner,
    CapfiltSettings,
    ClipRanker,
    assign_shards,
    distinct_candidates,
    rank_candidates,
    read_samples,
    run_capfilt,
)
from blip2cli.data.training import choose_caption
from blip2cli.distributed import launch_rank_and_world
from blip2cli.errors import Blip2Error
from tests import tiny

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


# ----------------------------------------------------------------------------- tiny artifacts
@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    """A tiny BlipForConditionalGeneration + BlipProcessor saved like a hub checkpoint."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor, BlipTextConfig, BlipVisionConfig

    directory = tmp_path_factory.mktemp("tiny-blip")
    tok = tiny.bert_tokenizer()  # BERT WordPiece with bos "[DEC]", as BLIP's
    text = BlipTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, encoder_hidden_size=32, bos_token_id=tok.bos_token_id,
        sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=tiny.IMAGE_SIZE, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=16)).eval()
    model.save_pretrained(directory)
    BlipProcessor(image_processor=tiny.image_processor(), tokenizer=tok).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> tuple[Path, Path]:
    """(model-config json, safetensors weights) of a tiny open_clip CLIP."""
    import open_clip
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("tiny-clip")
    config = directory / "tiny-capfilt-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-capfilt-clip", pretrained=None)
    weights = directory / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


@pytest.fixture(scope="module")
def settings(blip_dir, clip_files) -> CapfiltSettings:
    config, weights = clip_files
    return CapfiltSettings(captioner=str(blip_dir), clip_model=str(config), clip_pretrained=str(weights),
                           num_captions=4, batch_size=3, min_length=4, max_length=12)


@pytest.fixture(scope="module")
def models(settings):
    return BlipCaptioner(settings), ClipRanker(settings.clip_model, settings.clip_pretrained)


def _shards(directory: Path, n: int = 2, per_shard: int = 4, corrupt: int = 0) -> list[str]:
    return tiny.write_shards(directory, num_shards=n, per_shard=per_shard, corrupt=corrupt)


def _samples(path) -> dict[str, dict[str, bytes]]:
    return {key: {info.name.split(".", 1)[1]: data for info, data in members} for key, members in read_samples(path)}


class PreferenceRanker:
    """Scores a caption by a rule the test controls (no CLIP): ``prefer(text) -> float``."""

    def __init__(self, prefer):
        self.prefer = prefer
        self.calls = 0

    def score(self, images, texts):
        self.calls += 1
        assert len(images) == len(texts)
        return [[self.prefer(t) for t in group] for group in texts]


class FailingCaptioner:
    """The real tiny captioner that raises (a simulated kill) on its ``fail_at``-th call."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        return self.inner(images)


# ----------------------------------------------------------------------------- ranking (pure)
def test_rank_candidates_sorted_deduplicated_and_web_caption_kept():
    cands = distinct_candidates("A dog  on grass", ["a dog on grass", "a cat", "", "  ", "A Cat", "a bird"])
    assert cands == [("A dog on grass", "web"), ("a cat", "blip"), ("a bird", "blip")]
    fields, ranked = rank_candidates(cands, [0.1, 0.3, 0.2], "A dog  on grass", top_k=2)
    assert fields["captions"] == ["a cat", "a bird"]
    assert fields["clip_scores"] == [0.3, 0.2]
    assert fields["original_caption"] == "A dog  on grass" and fields["original_clip_score"] == 0.1
    assert [c["source"] for c in ranked] == ["blip", "blip", "web"]
    # A tie goes to the earlier candidate, i.e. the web caption.
    fields, _ = rank_candidates(cands, [0.5, 0.5, 0.1], "A dog on grass", top_k=2)
    assert fields["captions"] == ["A dog on grass", "a cat"]
    with pytest.raises(ValueError):
        rank_candidates(cands, [0.1], None, 2)


# ----------------------------------------------------------------------------- end to end
def test_capfilt_tiny_models_every_key_top2_sorted_and_scores_are_clip(tmp_path, settings, models, clip_files):
    import open_clip
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import load_file

    shards = _shards(tmp_path / "in", n=2, per_shard=4, corrupt=1)
    summary = run_capfilt(shards, tmp_path / "out", settings, progress=False)  # builds both models from paths
    assert (summary.written, summary.samples, summary.captioned, summary.corrupt) == (2, 10, 8, 2)

    # Independent recomputation of CLIP cosine similarities with open_clip itself.
    config, weights = clip_files
    clip, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=None)
    clip.load_state_dict(load_file(str(weights)))
    clip.eval()
    tokenizer = open_clip.get_tokenizer(config.stem)

    for shard in shards:
        src, out = _samples(shard), _samples(tmp_path / "out" / Path(shard).name)
        good = {k for k, m in src.items() if m["jpg"] != b"not a jpeg"}
        assert set(out) == good and len(good) == 4  # every good key, corrupt ones left out
        for key in good:
            assert out[key]["jpg"] == src[key]["jpg"] and out[key]["txt"] == src[key]["txt"]
            meta = json.loads(out[key]["json"])
            assert meta["caption"] == src[key]["txt"].decode()  # original json keys kept
            assert meta["original_caption"] == src[key]["txt"].decode()
            assert len(meta["captions"]) == 2 and meta["captions"][0] != meta["captions"][1]
            assert meta["clip_scores"] == sorted(meta["clip_scores"], reverse=True)
            assert not any(c.startswith("a picture of") for c in meta["captions"])  # prompt cut
            image = preprocess(Image.open(io.BytesIO(src[key]["jpg"])).convert("RGB"))[None]
            texts = meta["captions"] + [meta["original_caption"]]
            with torch.no_grad():
                sims = (F.normalize(clip.encode_text(tokenizer(texts)), dim=-1)
                        @ F.normalize(clip.encode_image(image), dim=-1)[0]).tolist()
            assert meta["clip_scores"] == pytest.approx(sims[:2], abs=1e-5)
            assert meta["original_clip_score"] == pytest.approx(sims[2], abs=1e-5)
            if meta["original_caption"] not in meta["captions"]:  # ranked below the kept two
                assert meta["original_clip_score"] <= meta["clip_scores"][1]
            # The training reader picks the best caption in evaluation mode.
            assert choose_caption(meta, "web", 2, None) == meta["captions"][0]
        side = json.loads((tmp_path / "out" / f"{Path(shard).stem}_capfilt.json").read_text())
        assert side["corrupt"] == 1 and side["written"] == 4 and side["settings"]["num_captions"] == 4


def test_ranking_follows_the_ranker_preference(tmp_path, settings, models):
    captioner, _ = models
    shards = _shards(tmp_path / "in", n=1, per_shard=3)
    s = CapfiltSettings(**{**settings.__dict__, "keep_candidates": True})
    shortest = PreferenceRanker(lambda t: -float(len(t)))
    run_capfilt(shards, tmp_path / "short", s, captioner=captioner, ranker=shortest, progress=False)
    for key, m in _samples(tmp_path / "short" / "00000.tar").items():
        meta = json.loads(m["json"])
        cands = meta["capfilt_candidates"]
        assert {c["source"] for c in cands} == {"web", "blip"} and len(cands) >= 3
        by_pref = sorted((c["caption"] for c in cands), key=len)
        assert meta["captions"] == by_pref[:2]
        assert meta["clip_scores"] == [-float(len(c)) for c in meta["captions"]]

    # A ranker that likes the web caption ("... square ...") puts it first.
    likes_web = PreferenceRanker(lambda t: 1.0 if "square" in t else 0.0)
    run_capfilt(shards, tmp_path / "web", s, captioner=captioner, ranker=likes_web, progress=False)
    for key, m in _samples(tmp_path / "web" / "00000.tar").items():
        meta = json.loads(m["json"])
        assert meta["captions"][0] == m["txt"].decode() == meta["original_caption"]
        assert meta["clip_scores"][0] == 1.0 == meta["original_clip_score"]


def test_kill_mid_shard_leaves_no_partial_tar_and_rerun_skips_finished(tmp_path, settings, models):
    captioner, ranker = models
    shards = _shards(tmp_path / "in", n=3, per_shard=4)
    out = tmp_path / "out"
    s = CapfiltSettings(**{**settings.__dict__, "batch_size": 2})  # 2 captioner calls per shard
    dying = FailingCaptioner(captioner, fail_at=4)  # the 2nd batch of shard 00001: mid-shard
    with pytest.raises(KeyboardInterrupt):
        run_capfilt(shards, out, s, captioner=dying, ranker=ranker, progress=False)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["00000.tar", "00000_capfilt.json"]
    before = (out / "00000.tar").stat()

    rerun = FailingCaptioner(captioner, fail_at=-1)
    summary = run_capfilt(shards, out, s, captioner=rerun, ranker=ranker, progress=False)
    assert (summary.assigned, summary.skipped, summary.written) == (3, 1, 2)
    assert summary.folder == {"shards": 3, "samples": 12, "written": 12, "corrupt": 0, "no_image": 0,
                              "too_large": 0}
    assert rerun.calls == 4  # only the two unfinished shards were captioned
    after = (out / "00000.tar").stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(out.glob("*.part"))
    for shard in shards:
        assert set(_samples(out / Path(shard).name)) == set(_samples(shard))

    # Nothing left: no model call at all.
    idle = FailingCaptioner(captioner, fail_at=1)
    assert run_capfilt(shards, out, s, captioner=idle, ranker=ranker, progress=False).skipped == 3


def test_same_seed_same_captions(tmp_path, settings, models):
    captioner, ranker = models
    shards = _shards(tmp_path / "in", n=1, per_shard=3)
    run_capfilt(shards, tmp_path / "a", settings, captioner=captioner, ranker=ranker, progress=False)
    run_capfilt(shards, tmp_path / "b", settings, captioner=captioner, ranker=ranker, progress=False)
    other = CapfiltSettings(**{**settings.__dict__, "seed": 7})
    run_capfilt(shards, tmp_path / "c", other, captioner=captioner, ranker=ranker, progress=False)
    a, b, c = (_samples(tmp_path / d / "00000.tar") for d in "abc")
    caps = {name: [json.loads(m["json"])["captions"] for m in x.values()] for name, x in zip("abc", (a, b, c))}
    assert caps["a"] == caps["b"]
    assert caps["a"] != caps["c"]


# ----------------------------------------------------------------------------- ranks
def test_rank_splitting_env_and_explicit(tmp_path, monkeypatch, settings, models):
    names = [f"/x/{i:05d}.tar" for i in range(7)]
    parts = [assign_shards(list(reversed(names)), r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == names and parts[1] == ["/x/00001.tar", "/x/00004.tar"]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_rank_and_world() == (1, 2)
    assert launch_rank_and_world(0, 4) == (0, 4)
    with pytest.raises(Blip2Error, match="rank 2 is not in"):
        launch_rank_and_world(2, 2)

    captioner, ranker = models
    shards = _shards(tmp_path / "in", n=4, per_shard=2)
    out = tmp_path / "out"
    first = run_capfilt(shards, out, settings, captioner=captioner, ranker=ranker, progress=False)  # env: rank 1 of 2
    assert (first.rank, first.world_size, first.written) == (1, 2, 2)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00001.tar", "00003.tar"]
    second = run_capfilt(shards, out, settings, captioner=captioner, ranker=ranker, rank=0, progress=False)
    assert second.written == 2
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]


# ----------------------------------------------------------------------------- errors and CLI
def test_unreadable_shard_is_reported_and_not_written(tmp_path, settings, models):
    captioner, ranker = models
    shards = _shards(tmp_path / "in", n=1, per_shard=2)
    bad = tmp_path / "in" / "00001.tar"
    bad.write_bytes(Path(shards[0]).read_bytes()[:1500])  # truncated mid-member
    summary = run_capfilt(shards + [str(bad)], tmp_path / "out", settings, captioner=captioner, ranker=ranker,
                          progress=False)
    assert summary.written == 1 and len(summary.failed) == 1 and "00001.tar" in summary.failed[0]
    assert not (tmp_path / "out" / "00001.tar").exists() and not list((tmp_path / "out").glob("*.part"))


def test_bad_inputs_are_one_line_errors(tmp_path, settings):
    shards = _shards(tmp_path / "in", n=1, per_shard=1)
    with pytest.raises(Blip2Error, match="holds the input shards"):
        run_capfilt(shards, tmp_path / "in", settings, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(Blip2Error, match="not writable"):
        run_capfilt(shards, blocker / "out", settings, progress=False)
    with pytest.raises(Blip2Error, match="cannot load captioner"):
        run_capfilt(shards, tmp_path / "o1", CapfiltSettings(captioner=str(tmp_path / "nope")), progress=False)
    with pytest.raises(Blip2Error, match="top-p"):
        run_capfilt(shards, tmp_path / "o2", CapfiltSettings(top_p=0.0), progress=False)


def test_cli_capfilt_workspace_defaults(tmp_path, settings, blip_dir, clip_files):
    from blip2cli.cli import app

    config, weights = clip_files
    _shards(tmp_path / "ws" / "pretrain" / "cc3m", n=1, per_shard=2, corrupt=1)
    args = ["capfilt", "--dataset", "cc3m", "--root", str(tmp_path / "ws"), "--captioner", str(blip_dir),
            "--clip-model", str(config), "--clip-pretrained", str(weights), "--num-captions", "3",
            "--max-length", "10", "--min-length", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "corrupt images" in result.output and "captioned" in result.output
    assert "1 shards, 2 captioned, 1 corrupt" in result.output
    out = _samples(tmp_path / "ws" / "capfilt" / "cc3m" / "00000.tar")
    assert len(out) == 2 and all(len(json.loads(m["json"])["captions"]) == 2 for m in out.values())
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "1 already done" in again.output


def test_captioner_runs_in_bfloat16(settings):
    captioner = BlipCaptioner(settings, "cpu", torch.bfloat16)
    assert next(captioner.model.parameters()).dtype == torch.bfloat16
    out = captioner(tiny.random_images(2))
    assert len(out) == 2 and all(len(group) == settings.num_captions for group in out)


def test_cli_shards_flag_names_outputs_after_the_input_folder(tmp_path, blip_dir, clip_files, monkeypatch):
    from blip2cli.cli import app

    config, weights = clip_files
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BLIP2_HOME", raising=False)
    _shards(tmp_path / "mine", n=2, per_shard=1)
    result = CliRunner().invoke(app, ["capfilt", "--shards", str(tmp_path / "mine" / "{00000..00001}.tar"),
                                      "--captioner", str(blip_dir), "--clip-model", str(config),
                                      "--clip-pretrained", str(weights), "--num-captions", "2", "--max-length", "8",
                                      "--min-length", "2", "--world-size", "2", "--rank", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "blip2-data" / "capfilt" / "mine").glob("*.tar")) == ["00001.tar"]
    missing = CliRunner().invoke(app, ["capfilt"])
    assert missing.exit_code != 0 and "give --shards or --dataset" in str(missing.exception)


@pytest.mark.gpu
def test_capfilt_on_cuda_in_half_precision(tmp_path, settings):
    shards = _shards(tmp_path / "in", n=1, per_shard=3, corrupt=1)
    summary = run_capfilt(shards, tmp_path / "out", settings, device="cuda", dtype="auto", progress=False)
    assert (summary.captioned, summary.corrupt) == (3, 1)
    for m in _samples(tmp_path / "out" / "00000.tar").values():
        meta = json.loads(m["json"])
        assert len(meta["captions"]) == 2 and meta["clip_scores"] == sorted(meta["clip_scores"], reverse=True)
