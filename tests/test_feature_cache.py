"""The frozen-feature cache: stage-1 and stage-2 losses from cached features equal those from the live frozen
encoder on the same views; the cache refuses another encoder; training runs from it."""

from __future__ import annotations

import json

import pytest
import torch

from blip2cli.data.feature_cache import (
    CachedFeatureLoader,
    augmented_view,
    check_cache_fits,
    open_feature_cache,
    write_feature_cache,
)
from blip2cli.data.training import SampleDecoder, image_transform, iter_shard
from blip2cli.errors import Blip2Error
from blip2cli.recipes import load_recipe
from blip2cli.training.builders import build_model
from blip2cli.training.text_batching import TextBatcher
from tests import tiny

VIEWS = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny.write_shards(tmp_path_factory.mktemp("shards"), num_shards=2, per_shard=4, corrupt=1)


def _built(name, shards):
    torch.manual_seed(0)
    return build_model(load_recipe(name, []), shards=shards)


def _live_views(model, shards, keys_and_views, seed):
    """The uint8 pixels of the given (key, view) pairs, made from the shards as the cache writer makes them."""
    pre = model.config.preprocessing
    transform = image_transform(pre.size, True, (0.5, 1.0), True, preprocessing=pre, uint8=True)
    decoder = SampleDecoder(transform)
    images = {s["__key__"]: decoder.image(s) for url in shards for s in iter_shard(url)}
    return torch.stack([augmented_view(images[k], transform, seed, k, v) for k, v in keys_and_views])


def _batch_with_views(loader):
    """One cached batch plus the (key, view) of each of its samples (redrawn as the loader draws them)."""
    import random

    from blip2cli.data.training import derive_seed

    start = loader.batches_done * loader.batch_size
    batch = next(iter(loader))
    views = [random.Random(derive_seed(loader.seed, "cache-sample", loader.rank, n)).randrange(VIEWS)
             for n in range(start, start + loader.batch_size)]
    return batch, list(zip(batch["key"], views))


