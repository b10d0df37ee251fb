"""Stage-1 loss pieces that do not need the model: cross-rank gathers, ITC, hard-negative sampling.

Everything works with and without a process group: with none (or world size 1) the gathers return their
input unchanged and the rank is 0, so one process computes the exact single-batch loss (LAVIS #537 crashed
here). Under W > 1 every rank must hold the same per-rank batch size B (drop_last; never filter samples
after collation): the ITC targets of rank r are ``r * B + arange(B)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from blip2cli.distributed import group_rank_and_world


# --------------------------------------------------------------------------------------------- gathers
class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands every rank the sum of all ranks' gradients for its slice.

    Deliberately not ``torch.distributed.nn.functional.all_gather`` (deprecated in torch 2.14): on gloo its
    backward scatters into buffers laid out like the incoming gradients, which are non-contiguous here (the
    einsum backward gives a transposed layout), and gloo's scatter writes non-contiguous tensors wrongly
    (pytorch/pytorch#192920), so the gradients came out silently wrong (tests/test_itc_distributed.py).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if grad.is_cuda:
            # NCCL: reduce-scatter moves only each rank's own slice.
            out = grad.new_empty((ctx.batch, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        grad = grad.clone()  # all_reduce works in place; never modify the incoming gradient
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 *with* autograd: the backward sums every rank's gradient for this rank's
    slice, so (after DDP's gradient averaging) the result equals one big batch of B·W. Every rank must
    pass the same shape."""
    if group_rank_and_world()[1] == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 as constants (LAVIS ``concat_all_gather``). With W = 1 the input itself is
    returned, gradient included, exactly as LAVIS does; with W > 1 every slice, the local one too, is a
    constant, so a feature gets gradient only as the anchor of its own rows. Same shape on every rank."""
    world = group_rank_and_world()[1]
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def gather(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    return gather_with_grad(tensor) if with_grad else gather_no_grad(tensor)


def gather_padded(tensor: torch.Tensor, pad_value: int | float) -> torch.Tensor:
    """No-grad gather of (B, T, ...) tensors whose T may differ across ranks (dynamic padding): pad every
    rank's T to the global maximum on the right first. One extra tiny all-gather of the lengths."""
    if group_rank_and_world()[1] == 1:
        return tensor
    length = torch.tensor([tensor.shape[1]], device=tensor.device)
    longest = int(gather_no_grad(length).max())
    if tensor.shape[1] < longest:
        pad = tensor.new_full((tensor.shape[0], longest - tensor.shape[1], *tensor.shape[2:]), pad_value)
        tensor = torch.cat([tensor, pad], dim=1)
    return gather_no_grad(tensor)


# --------------------------------------------------------------------------------------------- ITC
class ItcOutput(NamedTuple):
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # (B, B·W) local images vs global texts, divided by the temperature (>= fp32)
    sim_t2i: torch.Tensor  # (B, B·W) local texts vs global images, divided by the temperature (>= fp32)
    targets: torch.Tensor  # (B,) index of each local sample's positive among the B·W columns


def query_max_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """BLIP-2's image-text similarity: (Ni, NQ, D) x (Nt, D) -> (Ni, Nt), the maximum over queries of the
    dot products (cosine similarities for normalised features). Computed in fp32 (or fp64)."""
    return torch.einsum("iqd,td->itq", at_least_fp32(image_feats), at_least_fp32(text_feats)).amax(dim=-1)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 to fp32 for loss math; leave fp32/fp64 alone."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temp: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    gather_with_grad: bool = False,
    image_ids: torch.Tensor | None = None,
) -> ItcOutput:
    """Image-text contrastive loss with in-batch negatives from every rank (spec section (b)).

    ``image_feats`` (B, NQ, D) and ``text_feats`` (B, D) are the local, normalised projections; ``temp``
    the (learnable) temperature. Columns are the gathered batch of B·W: ``gather_with_grad=False`` (the
    default) is LAVIS's no-grad ``concat_all_gather``; ``True`` lets the gradient flow into other ranks'
    features (the exact big-batch gradient).

    ``image_ids`` (B,) switches to the retrieval-finetune targets: every same-image column is a positive,
    target row = (1 - ε)·pos/Σpos + ε/N with ε = ``label_smoothing``. With one positive per row this is
    exactly cross-entropy with label smoothing ε, the default path.
    """
    rank = group_rank_and_world()[0]
    batch = image_feats.shape[0]
    image_all = gather(image_feats, gather_with_grad)
    text_all = gather(text_feats, gather_with_grad)
    temp = at_least_fp32(temp)
    sim_i2t = query_max_similarity(image_feats, text_all) / temp  # (B, B·W)
    sim_t2i = query_max_similarity(image_all, text_feats).t() / temp  # (B, B·W)
    targets = torch.arange(batch, device=image_feats.device) + rank * batch

    if image_ids is None:
        loss = 0.5 * (
            F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
        )
    else:
        positives = same_image(image_ids, gather_no_grad(image_ids)).to(sim_i2t.dtype)
        soft = (1.0 - label_smoothing) * positives / positives.sum(dim=1, keepdim=True)
        soft = soft + label_smoothing / positives.shape[1]
        loss = 0.5 * (
            -(F.log_softmax(sim_i2t, dim=1) * soft).sum(dim=1).mean()
            - (F.log_softmax(sim_t2i, dim=1) * soft).sum(dim=1).mean()
        )
    return ItcOutput(loss, sim_i2t, sim_t2i, targets)


