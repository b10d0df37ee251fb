"""Stage 1 across 2 CPU ranks (gloo) against one process: loss and gradients.

- ITC with ``gather_with_grad`` (ours): every rank's loss covers its local rows against all B·W columns and
  the gather's backward sends each column's gradient home, so the DDP-style mean of the per-rank gradients
  is the single-process gradient. LAVIS's no-grad gather gives the same loss but a different gradient.
- The LAVIS mode (``gather_with_grad=False``) equals a port of LAVIS ``Blip2Qformer.forward`` run rank by
  rank in one process: ITC against constant gathered features, ITM with the negative images gathered *with*
  gradient, so an image drawn as the other rank's negative gets its gradient (through ln_vision).
- Gradient accumulation in stage 1 is refused under two processes, in one line, before any model is built.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import pytest

from blip2cli.models import Blip2Stage1Model, Stage1LossConfig
from tests import tiny
from tests.test_stage1 import model_config

WORLD = 2
PER_RANK = 3
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(vocab_size: int, dec_id: int, state: dict, **loss) -> Blip2Stage1Model:
    model = Blip2Stage1Model.from_config(
        model_config(vocab_size), Stage1LossConfig(**loss), dec_token_id=dec_id, pad_token_id=0
    )
    model.load_state_dict(state)
    # float64: the comparison then checks the maths, not fp32 rounding (d loss / d temp scales rounding
    # errors by 1/temp², so fp32 agrees only to ~1e-3 relative on some gradients).
    return model.double()


def _itc_step(model: Blip2Stage1Model, pixels, ids, mask, key: str = "loss_itc") -> tuple[float, dict[str, torch.Tensor]]:
    model.eval()  # no dropout: both sides must compute the same function
    model.zero_grad(set_to_none=True)
    loss = model(pixels, ids, mask)[key]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _ddp_mean(loss: torch.Tensor, grads: dict[str, torch.Tensor]):
    """What DDP does: average the per-rank gradients (and we average the per-rank losses)."""
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
    return loss / WORLD, {n: g / WORLD for n, g in grads.items()}


def _lavis_step(data: dict, pixels, ids, mask, rank: int):
    """LAVIS mode, ITC + ITM (ITG off), recording the hard negatives this rank draws (a spy around the real
    sampler: the ranks' draws are what the one-process reference needs)."""
    from blip2cli.models import stage1

    drawn, sample = [], stage1.sample_hard_negatives

    def recording(*args, **kwargs):
        drawn.append(sample(*args, **kwargs))
        return drawn[-1]

    stage1.sample_hard_negatives = recording
    try:
        model = _build(data["vocab"], data["dec"], data["state"], itg_weight=0.0, gather_with_grad=False)
        torch.manual_seed(100 + rank)
        loss, grads = _itc_step(model, pixels, ids, mask, key="loss")
    finally:
        stage1.sample_hard_negatives = sample
    (neg,) = drawn
    return (*_ddp_mean(loss, grads), {"image_index": neg.image_index, "text_index": neg.text_index})


def _accumulation_refusal(out_dir: str, rank: int) -> str:
    """``train`` under this process group with a recipe that needs 2 micro-batches per step."""
    from blip2cli.errors import Blip2Error
    from blip2cli.recipes import load_recipe
    from blip2cli.training.loop import train

    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    recipe = load_recipe("tiny_stage1", ["data.global_batch_size=16", "~train.allow_contrastive_accumulation"])
    try:
        train(recipe, Path(out_dir) / "refused", shards=["/nonexistent/shard.tar"], device="cpu")
    except Blip2Error as err:
        return str(err)
    return "not refused"


def _worker(rank: int, port: int, out_dir: str, data: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        pixels, ids, mask = data["pixels"][local], data["ids"][local], data["mask"][local]
        results = {}
        for with_grad in (True, False):
            model = _build(data["vocab"], data["dec"], data["state"], itm_weight=0.0, itg_weight=0.0,
                           gather_with_grad=with_grad)
            results[with_grad] = _ddp_mean(*_itc_step(model, pixels, ids, mask))
        results["lavis"] = _lavis_step(data, pixels, ids, mask, rank)
        results["refusal"] = _accumulation_refusal(out_dir, rank)

        # All three losses across ranks, dropout on, ranks padding their text to different lengths
        # (exercises the ITM gathers of image features and of unequal-length token ids).
        model = _build(data["vocab"], data["dec"], data["state"]).train()
        length = int(mask.sum(1).max()) if rank == 1 else ids.shape[1]
        out = model(pixels, ids[:, :length], mask[:, :length])
        out["loss"].backward()
        results["full"] = {k: v.item() for k, v in out.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ranks(out_dir: str, data: dict) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), out_dir, data), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed ITC workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One spawn of the two gloo ranks for every test here: (data, reference model, per-rank results)."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    tok = tiny.bert_tokenizer()
    n = WORLD * PER_RANK
    text = tok(tiny.CAPTIONS[:n], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    torch.manual_seed(0)
    reference = Blip2Stage1Model.from_config(
        model_config(len(tok)), Stage1LossConfig(itm_weight=0.0, itg_weight=0.0), dec_token_id=tok.bos_token_id
    ).double()
    data = {
        "pixels": torch.randn(n, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, dtype=torch.float64),
        "ids": text.input_ids,
        "mask": text.attention_mask,
        "vocab": len(tok),
        "dec": tok.bos_token_id,
        "state": {k: v.clone() for k, v in reference.state_dict().items()},
    }
    _run_ranks(str(tmp_path), data)
    return data, reference, [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def test_itc_two_ranks_equal_one_process(two_ranks):
    data, reference, ranks = two_ranks
    # One process, no process group, the whole batch.
    ref_loss, ref_grads = _itc_step(reference, data["pixels"], data["ids"], data["mask"])

    loss, grads = ranks[0][True]
    checked = ["vision_projection.weight", "vision_projection.bias", "text_projection.weight", "query_tokens", "temp",
               "vision_model.post_layernorm.weight", "qformer.encoder.layer.0.crossattention.attention.value.weight"]
    assert set(grads) == set(ref_grads) and set(checked) <= set(grads)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-12, rtol=1e-9, msg=name)
    # every rank ends with the same averaged gradient
    for name in checked:
        assert torch.equal(ranks[1][True][1][name], grads[name])

    # LAVIS's no-grad gather: the same loss, the same temperature gradient, but features only get
    # gradient as the anchor of their own rows, so the projection gradients differ.
    loss_ng, grads_ng = ranks[0][False]
    torch.testing.assert_close(loss_ng, ref_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads_ng["temp"], ref_grads["temp"], atol=1e-12, rtol=1e-9)
    for name in ("text_projection.weight", "vision_projection.weight", "query_tokens"):
        assert not torch.allclose(grads_ng[name], ref_grads[name], atol=1e-8, rtol=1e-3), name

    for r in range(WORLD):
        full = ranks[r]["full"]
        assert all(torch.isfinite(torch.tensor(v)) for v in full.values()), full
        assert full["loss_itc"] > 0 and full["loss_itm"] > 0 and full["loss_itg"] > 0


def _lavis_reference(model: Blip2Stage1Model, data: dict, negatives: list[dict], itm_images_with_grad: bool = True):
    """LAVIS ``Blip2Qformer.forward`` (ITC + ITM), its two ranks replayed in one process, written from its
    source rather than from ours: per rank, ITC of the local rows against ``concat_all_gather``'d features
    (constants, the local slice too) with label smoothing 0.1; ITM over (text, image) positives, (text, drawn
    negative image) and (drawn negative text, image) with the images from ``all_gather_with_grad``. DDP then
    averages the ranks' gradients: the gradient of the mean of the per-rank losses.

    ``itm_images_with_grad=False`` detaches the other rank's images, as our LAVIS mode did before."""
    model.eval()
    model.zero_grad(set_to_none=True)
    ids, mask = data["ids"], data["mask"]
    image_embeds = model.image_features(data["pixels"])  # ln_vision output: trainable
    image_feats = model.image_feats(image_embeds)  # (N, NQ, D)
    text_feat = model.text_embeddings(ids, mask)  # (N, D)
    total = 0.0
    for rank in range(WORLD):
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        image_feats_all, text_feat_all = image_feats.detach(), text_feat.detach()  # concat_all_gather
        sim_q2t = torch.matmul(image_feats[local].unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1)
        sim_i2t = sim_q2t.max(-1).values / model.temp
        sim_t2q = torch.matmul(text_feat[local].unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)).squeeze(2)
        sim_t2i = sim_t2q.max(-1).values / model.temp
        targets = torch.arange(PER_RANK) + rank * PER_RANK
        loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                    + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2

        image_embeds_world = image_embeds  # all_gather_with_grad
        if not itm_images_with_grad:
            keep = torch.zeros(len(image_embeds), 1, 1, dtype=torch.bool)
            keep[local] = True
            image_embeds_world = torch.where(keep, image_embeds, image_embeds.detach())
        neg = negatives[rank]
        pair_images = torch.cat([image_embeds[local], image_embeds_world[neg["image_index"]], image_embeds[local]])
        pair_ids = torch.cat([ids[local], ids[local], ids[neg["text_index"]]])
        pair_mask = torch.cat([mask[local], mask[local], mask[neg["text_index"]]])
        logits = model.itm_scores(pair_images, pair_ids, pair_mask)  # mean over queries of itm_head
        labels = torch.cat([torch.ones(PER_RANK, dtype=torch.long), torch.zeros(2 * PER_RANK, dtype=torch.long)])
        total = total + loss_itc + F.cross_entropy(logits, labels)
    loss = total / WORLD
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lavis_mode_reproduces_lavis_gradient_flow_across_two_ranks(two_ranks):
    data, _, ranks = two_ranks
    negatives = [ranks[r]["lavis"][2] for r in range(WORLD)]
    # the check means something only if a rank drew an image of the other rank as a negative
    assert any((neg["image_index"] // PER_RANK != r).any() for r, neg in enumerate(negatives)), negatives
    lavis = _build(data["vocab"], data["dec"], data["state"], itg_weight=0.0)
    ref_loss, ref_grads = _lavis_reference(lavis, data, negatives)

    loss, grads = ranks[0]["lavis"][:2]
    assert set(grads) == set(ref_grads) and "vision_model.post_layernorm.weight" in grads
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-12, rtol=1e-9, msg=name)
        assert torch.equal(ranks[1]["lavis"][1][name], grads[name])
    # without the gradient into the other rank's negative images (our LAVIS mode before), ln_vision's
    # gradient is not LAVIS's
    _, cut = _lavis_reference(lavis, data, negatives, itm_images_with_grad=False)
    for name in ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"):
        assert not torch.allclose(cut[name], ref_grads[name], atol=1e-10, rtol=1e-6), name
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-12, rtol=1e-9)


def test_stage1_accumulation_refused_under_two_processes(two_ranks):
    _, _, ranks = two_ranks
    for r in range(WORLD):
        message = ranks[r]["refusal"]
        assert "\n" not in message and "2 micro-batches of 4" in message, message
        assert "negatives from 8 samples instead of 16" in message and "data.micro_batch_size=8" in message