@pytest.fixture
def one_thread():
    """One CPU thread: with more, a matmul's rounding depends on its batch size (seen on 2 cores), and the cache
    writer encodes other batches than the live step does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", ["tiny_stage1", "tiny_stage2_opt"])
def test_cached_losses_equal_live_losses_on_the_same_views(recipe, shards, tmp_path, one_thread):
    built = _built(recipe, shards)
    model = built.model.train()
    pre = model.config.preprocessing
    manifest = write_feature_cache(model.vision_model, shards, tmp_path / "cache", preprocessing=pre, views=VIEWS,
                                   seed=7, dtype="fp32", batch_size=64, say=lambda _: None)
    assert manifest.images == 8 and manifest.skipped == {"bad_image": 2}
    loader = CachedFeatureLoader(tmp_path / "cache", micro_batch_size=6, seed=3)
    batch, keys_and_views = _batch_with_views(loader)
    assert len({v for _, v in keys_and_views}) > 1  # the batch mixes views
    batcher = TextBatcher(load_recipe(recipe, []), built)
    cached_inputs = batcher(batch, step=0, device=torch.device("cpu"))
    assert "pixel_values" not in cached_inputs and cached_inputs["vision_features"].dtype == torch.float32
    live_inputs = {**{k: v for k, v in cached_inputs.items() if k != "vision_features"},
                   "pixel_values": _live_views(model, shards, keys_and_views, seed=7)}
    outputs, grads = zip(*(tiny.losses_and_query_grad(model, inputs) for inputs in (live_inputs, cached_inputs)))
    for key in outputs[0]:
        torch.testing.assert_close(outputs[1][key], outputs[0][key], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert float(outputs[0]["loss"]) > 0


def test_half_precision_cache_and_cost(shards, tmp_path):
    built = _built("tiny_stage1", shards)
    lines = []
    manifest = write_feature_cache(built.model.vision_model, shards, tmp_path / "c", preprocessing=built.model.config.preprocessing,
                                   views=2, dtype="fp16", say=lines.append)
    # tiny ViT: (32 / 8)^2 patches + CLS = 17 tokens of width 32, 2 views, 2 bytes
    assert manifest.bytes_per_image == 2 * 17 * 32 * 2
    assert lines[0].startswith("feature cache: 0.00 MiB per image (2 views x 17 tokens x 32 x 2 bytes, fp16)")
    assert open_feature_cache(tmp_path / "c").images == 8
    batch = next(iter(CachedFeatureLoader(tmp_path / "c", micro_batch_size=4)))
    assert batch["vision_features"].shape == (4, 17, 32) and batch["vision_features"].dtype == torch.float16


def test_cache_refuses_another_encoder_and_stays_unusable_until_finished(shards, tmp_path):
    built = _built("tiny_stage1", shards)
    write_feature_cache(built.model.vision_model, shards, tmp_path / "c", preprocessing=built.model.config.preprocessing,
                        views=1, say=lambda _: None)
    manifest = open_feature_cache(tmp_path / "c")
    check_cache_fits(manifest, built.model.vision_model, 32, tmp_path / "c")
    torch.manual_seed(1)
    other = build_model(load_recipe("tiny_stage1", []), shards=shards).model.vision_model
    with pytest.raises(Blip2Error, match="another image encoder"):
        check_cache_fits(manifest, other, 32, tmp_path / "c")
    with pytest.raises(Blip2Error, match="px"):
        check_cache_fits(manifest, built.model.vision_model, 64, tmp_path / "c")
    (tmp_path / "c" / "feature_cache.json").unlink()
    with pytest.raises(Blip2Error, match="not a finished feature cache"):
        open_feature_cache(tmp_path / "c")


def test_cached_stream_resumes_exactly_and_splits_ranks(shards, tmp_path):
    built = _built("tiny_stage1", shards)
    write_feature_cache(built.model.vision_model, shards, tmp_path / "c", preprocessing=built.model.config.preprocessing,
                        views=2, say=lambda _: None)
    stream = iter(CachedFeatureLoader(tmp_path / "c", micro_batch_size=3, seed=5))
    batches = [next(stream) for _ in range(6)]  # past one pass over the 8 images
    resumed = next(iter(CachedFeatureLoader(tmp_path / "c", micro_batch_size=3, seed=5, skip_batches=4)))
    assert resumed["key"] == batches[4]["key"] and resumed["text"] == batches[4]["text"]
    assert torch.equal(resumed["vision_features"], batches[4]["vision_features"])
    first_pass = [k for b in batches for k in b["key"]][:8]
    assert sorted(first_pass) == sorted(json.loads(line)["key"] for f in sorted((tmp_path / "c").glob("samples-*"))
                                        for line in f.read_text().splitlines())
    rank_keys = [{k for b in (next(it) for it in [iter(CachedFeatureLoader(tmp_path / "c", 4, rank=r, world_size=2))])
                  for k in b["key"]} for r in range(2)]
    assert rank_keys[0].isdisjoint(rank_keys[1])


@pytest.mark.parametrize("recipe, stage", [("tiny_stage1", 1), ("tiny_stage2_opt", 2)])
def test_cli_writes_a_cache_that_training_reads(recipe, stage, shards, tmp_path):
    from rich.console import Console
    from typer.testing import CliRunner

    from blip2cli.cli import app
    from blip2cli.training.loop import train

    data = f"data.shards={json.dumps(shards)}"
    result = CliRunner().invoke(app, ["cache-features", "--stage", str(stage), "--recipe", recipe, "--out",
                                      str(tmp_path / "cache"), "--device", "cpu", data, "data.feature_cache_views=2",
                                      "--root", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert open_feature_cache(tmp_path / "cache").views == 2
    overrides = ["train.max_steps=3", "optim.warmup_steps=1", "train.log_every=1", f"data.feature_cache={tmp_path / 'cache'}"]
    console = Console(file=__import__("io").StringIO(), width=200)
    train(load_recipe(recipe, overrides), tmp_path / "dry", shards, device="cpu", dry_run=True, console=console)
    said = console.file.getvalue()
    assert "one batch of 4 cached images loaded" in said
    assert "feature cache: 0.00 MiB per image (2 views x 17 tokens x 32 x 2 bytes, fp16), 0.00 GiB for 8 images" in said
    run = train(load_recipe(recipe, overrides), tmp_path / "run", shards, device="cpu", console=console)
    losses = [r["loss"] for r in run.history]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert run.history[-1]["samples_per_s"] > 0


def test_dry_run_reports_the_cost_of_a_cache_not_yet_written(shards, tmp_path):
    from rich.console import Console

    from blip2cli.training.loop import train

    console = Console(file=__import__("io").StringIO(), width=200)
    train(load_recipe("tiny_stage1", ["data.feature_cache_views=4"]), tmp_path / "dry", shards, device="cpu",
          dry_run=True, console=console)
    assert "(4 views x 17 tokens x 32 x 2 bytes, fp16) (not used" in console.file.getvalue()


def test_cache_is_refused_for_a_trainable_encoder():
    with pytest.raises(Blip2Error, match="data.feature_cache"):
        load_recipe("tiny_stage1", ["data.feature_cache=/x", "model.freeze_vision=false", "model.vision_precision=fp32"])