def same_image(local_ids: torch.Tensor, global_ids: torch.Tensor) -> torch.Tensor:
    """(B,) x (N,) image ids -> (B, N) bool, True where the column shows the row's image."""
    return local_ids.reshape(-1, 1) == global_ids.reshape(1, -1)


# --------------------------------------------------------------------------------------------- ITM negatives
class HardNegatives(NamedTuple):
    image_index: torch.Tensor  # (B,) for each local text, a negative image among the B·W gathered ones
    text_index: torch.Tensor  # (B,) for each local image, a negative text among the B·W gathered ones
    image_valid: torch.Tensor  # (B,) bool: False where no negative image exists (that pair gets weight 0)
    text_valid: torch.Tensor  # (B,) bool


def negative_weights(
    sim: torch.Tensor, positives: torch.Tensor, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling weights ∝ softmax(sim) over the allowed columns, made safe for ``torch.multinomial``.

    LAVIS (#107) computes these in autocast precision with an unclamped temperature and gets inf/NaN.
    Here: fp32; inf/NaN similarities are replaced by finite values first; positives are masked with a large
    finite negative and then zeroed exactly (never sampled); a tiny epsilon keeps every allowed column
    possible when softmax underflows. A row with no allowed column (a global batch of 1, or every sample
    showing the same image) gets dummy uniform weights and ``valid = False``.

    Returns (weights (B, N) fp32, valid (B,) bool).
    """
    finite_max = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(sim.detach().float(), nan=0.0, posinf=finite_max, neginf=-finite_max)
    allowed = ~positives
    logits = logits.masked_fill(positives, torch.finfo(torch.float32).min)
    weights = torch.softmax(logits, dim=1)
    weights = torch.nan_to_num(weights, nan=0.0) * allowed + eps * allowed
    valid = allowed.any(dim=1)
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return weights, valid


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    positives: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> HardNegatives:
    """Draw one hard negative per local text (an image) and per local image (a text), ∝ ITC similarity.

    ``sim_i2t``/``sim_t2i`` are the (B, B·W) temperature-scaled similarities from ``itc_loss``;
    ``positives`` (B, B·W) bool marks the columns that must never be drawn (default: each sample's own
    column ``rank·B + k``; with image ids, every same-image column). Both directions are drawn in one
    ``torch.multinomial`` call, instead of LAVIS's per-row Python loop with an ``.item()`` each.
    """
    batch, columns = sim_i2t.shape
    if positives is None:
        rank, _ = group_rank_and_world()
        own = torch.arange(batch, device=sim_i2t.device) + rank * batch
        positives = torch.zeros(batch, columns, dtype=torch.bool, device=sim_i2t.device)
        positives[torch.arange(batch, device=sim_i2t.device), own] = True
    w_t2i, image_valid = negative_weights(sim_t2i, positives)  # a negative image for each text
    w_i2t, text_valid = negative_weights(sim_i2t, positives)  # a negative text for each image
    drawn = torch.multinomial(torch.cat([w_t2i, w_i2t]), 1, generator=generator).view(2, batch)
    return HardNegatives(drawn[0], drawn[1], image_valid, text_valid)
