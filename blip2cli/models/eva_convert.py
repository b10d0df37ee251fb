"""EVA ViT weights (timm ``Eva`` / open_clip ``EVA01-g-14`` / LAVIS ``eva_vit_g.pth``) -> transformers
``Blip2VisionModel`` keys (spec (d)).

The three sources share timm's parameter names (``cls_token``, ``blocks.i.attn.q_bias``...), only the
prefix differs (``visual.trunk.``, ``trunk.``, ``visual_encoder.``...), so one mapping serves all:

=================================  ====================================================
timm ``Eva``                       ``Blip2VisionModel``
=================================  ====================================================
``cls_token`` / ``pos_embed``      ``embeddings.class_embedding`` / ``position_embedding``
``patch_embed.proj.*``             ``embeddings.patch_embedding.*``
``blocks.i.norm1`` / ``norm2``     ``encoder.layers.i.layer_norm1`` / ``layer_norm2``
``blocks.i.attn.qkv.weight``       ``encoder.layers.i.self_attn.qkv.weight``
``blocks.i.attn.q_bias, v_bias``   ``encoder.layers.i.self_attn.qkv.bias`` = cat(q, 0, v)
``blocks.i.attn.proj.*``           ``encoder.layers.i.self_attn.projection.*``
``blocks.i.mlp.fc1/fc2.*``         ``encoder.layers.i.mlp.fc1/fc2.*``
last block, ``norm``, head         dropped (BLIP-2 uses penultimate-block features)
=================================  ====================================================

``post_layernorm`` (BLIP-2's ``ln_vision``) has no source: it is trained by BLIP-2 itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2VisionConfig

# Source keys that exist in EVA checkpoints but have no place in BLIP-2's truncated tower.
_DROPPED = re.compile(r"^(norm|fc_norm|head|head_drop|attn_pool)\.")


def eva_vit_g_config(image_size: int = 224) -> Blip2VisionConfig:
    """EVA01-CLIP ViT-g/14 as BLIP-2 uses it: 40 blocks minus the last, no final norm."""
    return Blip2VisionConfig(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )


def _unwrap_timm_eva(model: nn.Module) -> nn.Module:
    """Accept an open_clip CLIP (``.visual``), an open_clip ``TimmModel`` (``.trunk``) or a timm ``Eva``."""
    if hasattr(model, "visual"):
        model = model.visual
    if hasattr(model, "trunk") and isinstance(model.trunk, nn.Module):
        model = model.trunk
    return model


def _check_timm_eva(eva: nn.Module) -> None:
    """Refuse timm EVA variants that ``Blip2VisionModel`` cannot express exactly (EVA02 and friends).

    Most of these would also show up as leftover keys, but RoPE, the activation and class-token handling
    have no parameters of their own, so they are checked on the module.
    """
    from timm.layers import Mlp
    from timm.models.eva import EvaAttention, EvaBlock

    problems = []
    if getattr(eva, "rope", None) is not None:
        problems.append("rotary position embeddings")
    if getattr(eva, "cls_token", None) is None or getattr(eva, "num_prefix_tokens", 1) != 1:
        problems.append("no class token or extra register tokens")
    if getattr(eva, "pos_embed", None) is None or getattr(eva, "no_embed_class", False):
        problems.append("no absolute position embedding for the class token")
    if not isinstance(getattr(eva, "norm_pre", nn.Identity()), nn.Identity):
        problems.append("a norm before the blocks")
    for block in eva.blocks:
        attn, mlp = block.attn, block.mlp
        if type(block) is not EvaBlock or block.gamma_1 is not None or block.gamma_2 is not None:
            problems.append("post-norm blocks or layer scale")
        if not isinstance(attn, EvaAttention) or attn.qkv is None or attn.q_bias is None:
            problems.append("unfused qkv or no q/v biases")
        elif attn.gate is not None or any(
            not isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)
        ):
            problems.append("qk-norm, an inner attention norm or gating")
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            problems.append("a SwiGLU or normalised MLP")
        elif not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            problems.append("an activation other than exact GELU")
    if problems:
        found = "; ".join(dict.fromkeys(problems))
        raise ValueError(f"this EVA has no exact Blip2VisionModel form; it has {found}")


def eva_vision_config_from_timm(
    eva_model_or_dims: nn.Module | Mapping[str, Any], image_size: int | None = None
) -> Blip2VisionConfig:
    """``Blip2VisionConfig`` for the first ``depth - 1`` blocks of an EVA ViT.

    ``eva_model_or_dims`` is a timm ``Eva`` (or an open_clip model wrapping one), which is also checked
    for convertibility, or a dict with ``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, either
    ``intermediate_size`` or ``mlp_ratio``, and optionally ``img_size`` and ``layer_norm_eps`` (1e-6).
    ``image_size`` overrides the model's own resolution (the position grid is then interpolated).
    Pass the full tower: on one already pruned to its penultimate block this would drop one block too many.
    """
    if isinstance(eva_model_or_dims, nn.Module):
        eva = _unwrap_timm_eva(eva_model_or_dims)
        _check_timm_eva(eva)
        patch = tuple(eva.patch_embed.patch_size)
        img = tuple(eva.patch_embed.img_size)
        if patch[0] != patch[1] or img[0] != img[1]:
            raise ValueError(f"Blip2VisionModel needs square images and patches, got {img} / {patch}")
        block = eva.blocks[0]
        dims = dict(
            embed_dim=eva.embed_dim,
            depth=len(eva.blocks),
            num_heads=block.attn.num_heads,
            patch_size=patch[0],
            intermediate_size=block.mlp.fc1.out_features,
            img_size=img[0],
            layer_norm_eps=block.norm1.eps,
        )
    else:
        dims = dict(eva_model_or_dims)
    intermediate = dims.get("intermediate_size") or int(dims["embed_dim"] * dims["mlp_ratio"])
    size = image_size or dims.get("img_size") or dims.get("image_size")
    if not size:
        raise ValueError("image_size is required when the dims do not give img_size")
    if dims["depth"] < 2:
        raise ValueError("an EVA with fewer than 2 blocks has no penultimate block")
    return Blip2VisionConfig(
        hidden_size=dims["embed_dim"],
        intermediate_size=intermediate,
        num_hidden_layers=dims["depth"] - 1,
        num_attention_heads=dims["num_heads"],
        image_size=int(size),
        patch_size=dims["patch_size"],
        hidden_act="gelu",
        layer_norm_eps=dims.get("layer_norm_eps", 1e-6),
        qkv_bias=True,
    )


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize the patch part of a (1, prefix + g*g, D) position embedding to ``grid`` x ``grid``.

    Bicubic, ``align_corners=False``, computed in fp32, as LAVIS ``interpolate_pos_embed``.
    The prefix (class token) positions are kept as they are.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"position embedding has {patches.shape[1]} patch positions, not a square grid")
    if old == grid:
        return pos_embed
    dim = patches.shape[-1]
    patches = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def _find_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The prefix in front of the EVA keys: ``''``, ``'trunk.'``, ``'visual.trunk.'``, ``'visual_encoder.'``..."""
    prefixes = {key[: -len("cls_token")] for key in state_dict if key.endswith("cls_token")}
    prefixes = {p for p in prefixes if p == "" or p.endswith(".")}
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(sorted(repr(p) for p in prefixes))
        raise ValueError(f"cannot locate the EVA tower in this state dict (cls_token prefixes: {found}); pass prefix=")
    return prefixes.pop()


