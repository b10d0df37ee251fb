"""Stage-1 model: losses, masks, transformers parity, hand-checked math, BERT init, stage-2 transfer, learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertModel, Blip2ForImageTextRetrieval, OPTConfig

from blip2cli.models import Blip2ModelConfig, Blip2Stage1Model, Blip2Stage2Model, Stage1LossConfig
from blip2cli.models.losses import itc_loss, negative_weights, sample_hard_negatives
from blip2cli.models.qformer_text import init_qformer_from_bert, multimodal_causal_mask
from blip2cli.models.stage1 import transfer_to_stage2
from tests import tiny

MAX_LEN = 16


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tok():
    return tiny.bert_tokenizer()


def model_config(vocab_size: int, **qformer_overrides) -> Blip2ModelConfig:
    # Blip2VisionConfig's initializer_range is 1e-10: a random ViT built from it outputs (almost) the same
    # vector for every token of every image, and ln_vision maps that to ~0, so no image information would
    # reach the Q-Former. 0.02 gives features that differ between images.
    return Blip2ModelConfig(
        vision={"kind": "eva", "config": tiny.vision_config(initializer_range=0.02).to_dict()},
        qformer=tiny.qformer_config(vocab_size=vocab_size, **qformer_overrides).to_dict(),
        num_query_tokens=tiny.NUM_QUERY_TOKENS,
        image_text_hidden_size=16,
        image_size=tiny.IMAGE_SIZE,
        stage=1,
    )


def build(tok, seed: int = 0, **loss_overrides) -> Blip2Stage1Model:
    torch.manual_seed(seed)
    return Blip2Stage1Model.from_config(
        model_config(len(tok)),
        Stage1LossConfig(**loss_overrides),
        dec_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def batch(tok, n: int = 8, seed: int = 0):
    pixels = tiny.image_processor()(tiny.random_images(n, seed=seed), return_tensors="pt").pixel_values
    text = tok(tiny.CAPTIONS[:n], padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    return pixels, text.input_ids, text.attention_mask


# --------------------------------------------------------------------------------------------- losses
def test_losses_finite_and_weights_switch_losses_off(tok):
    pixels, ids, mask = batch(tok)
    full = build(tok).eval()
    torch.manual_seed(1)
    ref = full(pixels, ids, mask)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert ref[name].dtype == torch.float32 and torch.isfinite(ref[name]) and ref[name] > 0
    assert torch.allclose(ref["loss"], ref["loss_itc"] + ref["loss_itm"] + ref["loss_itg"])

    # Each objective off: its loss is 0, the others unchanged, and the parameters only it uses get no
    # gradient at all (its computation was skipped, not multiplied by zero).
    only_used_by = {"itc": ["vision_projection.weight", "text_projection.weight", "temp"],
                    "itm": ["itm_head.weight"], "itg": ["itg_head.bias", "itg_head.transform.dense.weight"]}
    for off in ("itc", "itm", "itg"):
        model = build(tok, **{f"{off}_weight": 0.0}).eval()
        torch.manual_seed(1)
        out = model(pixels, ids, mask)
        assert out[f"loss_{off}"] == 0
        others = [k for k in ("itc", "itm", "itg") if k != off]
        for k in others:
            assert torch.allclose(out[f"loss_{k}"], ref[f"loss_{k}"], atol=1e-6), (off, k)
        assert torch.allclose(out["loss"], sum(out[f"loss_{k}"] for k in others))
        out["loss"].backward()
        params = dict(model.named_parameters())
        for name in only_used_by[off]:
            assert params[name].grad is None, (off, name)
        for k in others:
            assert params[only_used_by[k][0]].grad is not None

    weighted = build(tok, itc_weight=2.0, itg_weight=0.5).eval()
    torch.manual_seed(1)
    out = weighted(pixels, ids, mask)
    assert torch.allclose(out["loss"], 2.0 * ref["loss_itc"] + ref["loss_itm"] + 0.5 * ref["loss_itg"], atol=1e-5)

    with pytest.raises(ValueError):
        Stage1LossConfig(itc_weight=0.0, itm_weight=0.0, itg_weight=0.0)


def test_bf16_autocast_forward_backward(tok):
    pixels, ids, mask = batch(tok, n=4)
    model = build(tok).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixels, ids, mask)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_image_id_positives_option(tok):
    pixels, ids, mask = batch(tok, n=4)
    image_ids = torch.tensor([7, 7, 9, 9])
    plain = build(tok).eval()
    torch.manual_seed(0)
    ref = plain(pixels, ids, mask)
    torch.manual_seed(0)
    ignored = plain(pixels, ids, mask, image_ids=image_ids)  # without the flag, image ids change nothing
    assert all(torch.equal(ref[k], ignored[k]) for k in ref)

    model = build(tok, image_id_positives=True).eval()
    with pytest.raises(ValueError, match="image_ids"):
        model(pixels, ids, mask)
    torch.manual_seed(0)
    out = model(pixels, ids, mask, image_ids=image_ids)
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["loss_itg"], ref["loss_itg"])
    with torch.no_grad():
        itc = model.itc(model.image_features(pixels), ids, mask, image_ids)
    assert torch.equal(out["loss_itc"], itc.loss)  # the soft-target maths is checked by hand above
    same = image_ids[:, None] == image_ids[None, :]
    for seed in range(20):
        neg = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, same, generator=torch.Generator().manual_seed(seed))
        assert not bool(same[torch.arange(4), neg.image_index].any() or same[torch.arange(4), neg.text_index].any())
    # every sample showing the same image: no negative at all, ITM falls back to the positives
    weights_all_same = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, torch.ones(4, 4, dtype=torch.bool))
    assert not bool(weights_all_same.image_valid.any() or weights_all_same.text_valid.any())


def test_temperature_clamp_option(tok):
    pixels, ids, mask = batch(tok, n=2)
    model = build(tok)
    assert model.temp.shape == () and torch.isclose(model.temp, torch.tensor(0.07))
    with torch.no_grad():
        model.temp.fill_(1.0)
    model(pixels, ids, mask)
    assert model.temp.item() == 1.0  # BLIP-2: no clamp
    model.loss_config = Stage1LossConfig(temp_clamp=(0.001, 0.5))
    model(pixels, ids, mask)
    assert model.temp.item() == 0.5


# --------------------------------------------------------------------------------------------- masks
def test_multimodal_causal_mask_values():
    mask = multimodal_causal_mask(2, torch.tensor([[1, 1, 0]]), dtype=torch.float32)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # queries: queries only
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # text 0: queries + itself
            [1, 1, 1, 1, 0],  # text 1: queries + text 0..1
            [1, 1, 1, 1, 0],  # text 2 (pad): queries + non-pad text before it, never a pad column
        ]
    )
    assert torch.equal(allowed, expected)
    assert torch.all(mask[0, 0][allowed == 0] == torch.finfo(torch.float32).min)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_itg_pass_is_multimodal_causal(tok, attn):
    pixels, ids, mask = batch(tok, n=3)
    model = build(tok).eval()
    model.qformer.set_attn_implementation(attn)  # eager adds the mask, sdpa passes it as attn_mask
    nq = model.num_query_tokens
    with torch.no_grad():
        image_embeds = model.image_features(pixels)
        dec = ids.clone()
        dec[:, 0] = tok.bos_token_id
        causal = multimodal_causal_mask(nq, mask)
        hidden = model.joint_hidden(image_embeds, dec, causal)
        j = 3  # a real (non-pad) token in every caption
        assert bool(mask[:, j].all())
        perturbed = dec.clone()
        perturbed[:, j] = (perturbed[:, j] + 7) % (len(tok) - 1)
        hidden2 = model.joint_hidden(image_embeds, perturbed, causal)
        # queries never read the text; text never reads later text
        assert torch.equal(hidden[:, :nq], hidden2[:, :nq])
        assert torch.equal(hidden[:, nq : nq + j], hidden2[:, nq : nq + j])
        assert not torch.allclose(hidden[:, nq + j], hidden2[:, nq + j])
        # the joint pass's query outputs are the query-only pass's (LAVIS's K/V reuse)
        assert torch.allclose(hidden[:, :nq], model.query_outputs(image_embeds), atol=1e-6)


def test_itg_loss_equals_the_loss_over_every_text_position(tok):
    """The ITG head runs on labelled positions only; LAVIS runs it over every text position (padding too)
    and ignores the padded labels: the same loss, label smoothing included, and the same gradients."""
    pixels, ids, mask = batch(tok, n=4)
    assert not bool(mask.all())  # padded captions
    model = build(tok, itg_label_smoothing=0.1).eval()
    image_embeds = model.image_features(pixels)
    loss = model.itg_loss(image_embeds, ids, mask)
    grad = torch.autograd.grad(loss, model.itg_head.transform.dense.weight)[0]

    dec = ids.clone()
    dec[:, 0] = tok.bos_token_id
    labels = dec.masked_fill(mask == 0, -100)
    hidden = model.joint_hidden(image_embeds, dec, multimodal_causal_mask(model.num_query_tokens, mask))
    logits = model.itg_head(hidden[:, model.num_query_tokens : -1], model.embeddings.word_embeddings.weight)
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=-100, label_smoothing=0.1)
    reference_grad = torch.autograd.grad(reference, model.itg_head.transform.dense.weight)[0]
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, reference_grad, atol=1e-7, rtol=1e-5)


def _itg_both_ways(model, tok, pixels, ids, mask):
    """ITG loss and its gradients, computed by reusing the ITC query pass and by one joint pass."""
    image_embeds = model.image_features(pixels)
    _, states = model._itc(image_embeds, ids, mask, keep_query_states=True)
    results = []
    for query_states in (states, None):
        loss = model.itg_loss(image_embeds, ids, mask, query_states)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        results.append((loss, grads))
    return results


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_itg_reusing_the_itc_query_pass_equals_the_joint_pass(tok, attn):
    """Without dropout, the text pass over the ITC pass's query states (LAVIS's K/V reuse) gives the joint
    pass's loss and every gradient (query tokens, cross-attention, ln_vision included), in float64 to 1e-12."""
    pixels, ids, mask = batch(tok, n=4)
    assert not bool(mask.all())  # padded captions
    model = build(tok).double().eval()
    model.qformer.set_attn_implementation(attn)
    (reused, reused_grads), (joint, joint_grads) = _itg_both_ways(model, tok, pixels.double(), ids, mask)
    torch.testing.assert_close(reused, joint, atol=1e-12, rtol=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reached = 0
    for name, a, b in zip(names, reused_grads, joint_grads):
        if a is None:  # the last layer's query FFN: only the joint pass runs it, with zero gradient
            assert b is None or not b.any(), name
            continue
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9, msg=name)
        reached += bool(a.any()) and name.startswith(("query_tokens", "qformer.encoder.layer.0.crossattention",
                                                      "vision_model.post"))
    assert reached >= 3  # the ITG gradient reaches the queries, the cross-attention and ln_vision


