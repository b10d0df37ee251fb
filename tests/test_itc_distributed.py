"""ITC across 2 CPU ranks (gloo) equals one process on the combined batch: loss and gradients.

With ``gather_with_grad`` every rank's loss covers its local rows against all B·W columns and the gather's
backward sends each column's gradient home, so the DDP-style mean of the per-rank gradients is the
single-process gradient. LAVIS's no-grad gather gives the same loss but a different gradient.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _itc_step(model: Blip2Stage1Model, pixels, ids, mask) -> tuple[float, dict[str, torch.Tensor]]:
    model.eval()  # no dropout: both sides must compute the same function
    model.zero_grad(set_to_none=True)
    loss = model(pixels, ids, mask)["loss_itc"]
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


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
            loss, grads = _itc_step(model, pixels, ids, mask)
            # What DDP does: average the per-rank gradients (and we average the per-rank losses).
            dist.all_reduce(loss)
            for g in grads.values():
                dist.all_reduce(g)
            results[with_grad] = (loss / WORLD, {n: g / WORLD for n, g in grads.items()})

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


def test_itc_two_ranks_equal_one_process(tmp_path):
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
    # One process, no process group, the whole batch.
    ref_loss, ref_grads = _itc_step(reference, data["pixels"], data["ids"], data["mask"])

    _run_ranks(str(tmp_path), data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

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
