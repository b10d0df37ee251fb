"""Training images travel as uint8 and the model normalises them: bit-identical to torchvision's ToTensor +
Normalize on the host, so batches, losses and gradients are those of the float data path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from blip2cli.data.training import image_transform, make_eval_loader, make_train_loader
from blip2cli.models.preprocessing import CLIP_MEAN, CLIP_STD, ImagePreprocessing, normalize_uint8
from blip2cli.recipes import load_recipe
from blip2cli.training.builders import build_model
from blip2cli.training.text_batching import TextBatcher
from tests import tiny

STATS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def _images() -> list[Image.Image]:
    """Random images plus one holding every value 0..255 in each channel."""
    rng = np.random.default_rng(0)
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    every_value = np.stack([ramp, ramp.T, 255 - ramp], axis=-1)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(4)] + \
        [Image.fromarray(every_value)]


@pytest.mark.parametrize("stats", STATS)
def test_normalize_uint8_is_torchvision_bit_for_bit(stats):
    mean, std = STATS[stats]
    images = _images()
    expected = torch.stack([T.Normalize(mean, std)(T.ToTensor()(image)) for image in images])
    pixels = torch.stack([T.PILToTensor()(image) for image in images])
    assert pixels.dtype == torch.uint8
    assert torch.equal(normalize_uint8(pixels, mean, std), expected)
    assert torch.equal(normalize_uint8(pixels[0], mean, std), expected[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training step's context
        assert torch.equal(normalize_uint8(pixels, mean, std), expected)
    pre = ImagePreprocessing(size=16, mean=mean, std=std)
    assert torch.equal(pre.normalized(pixels), expected)
    assert pre.normalized(expected) is expected  # floats are normalised already


def test_uint8_transform_keeps_the_geometric_steps():
    names = [type(s).__name__ for s in image_transform(32, True, uint8=True).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny.write_shards(tmp_path_factory.mktemp("shards"), num_shards=2, per_shard=4)


def _batches(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("stats", ["clip", "imagenet"])
def test_loaders_send_uint8_that_normalise_to_the_float_batches(shards, stats):
    pre = ImagePreprocessing(size=24, mean=STATS[stats][0], std=STATS[stats][1])
    train = dict(micro_batch_size=4, image_size=pre.size, preprocessing=pre, seed=3, shuffle_buffer=4)
    for make, kw in ((make_train_loader, train), (make_eval_loader, dict(batch_size=3, image_size=pre.size,
                                                                          preprocessing=pre))):
        sent = _batches(make(shards, **kw), 3)
        floats = _batches(make(shards, uint8=False, **kw), 3)
        for u, f in zip(sent, floats, strict=True):
            assert u["key"] == f["key"]
            assert u["pixel_values"].dtype == torch.uint8 and u["pixel_values"].shape == f["pixel_values"].shape
            assert torch.equal(pre.normalized(u["pixel_values"]), f["pixel_values"])


@pytest.mark.parametrize("recipe", ["tiny_stage1", "tiny_stage2_opt"])
def test_losses_on_uint8_batches_equal_those_on_host_normalised_batches(recipe, shards):
    torch.manual_seed(0)
    built = build_model(load_recipe(recipe, []), shards=shards)
    model = built.model.train()
    pre = model.config.preprocessing
    kw = dict(micro_batch_size=4, image_size=pre.size, preprocessing=pre, seed=1)
    batcher = TextBatcher(load_recipe(recipe, []), built)
    losses, grads = [], []
    for uint8 in (True, False):
        inputs = batcher(next(iter(make_train_loader(shards, uint8=uint8, **kw))), step=0, device=torch.device("cpu"))
        assert inputs["pixel_values"].dtype == (torch.uint8 if uint8 else torch.float32)
        loss, grad = tiny.losses_and_query_grad(model, inputs)
        losses.append(loss)
        grads.append(grad)
    assert losses[0].keys() == losses[1].keys() and float(losses[0]["loss"]) > 0
    for key in losses[0]:
        assert torch.equal(losses[0][key], losses[1][key]), key
    assert torch.equal(grads[0], grads[1])
