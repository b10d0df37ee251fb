"""``blip2 cache-features``: write a recipe's frozen-feature cache (``blip2cli/data/feature_cache.py``), and
the disk cost line ``--dry-run`` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from blip2cli.errors import Blip2Error
from blip2cli.recipes import Recipe


def feature_cache_cost(recipe: Recipe, model) -> str:
    """The disk cost of the recipe's cache per image (and in all, when the cache exists)."""
    from blip2cli.data.feature_cache import describe_cost, open_feature_cache, trunk_tokens

    d = recipe.data
    if d.feature_cache:
        m = open_feature_cache(d.feature_cache)
        return describe_cost(m.views, m.tokens, m.width, m.dtype, m.images) + f" in {d.feature_cache}"
    tokens, width = trunk_tokens(model.vision_model, model.config.preprocessing.size)
    return describe_cost(d.feature_cache_views, tokens, width, d.feature_cache_dtype) + \
        " (not used: data.feature_cache is empty; write one with `blip2 cache-features`)"


def build_feature_cache(recipe: Recipe, shards: list[str], out: Path | None, dry_run: bool, device: str,
                        say: Callable[..., None], batch_size: int = 64) -> Path | None:
    """Build the recipe's model (as training does: same seed, same frozen encoder) and run its frozen image
    encoder over ``shards`` into ``out`` (default: the recipe's ``data.feature_cache``)."""
    from blip2cli.data.feature_cache import trunk_tokens, write_feature_cache
    from blip2cli.training.builders import build_model

    d = recipe.data
    target = out or (Path(d.feature_cache) if d.feature_cache else None)
    if target is None and not dry_run:
        raise Blip2Error("no cache directory: pass --out DIR or set data.feature_cache=DIR")
    if not recipe.model.freeze_vision:
        raise Blip2Error("model.freeze_vision=false: a trainable image encoder cannot be cached")
    torch.manual_seed(recipe.train.seed)  # the same initial weights as the training run (tiny/random parts)
    model = build_model(recipe, shards=shards).model
    chosen = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    vision = model.vision_model.to(chosen).eval()
    pre = model.config.preprocessing
    if dry_run:
        from blip2cli.data.feature_cache import describe_cost

        tokens, width = trunk_tokens(vision, pre.size)
        say(describe_cost(d.feature_cache_views, tokens, width, d.feature_cache_dtype))
        return None
    write_feature_cache(vision, shards, target, preprocessing=pre, views=d.feature_cache_views,
                        rrc_scale=tuple(d.rrc_scale), hflip=d.hflip, seed=recipe.train.seed,
                        dtype=d.feature_cache_dtype, batch_size=batch_size,
                        max_image_pixels=d.max_image_pixels or None, say=say)
    return target
