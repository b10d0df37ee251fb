"""``dist.strategy = "fsdp"``: shard a stage-2 model over the processes with PyTorch's FSDP2 (``fully_shard``).

DDP keeps a whole replica of the frozen image encoder and LLM on every GPU; FSDP keeps 1/N of every weight
per process and all-gathers one transformer block at a time, just before it runs. The groups, innermost first:

- every transformer block of the image encoder and of the LLM (the modules whose classes the models name in
  ``_no_split_modules``: decoder layers, T5 blocks, EVA's layers and patch embedding; for towers without
  that list, the entries of their largest ``nn.ModuleList``), each kept in the dtype the recipe stores it
  in (``vision_precision`` / ``llm_precision``);
- the Q-Former (trainable). With ``train.precision`` bf16/fp16 it is all-gathered in that dtype and its
  gradients are reduced in fp32 (``MixedPrecisionPolicy``); its fp32 master weights stay sharded;
- the root: everything else (queries, ``ln_vision``, the projection, the LLM's embeddings, final norm and
  output layer). Gathered for the whole forward, because the model calls some of these modules directly
  rather than through the LLM's ``forward`` (the input embeddings, for the visual prompts).

Frozen and trainable parameters may share a group (FSDP2 reduces only gradients that exist); the trainable
ones of a group must share one dtype, which ``shard_model`` checks. The forward runs under the same
``torch.autocast`` as with DDP: in fp32 the numbers match DDP's up to the order of floating-point sums;
in bf16/fp16 the Q-Former's weights are also rounded to that dtype (FSDP mixed precision), so the losses
differ slightly from DDP's.

Checkpoints use ``torch.distributed.checkpoint.state_dict``: every rank takes part in gathering full
(unsharded) tensors onto rank 0's CPU, which writes the same files as DDP does (``trainable.safetensors``
with the same names; ``optimizer.pt`` keyed by parameter index, as ``Optimizer.state_dict`` is), so a
checkpoint written under one strategy resumes under the other. The final checkpoint gathers every weight
into an unsharded CPU copy on rank 0 (``unsharded_copy``) for ``blip2cli.checkpoint.save_model``.

Not under FSDP: stage 1 (no LLM to shard), in-loop ``eval.task`` generation (ranks would run different
numbers of forward passes), and the save on Ctrl-C (a gather needs every rank at the same point).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from blip2cli.errors import Blip2Error

# Full (unsharded) tensors, gathered onto rank 0's CPU only; the other ranks get empty dicts.
_GATHER = dict(full_state_dict=True, cpu_offload=True)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The modules of an encoder or LLM that become FSDP groups, in order, none inside another.

    transformers models name them in ``_no_split_modules`` (OPTDecoderLayer, T5Block, Blip2EncoderLayer,
    Blip2VisionEmbeddings...); other towers (open_clip) fall back to the entries of the ``nn.ModuleList`` of
    one class holding the most parameters. Each must run through its own ``__call__`` (FSDP gathers its
    weights in a forward pre-hook), which holds for all of these.
    """
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, sub in module.named_modules():
        if sub is module or type(sub).__name__ not in names:
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue  # inside a block already taken (Blip2Attention inside Blip2EncoderLayer)
        blocks.append(sub)
        taken.append(name)
    if blocks:
        return blocks
    lists = [m for m in module.modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def shard_model(model: nn.Module, device: torch.device, world_size: int, amp_dtype: torch.dtype | None) -> nn.Module:
    """Apply ``fully_shard`` in place (block by block, then the Q-Former, then the root) and return ``model``.

    Build the optimizer afterwards: sharding replaces the parameters by ``DTensor`` shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not hasattr(model, "language_model"):
        raise Blip2Error("dist.strategy=fsdp shards stage-2 models (frozen LLM); train stage 1 with dist.strategy=ddp")
    mesh = init_device_mesh(device.type, (world_size,))
    _check_gradients_average(mesh.get_group())
    # A group must own its parameters: one tied to a module outside it (an LLM whose output layer shares
    # an embedding listed as a block) would be sharded twice. Such modules stay in the root group.
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    module_names = {id(m): name for name, m in model.named_modules()}

    def self_contained(module: nn.Module) -> bool:
        prefix = module_names[id(module)] + "."
        return all(name.startswith(prefix) for p in module.parameters() for name in owners[id(p)])

    groups: list[tuple[str, nn.Module]] = []
    for part in ("vision_model", "language_model"):
        groups += [(f"{part} block", block) for block in transformer_blocks(getattr(model, part))
                   if self_contained(block)]
    if not any(kind.startswith("language_model") for kind, _ in groups):
        raise Blip2Error(f"dist.strategy=fsdp: found no transformer blocks in the LLM "
                         f"({type(model.language_model).__name__}) to shard; use dist.strategy=ddp")
    if self_contained(model.qformer):
        groups.append(("qformer", model.qformer))
    grouped = {id(p) for _, m in groups for p in m.parameters()}
    groups.append(("root", model))
    for kind, module in groups:
        own = [p for p in module.parameters() if kind != "root" or id(p) not in grouped]
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in own if p.requires_grad})
        if len(dtypes) > 1:
            raise Blip2Error(
                f"dist.strategy=fsdp: the trainable parameters of one sharded group ({kind}) mix dtypes "
                f"({', '.join(dtypes)}); keep a trainable image encoder in fp32 (model.vision_precision=fp32) "
                "or use dist.strategy=ddp"
            )
    # FSDP2 warns when a wrapped module returns a view, in case the caller modifies it in place (which
    # would skip the backward all-gather). These modules' callers never do (checked in transformers' OPT,
    # T5, BLIP-2 code; tests/test_training.py compares FSDP with DDP); other modules keep the warning.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(OPTDecoderLayer|T5Block|"
                            r"Blip2EncoderLayer|Blip2QFormerModel)\) returned a view tensor")
    qformer_policy = MixedPrecisionPolicy()
    if amp_dtype is not None:
        # The Q-Former's weights travel and compute in the autocast dtype; its gradients are reduced in fp32.
        # The frozen parts keep the dtype the recipe stores them in; the root keeps ln_vision in fp32.
        qformer_policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for kind, module in groups:
        fully_shard(module, mesh=mesh, mp_policy=qformer_policy if kind == "qformer" else MixedPrecisionPolicy())
    return model


def _check_gradients_average(group) -> None:
    """FSDP2 averages gradients with ``reduce_scatter_tensor(op=AVG)``. Gloo (CPU) ignored the op before some
    torch release after 2.8 and summed, so gradients came out world-size times too large, silently (seen on
    torch 2.7 and 2.8; 2.6 fails outright on CPU). NCCL has always averaged. One tiny collective at start
    turns that into a one-line error."""
    import torch.distributed as dist

    if dist.get_backend(group) != "gloo":
        return
    world_size = group.size()
    averaged = torch.zeros(1)
    try:
        dist.reduce_scatter_tensor(averaged, torch.ones(world_size), op=dist.ReduceOp.AVG, group=group)
        works = averaged.item() == 1.0
    except (RuntimeError, ValueError):
        works = False
    if not works:
        raise Blip2Error(f"dist.strategy=fsdp on CPU (gloo) needs a newer torch: {torch.__version__}'s gloo does "
                         "not average gradients the way FSDP asks; use dist.strategy=ddp or torch 2.14")


# --------------------------------------------------------------------------- checkpoints
def _trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order ``Optimizer.state_dict`` numbers them (group by group)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full trainable weights and optimizer state, on rank 0's CPU (empty dicts elsewhere).

    A collective: every rank must call it at the same point. The optimizer state comes back keyed like
    ``Optimizer.state_dict()`` (parameter indices), the layout of DDP checkpoints.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(**_GATHER, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    names = set(_trainable_names(model))
    weights = {k: v.contiguous() for k, v in weights.items() if k in names}  # drop buffers
    named = get_optimizer_state_dict(model, optimizer, options=options)
    if not named:
        return weights, {}
    index = {name: i for i, name in enumerate(_optimizer_order(model, optimizer))}
    state = {
        "state": {index[name]: value for name, value in named["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in named["param_groups"]],
    }
    return weights, state


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                        optimizer_state: dict[str, Any]) -> None:
    """Set a sharded model's trainable weights and its optimizer state from full (unsharded) ones that every
    rank has read; each rank keeps its own shard. A collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    missing = set(_trainable_names(model)) - set(weights)
    if missing:  # strict=False would silently keep them at their initial values
        raise Blip2Error(f"the checkpoint lacks trainable weights {sorted(missing)[:3]}")
    set_model_state_dict(model, dict(weights), options=options)
    order = _optimizer_order(model, optimizer)
    named = {
        "state": {order[int(i)]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                         for group in optimizer_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded) CPU copy of ``model`` for ``blip2cli.checkpoint.save_model``, on rank 0; None on
    the other ranks. A collective: every weight, frozen ones included, is gathered onto rank 0's CPU."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model, options=StateDictOptions(**_GATHER))
    if dist.get_rank() != 0:
        return None
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swapped the model's class for a subclass (FSDPBlip2Stage2Model): build the original one.
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        skeleton = cls.from_config(copy.deepcopy(model.config))
    _, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    if hasattr(skeleton, "language_model"):
        skeleton.language_model.tie_weights()  # a tied output layer shares the input embeddings again
    missing = [name for name, p in skeleton.named_parameters() if p.is_meta]
    if unexpected or missing:
        raise Blip2Error(f"cannot rebuild the unsharded model: unexpected {unexpected[:3]}, missing {missing[:3]}")
    # Non-persistent buffers (position ids, rotary tables) are not in a state dict: take them from the model.
    buffers = dict(model.named_buffers())
    for name, buffer in skeleton.named_buffers():
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            skeleton.get_submodule(owner).register_buffer(leaf, buffers[name].detach().cpu(), persistent=False)
    return skeleton.eval()
