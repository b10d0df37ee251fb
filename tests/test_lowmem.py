"""Low-memory loading: `--device-map auto` gives the same captions; 8-bit (bitsandbytes, where installed)
quantizes the frozen LLM only; 4-bit needs a GPU; clear one-line errors otherwise."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blip2cli.checkpoint import load_model
from blip2cli.errors import Blip2Error
from blip2cli.inference import Blip2Assistant
from blip2cli.inference.lowmem import load_for_inference, memory_footprint, placement_arguments
from tests import tiny

IMAGES = [tiny.shape_image(fg, bg) for fg, bg in [("red", "blue"), ("green", "white"), ("yellow", "black")]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_hf_blip2(tmp_path_factory.mktemp("lowmem"), "opt", seed=1, image_sensitive=True)


def _captions(loaded, device):
    assistant = Blip2Assistant(loaded, device)
    options = assistant.resolve("caption", {"num_beams": 2, "max_new_tokens": 5})[1]
    return assistant.generate(IMAGES, None, options)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed (blip2cli[lowmem])")
def test_device_map_auto_gives_the_same_captions(model_dir):
    expected = _captions(load_model(model_dir), torch.device("cpu"))
    assert len(set(expected)) > 1
    loaded, device = load_for_inference(str(model_dir), torch.device("cpu"), "float32", device_map="auto")
    assert _captions(loaded, device) == expected
    assert loaded.model.qformer.layernorm.weight.dtype == torch.float32


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_8bit_quantizes_the_frozen_llm_only(model_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plain = load_model(model_dir)
    loaded, input_device = load_for_inference(str(model_dir), device, quantize="8bit")
    model = loaded.model
    layer = model.language_model.model.decoder.layers[0]
    assert isinstance(layer.fc1, bnb.nn.Linear8bitLt) and isinstance(layer.self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert not isinstance(model.language_model.lm_head, bnb.nn.Linear8bitLt)
    assert type(model.qformer.encoder.layer[0].attention.attention.query) is torch.nn.Linear
    assert type(model.vision_model.encoder.layers[0].mlp.fc1) is torch.nn.Linear
    assert model.qformer.layernorm.weight.dtype == torch.float32 and model.query_tokens.dtype == torch.float32
    llm_bytes = memory_footprint(model)["language_model"]
    assert llm_bytes < 0.5 * memory_footprint(plain.model)["language_model"]
    captions = _captions(loaded, input_device)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


@pytest.mark.gpu
def test_4bit_on_gpu(model_dir):
    pytest.importorskip("bitsandbytes")
    loaded, device = load_for_inference(str(model_dir), torch.device("cuda"), quantize="4bit")
    assert memory_footprint(loaded.model)["language_model"] < 0.3 * memory_footprint(load_model(model_dir).model)["language_model"]
    assert len(_captions(loaded, device)) == 3


def test_placement_errors(tmp_path):
    assert placement_arguments() == {}
    with pytest.raises(Blip2Error, match="unknown --quantize"):
        placement_arguments(quantize="2bit")
    with pytest.raises(Blip2Error, match="unknown --device-map"):
        placement_arguments(device_map="everywhere")
    with pytest.raises(Blip2Error, match="--quantize-vision needs"):
        placement_arguments(quantize_vision=True)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(Blip2Error, match=r"pip install 'blip2cli\[lowmem\]'"):
            placement_arguments(quantize="8bit")
    elif not torch.cuda.is_available():
        with pytest.raises(Blip2Error, match="4bit needs a CUDA GPU"):
            placement_arguments(quantize="4bit")