def test_itg_reuse_with_checkpointing_and_in_forward(tok):
    """``forward`` reuses the ITC pass (same total as ITC + ITM + joint-pass ITG), and the reuse gives the
    same loss and gradients under Q-Former activation checkpointing."""
    pixels, ids, mask = batch(tok, n=4)
    model = build(tok).double().eval()
    torch.manual_seed(3)
    out = model(pixels.double(), ids, mask)
    image_embeds = model.image_features(pixels.double())
    torch.manual_seed(3)
    itc = model.itc(image_embeds, ids, mask)
    itm = model.itm_loss(image_embeds, ids, mask, itc)
    itg = model.itg_loss(image_embeds, ids, mask)
    torch.testing.assert_close(out["loss"], itc.loss + itm + itg, atol=1e-12, rtol=0)
    model.loss_config.itg_reuses_query_pass = False  # loss.itg_reuses_query_pass = false: the joint pass
    torch.manual_seed(3)
    torch.testing.assert_close(model(pixels.double(), ids, mask)["loss"], out["loss"], atol=1e-12, rtol=0)
    model.loss_config.itg_reuses_query_pass = True

    (plain, plain_grads), _ = _itg_both_ways(model, tok, pixels.double(), ids, mask)
    model.train()  # checkpointing only recomputes in training mode; dropout off keeps it deterministic
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):  # self- and cross-attention probabilities
            module.attention_dropout = 0.0
    model.qformer.gradient_checkpointing_enable()
    (checkpointed, checkpointed_grads), _ = _itg_both_ways(model, tok, pixels.double(), ids, mask)
    torch.testing.assert_close(checkpointed, plain, atol=1e-12, rtol=0)
    for a, b in zip(checkpointed_grads, plain_grads):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_itg_reuse_in_training_reads_the_itc_dropout_sample(tok):
    """With dropout, the text reads the queries as the ITC pass computed them (LAVIS's cache holds that
    pass's dropout sample): the ITG loss is a function of the query states handed over, not of a new draw."""
    pixels, ids, mask = batch(tok, n=4)
    model = build(tok).train()
    image_embeds = model.image_features(pixels)
    torch.manual_seed(0)
    _, states = model._itc(image_embeds, ids, mask, keep_query_states=True)
    model.eval()  # no dropout in the text pass itself: the only randomness left is in the states
    a = model.itg_loss(image_embeds, ids, mask, states)
    b = model.itg_loss(image_embeds, ids, mask, states)
    no_dropout_states = model._itc(image_embeds, ids, mask, keep_query_states=True)[1]
    c = model.itg_loss(image_embeds, ids, mask, no_dropout_states)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(states) == model.qformer.config.num_hidden_layers + 1


