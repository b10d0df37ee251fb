"""Validation during training: the held-out loss and an in-loop ``blip2 eval`` task."""

from __future__ import annotations

from typing import Any

import torch

from blip2cli.errors import Blip2Error
from blip2cli.recipes import Recipe
from blip2cli.training.builders import BuiltModel
from blip2cli.distributed import DistEnv, mean_across_ranks
from blip2cli.training.text_batching import TextBatcher


class Validation:
    """Every ``train.eval_every`` steps: the loss on ``data.val_shards`` (eval transform, at most
    ``eval.max_batches`` batches) and, when ``eval.task`` is set, that ``blip2 eval`` task on the first
    ``eval.limit`` items of its data. Runs on every rank (collectives inside the model and the eval
    stay matched) and forks the RNG, so validating never changes the training run itself."""

    def __init__(self, recipe: Recipe, built: BuiltModel, batcher: TextBatcher, env: DistEnv):
        self.recipe, self.built, self.batcher, self.env = recipe, built, batcher, env
        self.every = recipe.train.eval_every
        self._eval_data = None
        if self.every and recipe.eval.task:
            from blip2cli.evaluation.datasets import load_eval_data

            self._eval_data = load_eval_data(recipe.eval.task, recipe.eval.data or None)

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.recipe.train.max_steps)

    def run(self, model) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                metrics = self._held_out_loss(model) if self.recipe.data.val_shards else {}
                if self._eval_data is not None:
                    metrics.update(self._task_metrics(model))
        finally:
            model.train(was_training)
        return metrics

    @torch.no_grad()
    def _held_out_loss(self, model) -> dict[str, float]:
        from blip2cli.data.training import make_eval_loader

        r = self.recipe
        pre = self.built.model.config.preprocessing
        loader = make_eval_loader(r.data.val_shards, r.data.micro_batch_size, pre.size, preprocessing=pre,
                                  max_image_pixels=r.data.max_image_pixels or None)
        sums: dict[str, float] = {}
        samples = 0
        for index, batch in enumerate(loader):
            if r.eval.max_batches and index >= r.eval.max_batches:
                break
            out = model(**self.batcher(batch, step=index, device=self.env.device))
            size = batch["pixel_values"].shape[0]
            for key, value in out.items():
                if key.startswith("loss"):
                    sums[key] = sums.get(key, 0.0) + float(value) * size
            samples += size
        if not samples:
            raise Blip2Error(f"data.val_shards {r.data.val_shards} hold no readable sample")
        return mean_across_ranks({f"val_{k}": v / samples for k, v in sums.items()}, self.env)

    def _task_metrics(self, model) -> dict[str, Any]:
        from blip2cli.checkpoint import make_image_processor
        from blip2cli.evaluation.runner import evaluate
        from blip2cli.evaluation.tasks import resolve_settings

        r = self.recipe
        tokenizer = self.built.llm_tokenizer if r.model.stage == 2 else self.built.qformer_tokenizer
        # The same prompts and generation settings `blip2 eval` will use on the saved checkpoint.
        settings, _ = resolve_settings(r.eval.task, model.config, bool(getattr(model, "is_encoder_decoder", False)))
        metrics = evaluate(r.eval.task, model, self._eval_data, limit=r.eval.limit or None, tokenizer=tokenizer,
                           image_processor=make_image_processor(model.config), batch_size=r.data.micro_batch_size,
                           settings=settings)
        return {f"{r.eval.task}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
