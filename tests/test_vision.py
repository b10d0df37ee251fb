"""Frozen image encoders: open_clip towers, timm EVA -> Blip2VisionModel, transformers vision models.

Everything is tiny and random (spec (j)); nothing is downloaded.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch
from open_clip.transformer import QuickGELU
from timm.models.eva import Eva
from transformers import (
    Blip2VisionModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
)

from blip2cli.models.eva_convert import (
    convert_eva_state_dict,
    eva_vision_config_from_timm,
    eva_vit_g_config,
    interpolate_pos_embed,
)
from blip2cli.models.vision import (
    build_vision_model,
    encode_images,
    freeze_trunk,
    trunk_features,
    trunk_parameters,
    vision_hidden_size,
)
from blip2cli.models.vision_hf import HFVisionEncoder
from blip2cli.models.vision_loading import eva_vision_model_from_state_dict, load_vision_encoder
from blip2cli.models.vision_open_clip import OpenClipVisionEncoder, resolve_quick_gelu

SIZE, PATCH, WIDTH = 32, 8, 32
TOKENS = 1 + (SIZE // PATCH) ** 2  # CLS + 16 patches

TINY_VIT = "blip2test-tiny-vit"
TINY_EVA_TOWER = "blip2test-tiny-eva"
TINY_EVA_TIMM = "blip2test_eva_tiny"
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
VIT_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": SIZE, "layers": 3, "width": WIDTH, "patch_size": PATCH, "head_width": 8}, "text_cfg": TEXT_CFG}
EVA_TOWER_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIZE, "timm_model_name": TINY_EVA_TIMM, "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
    "text_cfg": TEXT_CFG,
    "custom_text": True,
}
EVA_KW = dict(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=3, num_heads=4, mlp_ratio=2, qkv_bias=True)


def _tiny_eva_entrypoint(pretrained=False, **kwargs):
    keep = {k: v for k, v in kwargs.items() if k in ("num_classes", "global_pool", "drop_path_rate")}
    return Eva(**EVA_KW, **keep)


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    """The tiny open_clip architectures, registered the way spec (j) describes."""
    directory = tmp_path_factory.mktemp("open_clip_configs")
    (directory / f"{TINY_VIT}.json").write_text(json.dumps(VIT_CFG))
    (directory / f"{TINY_EVA_TOWER}.json").write_text(json.dumps(EVA_TOWER_CFG))
    if not timm.is_model(TINY_EVA_TIMM):
        _tiny_eva_entrypoint.__name__ = TINY_EVA_TIMM
        timm.models.register_model(_tiny_eva_entrypoint)
    open_clip.add_model_config(directory)


def images(n=2, size=SIZE, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_eva(seed=0, **overrides) -> Eva:
    torch.manual_seed(seed)
    eva = Eva(**{**EVA_KW, **overrides}, num_classes=0).eval()
    with torch.no_grad():  # timm zero-inits the q/v biases; make the bias mapping observable
        for block in eva.blocks:
            block.attn.q_bias.normal_()
            block.attn.v_bias.normal_()
    return eva


def timm_penultimate(eva: Eva, x: torch.Tensor) -> torch.Tensor:
    out = eva.forward_intermediates(x, indices=[-2], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    patches, prefix = out[0]
    return torch.cat([prefix, patches], dim=1)


def rebuilt_features(model, spec, x):
    """Rebuild from the JSON-serialised spec, load the state dict, return both feature tensors."""
    clone = build_vision_model(json.loads(json.dumps(spec))).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        return trunk_features(model, x), trunk_features(clone, x)


# --------------------------------------------------------------------------- open_clip


def test_open_clip_penultimate_tokens_match_manual_blocks():
    torch.manual_seed(0)
    full = open_clip.create_model(TINY_VIT).visual.eval()
    encoder = OpenClipVisionEncoder.from_spec({"kind": "open_clip", "model_name": TINY_VIT}).eval()
    trunk = encoder.trunk
    assert len(trunk.transformer.resblocks) == 2 and isinstance(trunk.ln_post, torch.nn.Identity) and trunk.proj is None
    dropped = set(full.state_dict()) - set(trunk.state_dict())
    assert dropped == {k for k in full.state_dict() if k.startswith(("transformer.resblocks.2.", "ln_post.", "proj"))}
    trunk.load_state_dict({k: v for k, v in full.state_dict().items() if k not in dropped}, strict=True)

    x = images()
    with torch.no_grad():
        h = full.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([full.class_embedding.expand(x.shape[0], 1, -1), h], dim=1) + full.positional_embedding
        h = full.ln_pre(h)
        for block in full.transformer.resblocks[:-1]:
            h = block(h)
        features = encoder.trunk_features(x)
    assert features.shape == (2, TOKENS, WIDTH)
    torch.testing.assert_close(features, h, atol=1e-5, rtol=0)
    assert encoder.hidden_size == vision_hidden_size(encoder) == WIDTH
    assert encoder.post_layernorm.eps == 1e-5
    # A runtime-registered architecture travels inside the spec.
    assert encoder.spec["model_config"] == VIT_CFG and encoder.spec["hidden_size"] == WIDTH


def test_open_clip_quick_gelu_enforced_for_openai_weights():
    vit_l = open_clip.get_model_config("ViT-L-14")
    assert resolve_quick_gelu("ViT-L-14", "openai", vit_l, None) is True  # automatic
    assert resolve_quick_gelu("ViT-L-14-quickgelu", "openai", open_clip.get_model_config("ViT-L-14-quickgelu"), None)
    with pytest.raises(ValueError, match="QuickGELU"):
        resolve_quick_gelu("ViT-L-14", "openai", vit_l, False)
    with pytest.raises(ValueError, match="nn.GELU"):
        resolve_quick_gelu("ViT-L-14", "laion2b_s32b_b82k", vit_l, True)
    assert resolve_quick_gelu("ViT-L-14", "laion2b_s32b_b82k", vit_l, None) is False

    encoder = OpenClipVisionEncoder.from_spec({"kind": "open_clip", "model_name": TINY_VIT, "force_quick_gelu": True})
    acts = [type(m) for m in encoder.trunk.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))]
    assert acts and all(a is QuickGELU for a in acts)
    assert encoder.spec["force_quick_gelu"] is True
    rebuilt = build_vision_model(encoder.spec)
    assert any(isinstance(m, QuickGELU) for m in rebuilt.modules())


def test_open_clip_timm_eva_tower_matches_eva_conversion():
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_EVA_TOWER)
    eva = model.visual.trunk.eval()
    encoder = OpenClipVisionEncoder.from_spec({"kind": "open_clip", "model_name": TINY_EVA_TOWER}).eval()
    assert len(encoder.trunk.trunk.blocks) == 2 and isinstance(encoder.trunk.trunk.norm, torch.nn.Identity)
    missing, unexpected = encoder.trunk.trunk.load_state_dict(eva.state_dict(), strict=False)
    assert not missing and all(k.startswith(("blocks.2.", "norm.", "head.")) for k in unexpected)

    # The same weights through the whole-CLIP checkpoint path: prefix "visual.trunk.", text keys ignored.
    config = eva_vision_config_from_timm(model)  # unwraps CLIP -> TimmModel -> Eva
    hf = eva_vision_model_from_state_dict(model.state_dict(), config)
    x = images()
    with torch.no_grad():
        expected = timm_penultimate(eva, x)
        torch.testing.assert_close(encoder.trunk_features(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(trunk_features(hf, x), expected, atol=1e-6, rtol=0)


def test_open_clip_local_weights_file(tmp_path):
    torch.manual_seed(1)
    clip = open_clip.create_model(TINY_VIT).eval()
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    encoder, spec = load_vision_encoder(f"open_clip:{TINY_VIT}:{path}", image_size=SIZE)
    assert spec["pretrained"] == str(path) and spec["image_size"] == SIZE
    x = images()
    with torch.no_grad():
        out = clip.visual.forward_intermediates(x, indices=[-2], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True)
        expected = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        torch.testing.assert_close(trunk_features(encoder, x), expected, atol=0, rtol=0)
    ours, theirs = rebuilt_features(encoder, spec, x)
    assert torch.equal(ours, theirs)


def test_open_clip_offline_fetch_is_one_clear_error():
    from blip2cli.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="open_clip:ViT-L-14-quickgelu:openai .*blip2 download model.*local file"):
        load_vision_encoder("clip-vit-l")
    with pytest.raises(ModelNotFoundError, match="EVA01-g-14.*local file instead: 'eva-vit-g:/path/to/eva_weights.pth'"):
        load_vision_encoder("eva-vit-g")


# --------------------------------------------------------------------------- EVA -> Blip2VisionModel


def test_eva_conversion_is_exact():
    eva = tiny_eva()
    config = eva_vision_config_from_timm(eva)
    assert (config.num_hidden_layers, config.intermediate_size, config.layer_norm_eps) == (2, 64, 1e-6)
    model = eva_vision_model_from_state_dict(eva.state_dict(), config)
    x = images()
    with torch.no_grad():
        ours = trunk_features(model, x)
        reference = torch.cat([eva.cls_token.expand(2, -1, -1), eva.patch_embed(x)], dim=1) + eva.pos_embed
        for block in eva.blocks[:-1]:
            reference = block(reference)
    assert ours.shape == (2, TOKENS, WIDTH)
    assert (ours - reference).abs().max() <= 1e-6
    assert (ours - timm_penultimate(eva, x)).abs().max() <= 1e-6
    qkv_bias = model.encoder.layers[0].self_attn.qkv.bias
    assert torch.equal(qkv_bias[WIDTH : 2 * WIDTH], torch.zeros(WIDTH))


def test_eva_conversion_is_strict():
    eva = tiny_eva()
    config = eva_vision_config_from_timm(eva)
    state = eva.state_dict()
    with pytest.raises(ValueError, match="no Blip2VisionModel slot: blocks.0.attn.extra"):
        convert_eva_state_dict({**state, "blocks.0.attn.extra": torch.zeros(1)}, config)
    with pytest.raises(KeyError, match="blocks.1.attn.v_bias"):
        convert_eva_state_dict({k: v for k, v in state.items() if k != "blocks.1.attn.v_bias"}, config)
    with pytest.raises(ValueError, match="3 blocks"):
        dims = dict(embed_dim=WIDTH, depth=5, num_heads=4, intermediate_size=64, patch_size=PATCH, img_size=SIZE)
        convert_eva_state_dict(state, eva_vision_config_from_timm(dims))
    # Already-truncated weights (depth - 1 blocks) convert too.
    truncated = {k: v for k, v in state.items() if not k.startswith("blocks.2.")}
    assert convert_eva_state_dict(truncated, config).keys() == convert_eva_state_dict(state, config).keys()
    # EVA02-style towers have no exact Blip2VisionModel form.
    with pytest.raises(ValueError, match="rotary"):
        eva_vision_config_from_timm(Eva(**EVA_KW, num_classes=0, use_rot_pos_emb=True))


def test_eva_position_embedding_interpolation():
    eva = tiny_eva()
    pos = eva.pos_embed.detach()
    assert interpolate_pos_embed(pos, SIZE // PATCH) is pos  # same size: untouched
    small = eva_vision_model_from_state_dict(eva.state_dict(), eva_vision_config_from_timm(eva))
    big = eva_vision_model_from_state_dict(eva.state_dict(), eva_vision_config_from_timm(eva, image_size=48))
    assert big.config.image_size == 48
    assert big.embeddings.position_embedding.shape == (1, 1 + 6 * 6, WIDTH)
    assert torch.equal(big.embeddings.position_embedding[:, :1], pos[:, :1])
    x = images(size=48)
    with torch.no_grad():
        # Bicubic like transformers' own on-the-fly interpolation, so the two agree.
        expected = trunk_features(small, x, interpolate_pos_encoding=True)
        torch.testing.assert_close(trunk_features(big, x), expected, atol=1e-6, rtol=0)
        # images of another size than the encoder's are interpolated without being asked (fine-tuning recipes)
        assert torch.equal(trunk_features(small, x), expected)
    assert eva_vit_g_config(364).num_hidden_layers == 39 and eva_vit_g_config(364).image_size == 364


def test_eva_spec_loads_local_file(tmp_path):
    eva = tiny_eva()
    path = tmp_path / "eva.pth"
    torch.save({"model": {f"visual_encoder.{k}": v for k, v in eva.state_dict().items()}}, path)  # LAVIS-style
    config = eva_vision_config_from_timm(eva).to_dict()
    model, spec = load_vision_encoder({"kind": "eva", "pretrained": str(path), "config": config})
    assert isinstance(model, Blip2VisionModel) and spec["kind"] == "eva" and spec["config"]["num_hidden_layers"] == 2
    x = images()
    ours, theirs = rebuilt_features(model, spec, x)
    assert torch.equal(ours, theirs) and (ours - timm_penultimate(eva, x)).abs().max() <= 1e-6

    half, _ = load_vision_encoder({"kind": "eva", "pretrained": str(path), "config": config}, dtype=torch.bfloat16)
    assert {p.dtype for p in trunk_parameters(half)} == {torch.bfloat16}
    assert half.post_layernorm.weight.dtype == torch.float32
    features = encode_images(half, x)
    assert features.dtype == torch.float32 and features.shape == (2, TOKENS, WIDTH)


# --------------------------------------------------------------------------- transformers vision models


def _save(model, directory):
    model.save_pretrained(directory)
    return str(directory)


def hf_models():
    common = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE, patch_size=PATCH)
    torch.manual_seed(0)
    return {
        "clip": CLIPVisionModel(CLIPVisionConfig(**common)).eval(),
        "dinov2": Dinov2Model(Dinov2Config(**common)).eval(),
    }


@pytest.mark.parametrize("family, layer, chosen", [("clip", -2, None), ("dinov2", -1, None), ("dinov2", -2, -2),
                                                   ("clip", -1, -1), ("dinov2", 1, 1)])
def test_hf_encoder_returns_the_family_default_or_chosen_hidden_state(family, layer, chosen, tmp_path):
    """CLIP towers feed the Q-Former their penultimate block (BLIP-2's convention), every other family its
    last block, unless a layer is chosen (recipe key model.vision_feature_layer)."""
    reference = hf_models()[family]
    encoder, spec = load_vision_encoder(f"hf:{_save(reference, tmp_path)}", image_size=SIZE, feature_layer=chosen)
    assert isinstance(encoder, HFVisionEncoder) and spec["feature_layer"] == layer and spec["hidden_size"] == WIDTH
    x = images()
    with torch.no_grad():
        expected = reference(pixel_values=x, output_hidden_states=True).hidden_states[layer]
        features = trunk_features(encoder, x)
    assert features.shape == (2, TOKENS, WIDTH)
    torch.testing.assert_close(features, expected, atol=0, rtol=0)
    ours, theirs = rebuilt_features(encoder, spec, x)
    assert torch.equal(ours, theirs)


def test_hf_two_tower_model_gives_its_vision_tower(tmp_path):
    vision = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=PATCH)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).eval()
    encoder, spec = load_vision_encoder(f"hf:{_save(clip, tmp_path)}", image_size=SIZE)
    assert spec["config"]["model_type"] == "clip_vision_model"
    x = images()
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(trunk_features(encoder, x), expected, atol=0, rtol=0)
    ours, theirs = rebuilt_features(encoder, spec, x)
    assert torch.equal(ours, theirs)


def test_hf_offline_fetch_is_one_clear_error():
    from blip2cli.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="blip2test/no-such-model .*local directory instead: 'hf:/path"):
        load_vision_encoder("hf:blip2test/no-such-model")


def test_hf_interpolates_positions_for_other_image_sizes(tmp_path):
    reference = hf_models()["clip"]
    encoder, spec = load_vision_encoder(f"hf:{_save(reference, tmp_path)}", image_size=48)
    assert encoder.interpolate_pos_encoding and spec["image_size"] == 48
    with torch.no_grad():
        assert trunk_features(encoder, images(size=48)).shape == (2, 1 + 36, WIDTH)
        native, _ = load_vision_encoder(f"hf:{tmp_path}", image_size=SIZE)  # built for its own size, fed 48 px
        assert torch.equal(trunk_features(native, images(size=48)), trunk_features(encoder, images(size=48)))


# --------------------------------------------------------------------------- shared behaviour


def open_clip_encoders():
    return [
        OpenClipVisionEncoder.from_spec({"kind": "open_clip", "model_name": TINY_VIT}),
        OpenClipVisionEncoder.from_spec({"kind": "open_clip", "model_name": TINY_EVA_TOWER}),
    ]


def test_open_clip_specs_rebuild_identically():
    x = images()
    for encoder in open_clip_encoders():
        spec = encoder.spec
        with torch.no_grad():  # give ln_vision non-default values so the round trip covers it
            encoder.post_layernorm.weight.normal_()
        ours, theirs = rebuilt_features(encoder.eval(), spec, x)
        assert torch.equal(ours, theirs)
        rebuilt = build_vision_model(spec)
        rebuilt.load_state_dict(encoder.state_dict())
        assert torch.equal(encode_images(rebuilt.eval(), x), encode_images(encoder, x))


def test_bf16_trunk_gives_fp32_features(tmp_path):
    hf, _ = load_vision_encoder(f"hf:{_save(hf_models()['clip'], tmp_path)}", image_size=SIZE, dtype=torch.bfloat16)
    oc = OpenClipVisionEncoder.from_spec({"kind": "open_clip", "model_name": TINY_VIT}, dtype=torch.bfloat16)
    for encoder in (hf, oc.eval()):
        assert {p.dtype for p in trunk_parameters(encoder)} == {torch.bfloat16}
        assert encoder.post_layernorm.weight.dtype == torch.float32
        features = encode_images(encoder, images())
        assert features.dtype == torch.float32 and features.shape == (2, TOKENS, WIDTH)


def test_trunk_frozen_ln_vision_trainable(tmp_path):
    hf, _ = load_vision_encoder(f"hf:{_save(hf_models()['dinov2'], tmp_path)}", image_size=SIZE)
    for encoder in (hf, *open_clip_encoders()):
        freeze_trunk(encoder)
        assert trunk_parameters(encoder) and not any(p.requires_grad for p in trunk_parameters(encoder))
        assert all(p.requires_grad for p in encoder.post_layernorm.parameters())
        encode_images(encoder.eval(), images()).square().mean().backward()
        assert encoder.post_layernorm.weight.grad is not None
        assert all(p.grad is None for p in trunk_parameters(encoder))