def test_itc_image_features_independent_of_text(tok):
    pixels, ids, mask = batch(tok, n=4)
    model = build(tok).eval()
    with torch.no_grad():
        image_embeds = model.image_features(pixels)
        a = model.itc(image_embeds, ids, mask)
        other = ids.clone()
        other[2, 1:4] = other[0, 1:4]
        b = model.itc(image_embeds, other, mask)
    keep = [0, 1, 3]
    # changing text 2 changes only column 2 of image->text and row 2 of text->image
    assert torch.equal(a.sim_i2t[:, keep], b.sim_i2t[:, keep])
    assert torch.equal(a.sim_t2i[keep], b.sim_t2i[keep])
    assert not torch.allclose(a.sim_i2t[:, 2], b.sim_i2t[:, 2])


# --------------------------------------------------------------------------------------------- parity
def test_parity_with_transformers_retrieval_model(tok):
    pixels, ids, mask = batch(tok, n=4)
    model = build(tok).eval()
    hf = Blip2ForImageTextRetrieval(model.config.to_hf()).eval()
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(Blip2Stage1Model.EXTRA_STATE_PREFIXES)}
    assert set(ours) == set(hf.state_dict())
    hf.load_state_dict(ours, strict=True)
    extras = sorted(k for k in model.state_dict() if k not in ours)
    assert extras == ["itg_head.bias", "itg_head.transform.LayerNorm.bias", "itg_head.transform.LayerNorm.weight",
                      "itg_head.transform.dense.bias", "itg_head.transform.dense.weight", "temp"]

    with torch.no_grad():
        hf_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        hf_itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        image_feats, image_embeds = model.image_embeddings(pixels)
        itm = model.itm_scores(image_embeds, ids, mask)
        sim = model.itc_similarity(image_feats, model.text_embeddings(ids, mask))
    assert itm.shape == (4, 2) and sim.shape == (4, 4)
    torch.testing.assert_close(itm, hf_itm.logits_per_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(sim, hf_itc.logits_per_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(image_feats, hf_itc.image_embeds, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- hand-checked math
def _smoothed_ce(logits: list[float], target: int, eps: float) -> float:
    n = len(logits)
    log_z = torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0).item()
    return -sum(((1 - eps) * (c == target) + eps / n) * (logits[c] - log_z) for c in range(n))


def test_itc_loss_matches_direct_computation():
    torch.manual_seed(0)
    b, nq, d, temp, eps = 3, 4, 8, 0.07, 0.1
    img = F.normalize(torch.randn(b, nq, d), dim=-1)
    txt = F.normalize(torch.randn(b, d), dim=-1)
    s = [[max(float(img[i, q] @ txt[j]) for q in range(nq)) / temp for j in range(b)] for i in range(b)]
    i2t = sum(_smoothed_ce(s[i], i, eps) for i in range(b)) / b
    t2i = sum(_smoothed_ce([s[i][j] for i in range(b)], j, eps) for j in range(b)) / b
    out = itc_loss(img, txt, torch.tensor(temp), label_smoothing=eps)
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)
    assert torch.equal(out.targets, torch.arange(b))

    # image ids: all distinct -> the same loss; a shared image -> both columns are positives
    distinct = itc_loss(img, txt, torch.tensor(temp), label_smoothing=eps, image_ids=torch.tensor([5, 6, 7]))
    assert distinct.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    ids = [0, 0, 1]
    shared = itc_loss(img, txt, torch.tensor(temp), label_smoothing=eps, image_ids=torch.tensor(ids))

    def soft_ce(logits, row):
        pos = [float(ids[c] == ids[row]) for c in range(b)]
        q = [(1 - eps) * p / sum(pos) + eps / b for p in pos]
        log_z = torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0).item()
        return -sum(q[c] * (logits[c] - log_z) for c in range(b))

    i2t_soft = sum(soft_ce(s[i], i) for i in range(b))
    t2i_soft = sum(soft_ce([s[i][j] for i in range(b)], j) for j in range(b))
    manual = (i2t_soft + t2i_soft) / (2 * b)
    assert shared.loss.item() == pytest.approx(manual, abs=1e-5)

    # B = 1 (no .squeeze() trap): a single column, loss 0 without smoothing
    one = itc_loss(img[:1], txt[:1], torch.tensor(temp))
    assert one.sim_i2t.shape == (1, 1) and one.loss.item() == pytest.approx(0.0, abs=1e-7)