def convert_eva_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Blip2VisionConfig,
    prefix: str | None = None,
    out_prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Map an EVA state dict onto ``Blip2VisionModel`` keys (``post_layernorm`` excluded).

    The source holds either ``config.num_hidden_layers + 1`` blocks (a full EVA; the last is dropped)
    or exactly ``config.num_hidden_layers`` (already truncated). Keys outside ``prefix`` are ignored
    (a full CLIP checkpoint's text tower); every key inside it must be mapped or knowingly dropped,
    otherwise ``ValueError`` lists the leftovers. The position grid is interpolated bicubically when
    ``config.image_size`` differs from the checkpoint's.
    """
    if prefix is None:
        prefix = _find_prefix(state_dict)
    src = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in src:
            raise KeyError(f"EVA state dict lacks {prefix}{key}")
        used.add(key)
        if shape is not None and tuple(src[key].shape) != shape:
            raise ValueError(f"{prefix}{key} has shape {tuple(src[key].shape)}, the config expects {shape}")
        return src[key]

    dim, inter, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patch, grid = config.patch_size, config.image_size // config.patch_size
    depth = 1 + max((int(m.group(1)) for k in src if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth not in (n, n + 1):
        raise ValueError(f"EVA state dict has {depth} blocks; a config with {n} layers needs {n + 1} (or {n})")

    out["embeddings.class_embedding"] = take("cls_token", (1, 1, dim))
    pos = take("pos_embed")
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
        raise ValueError(f"{prefix}pos_embed has shape {tuple(pos.shape)}, expected (1, 1 + grid^2, {dim})")
    out["embeddings.position_embedding"] = interpolate_pos_embed(pos, grid)
    out["embeddings.patch_embedding.weight"] = take("patch_embed.proj.weight", (dim, 3, patch, patch))
    out["embeddings.patch_embedding.bias"] = take("patch_embed.proj.bias", (dim,))

    renames = [  # (timm name, HF name, shape) inside one block
        ("norm1.weight", "layer_norm1.weight", (dim,)),
        ("norm1.bias", "layer_norm1.bias", (dim,)),
        ("attn.qkv.weight", "self_attn.qkv.weight", (3 * dim, dim)),
        ("attn.proj.weight", "self_attn.projection.weight", (dim, dim)),
        ("attn.proj.bias", "self_attn.projection.bias", (dim,)),
        ("norm2.weight", "layer_norm2.weight", (dim,)),
        ("norm2.bias", "layer_norm2.bias", (dim,)),
        ("mlp.fc1.weight", "mlp.fc1.weight", (inter, dim)),
        ("mlp.fc1.bias", "mlp.fc1.bias", (inter,)),
        ("mlp.fc2.weight", "mlp.fc2.weight", (dim, inter)),
        ("mlp.fc2.bias", "mlp.fc2.bias", (dim,)),
    ]
    for i in range(n):
        s, t = f"blocks.{i}.", f"encoder.layers.{i}."
        for a, b, shape in renames:
            out[t + b] = take(s + a, shape)
        q_bias, v_bias = take(f"{s}attn.q_bias", (dim,)), take(f"{s}attn.v_bias", (dim,))
        if f"{s}attn.k_bias" in src:  # a non-persistent zero buffer in timm; tolerate it when saved anyway
            if torch.count_nonzero(take(f"{s}attn.k_bias")):
                raise ValueError(f"{prefix}{s}attn.k_bias is not zero; Blip2VisionModel's k bias is fixed at 0")
        out[f"{t}self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])

    last_block = f"blocks.{n}."
    leftovers = sorted(k for k in src if k not in used and not k.startswith(last_block) and not _DROPPED.match(k))
    if leftovers:
        more = f" (+{len(leftovers) - 8} more)" if len(leftovers) > 8 else ""
        shown = ", ".join(prefix + k for k in leftovers[:8])
        raise ValueError(f"EVA weights with no Blip2VisionModel slot: {shown}{more}")
    return {out_prefix + k: v for k, v in out.items()}