def test_itm_loss_matches_pairwise_computation(tok):
    pixels, ids, mask = batch(tok, n=4)
    model = build(tok).eval()
    with torch.no_grad():
        image_embeds = model.image_features(pixels)
        itc = model.itc(image_embeds, ids, mask)
        torch.manual_seed(123)
        loss = model.itm_loss(image_embeds, ids, mask, itc)
        torch.manual_seed(123)
        neg = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i)
        assert bool(neg.image_valid.all() and neg.text_valid.all())
        assert not bool((neg.image_index == torch.arange(4)).any() or (neg.text_index == torch.arange(4)).any())

        def ce(image, text, label):
            logits = model.itm_scores(image_embeds[image : image + 1], ids[text : text + 1], mask[text : text + 1])
            return F.cross_entropy(logits, torch.tensor([label])).item()

        terms = [ce(k, k, 1) for k in range(4)]
        terms += [ce(int(neg.image_index[k]), k, 0) for k in range(4)]  # text k, negative image
        terms += [ce(k, int(neg.text_index[k]), 0) for k in range(4)]  # image k, negative text
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_hard_negative_sampling_batch_of_one(tok):
    neg = sample_hard_negatives(torch.tensor([[3.0]]), torch.tensor([[3.0]]))
    assert not bool(neg.image_valid.any()) and not bool(neg.text_valid.any())

    pixels, ids, mask = batch(tok, n=1)
    model = build(tok).eval()
    torch.manual_seed(0)
    out = model(pixels, ids, mask)
    assert all(torch.isfinite(out[k]) for k in out)
    with torch.no_grad():
        logits = model.itm_scores(model.image_features(pixels), ids, mask)
    # no negative exists: ITM is the positive pair alone
    assert out["loss_itm"].item() == pytest.approx(F.cross_entropy(logits, torch.tensor([1])).item(), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hard_negative_sampling_is_nan_safe(dtype):
    big = torch.finfo(dtype).max
    inf, nan = float("inf"), float("nan")
    sim = torch.tensor(
        [
            [inf, big, -big, 1.0],  # positive at +inf, the largest finite value next to it
            [big, inf, big, big],
            [-inf, -inf, inf, nan],  # only -inf/NaN negatives: still a valid row
            [nan, nan, nan, nan],
        ]
    ).to(dtype)
    weights, valid = negative_weights(sim, torch.eye(4, dtype=torch.bool))
    assert weights.dtype == torch.float32 and bool(torch.isfinite(weights).all()) and bool(valid.all())
    assert bool((weights.diagonal() == 0).all()) and bool((weights.sum(1) > 0).all())
    gen = torch.Generator().manual_seed(0)
    drawn_images, drawn_texts = set(), set()
    for _ in range(200):
        neg = sample_hard_negatives(sim, sim.t().contiguous(), generator=gen)
        assert not bool((neg.image_index == torch.arange(4)).any())
        assert not bool((neg.text_index == torch.arange(4)).any())
        drawn_images.add(int(neg.image_index[0]))
        drawn_texts.add(int(neg.text_index[3]))
    assert drawn_images == {1}  # row 0 puts (almost) all mass on the largest finite similarity
    assert len(drawn_texts) > 1


# --------------------------------------------------------------------------------------------- BERT init
def tiny_bert_config(tok, **overrides) -> BertConfig:
    values = dict(vocab_size=len(tok) - 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    values.update(overrides)
    return BertConfig(**values)


def test_init_from_bert_masked_lm(tok):
    torch.manual_seed(0)
    bert = BertForMaskedLM(tiny_bert_config(tok))
    bert_sd = bert.state_dict()
    model = build(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_qformer_from_bert(model, bert_sd)
    after = model.state_dict()
    vocab = len(tok) - 1

    assert sorted(report.unused) == ["bert.embeddings.token_type_embeddings.weight", "cls.predictions.decoder.bias",
                                     "cls.predictions.decoder.weight"]
    assert set(report.used) | set(report.unused) == set(bert_sd)
    assert report.left_random and all(".crossattention." in k for k in report.left_random)
    assert report.extra_rows == {"embeddings.word_embeddings.weight": 1, "itg_head.bias": 1}
    for k in report.left_random:
        assert torch.equal(after[k], before[k])

    word = after["embeddings.word_embeddings.weight"]
    assert torch.equal(word[:vocab], bert_sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(word[vocab], before["embeddings.word_embeddings.weight"][vocab])  # [DEC] keeps its init
    bert_positions = bert_sd["bert.embeddings.position_embeddings.weight"]
    assert torch.equal(after["embeddings.position_embeddings.weight"], bert_positions[:64])  # 128 -> our 64
    assert torch.equal(after["qformer.layernorm.weight"], bert_sd["bert.embeddings.LayerNorm.weight"])
    for i in range(2):
        q, b = f"qformer.encoder.layer.{i}.", f"bert.encoder.layer.{i}."
        assert torch.equal(after[q + "attention.attention.key.weight"], bert_sd[b + "attention.self.key.weight"])
        assert torch.equal(after[q + "attention.output.LayerNorm.bias"], bert_sd[b + "attention.output.LayerNorm.bias"])
        for text, query in (("intermediate.dense", "intermediate_query.dense"), ("output.dense", "output_query.dense"),
                            ("output.LayerNorm", "output_query.LayerNorm")):
            for p in ("weight", "bias"):
                assert torch.equal(after[f"{q}{query}.{p}"], after[f"{q}{text}.{p}"])
                assert torch.equal(after[f"{q}{text}.{p}"], bert_sd[f"{b}{text}.{p}"])
    assert torch.equal(after["itg_head.transform.dense.weight"], bert_sd["cls.predictions.transform.dense.weight"])
    assert torch.equal(after["itg_head.bias"][:vocab], bert_sd["cls.predictions.bias"])

    # With BERT's weights the ITG head reproduces BERT's MLM logits on the shared vocabulary.
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        ours = model.itg_head(hidden, model.embeddings.word_embeddings.weight)
        theirs = bert.cls(hidden)
    torch.testing.assert_close(ours[..., :vocab], theirs)


def test_init_from_bert_model_without_mlm_head(tok):
    bert_sd = BertModel(tiny_bert_config(tok)).state_dict()
    model = build(tok)
    itg_before = {k: v.clone() for k, v in model.itg_head.state_dict().items()}
    report = init_qformer_from_bert(model, bert_sd)
    assert sorted(report.unused) == [
        "embeddings.token_type_embeddings.weight", "pooler.dense.bias", "pooler.dense.weight"
    ]
    assert {k for k in report.left_random if not k.startswith("itg_head.")} == {
        k for k in report.left_random if ".crossattention." in k
    }
    for k, v in model.itg_head.state_dict().items():
        assert torch.equal(v, itg_before[k])

    with pytest.raises(ValueError, match="lacks"):
        init_qformer_from_bert(model, BertModel(tiny_bert_config(tok, num_hidden_layers=3)).state_dict())
    with pytest.raises(ValueError, match="shape"):
        init_qformer_from_bert(model, BertModel(tiny_bert_config(tok, intermediate_size=48)).state_dict())


# --------------------------------------------------------------------------------------------- stage 1 -> 2
def test_transfer_to_stage2(tok):
    pixels, _, _ = batch(tok, n=2)
    stage1 = build(tok).eval()
    opt = OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    config2 = dataclasses.replace(
        model_config(len(tok), use_qformer_text_input=False), text=opt.to_dict(), stage=2
    )
    torch.manual_seed(1)
    stage2 = Blip2Stage2Model.from_config(config2).eval()
    with torch.no_grad():
        stage1.vision_model.post_layernorm.weight.add_(0.5)  # make ln_vision differ from a fresh init
    transfer = transfer_to_stage2(stage1, stage2)

    expected_unused = {k for k in stage1.state_dict() if k.startswith(
        ("embeddings.", "vision_projection.", "text_projection.", "itm_head.", "itg_head.", "temp"))}
    expected_unused |= {f"qformer.encoder.layer.{i}.{m}.{p}" for i in range(2)
                        for m in ("intermediate.dense", "output.dense", "output.LayerNorm") for p in ("weight", "bias")}
    assert set(transfer.unused) == expected_unused
    s2 = stage2.state_dict()
    for k in transfer.loaded:
        assert torch.equal(s2[k], stage1.state_dict()[k]), k
    with torch.no_grad():
        torch.testing.assert_close(
            stage2.query_outputs(stage2.image_features(pixels)), stage1.query_outputs(stage1.image_features(pixels)),
            atol=0, rtol=0,
        )


# --------------------------------------------------------------------------------------------- learning
def test_total_loss_halves_on_eight_pairs(tok):
    pixels, ids, mask = batch(tok, n=8)
    assert len(set(map(tuple, ids.tolist()))) == 8
    model = build(tok, seed=0).train()  # dropout on, frozen ViT in eval
    # A high learning rate for a tiny, randomly initialised Q-Former (0.02-std weights make every text and
    # image look alike at first; ITC needs a few dozen steps to break that symmetry).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    torch.manual_seed(0)
    losses = []
    for _ in range(100):
        out = model(pixels, ids, mask)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    last = sum(losses[-5:]) / 5
    assert last < 0.5 * losses[0], (losses[0], last)


@pytest.mark.parametrize("rule", ["ours", "lavis"])
def test_weight_decay_groups(tok, rule):
    """optim.weight_decay_groups: "lavis" decays the 0-D temperature and the (1, NQ, D) query tokens as LAVIS's
    get_optimizer_params does by their shapes; "ours" does not. Biases and norms are never decayed."""
    from blip2cli.recipes import OptimSection
    from blip2cli.training.optim import build_optimizer

    model = build(tok)
    optimizer = build_optimizer(model, OptimSection(lr=0.1, weight_decay=0.5, weight_decay_groups=rule))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert ("temp" in names, "query_tokens" in names) == ((True, True) if rule == "lavis" else (False, False))
    assert {"itm_head.weight", "vision_projection.weight"} <= names
    assert not names & {"itm_head.bias", "qformer.layernorm.weight", "vision_model.post_layernorm.weight"}
    # One AdamW step with zero gradients is the decoupled decay alone: p <- p * (1 - lr * wd) = 0.95 p.
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, param in model.named_parameters():
        if name in before:
            expected = before[name] * 0.95 if name in names else before[name]
            torch.testing.assert_close(param.detach(), expected, msg=name)
