"""Turning a data batch (images and texts) into the keyword arguments of the model being trained."""

from __future__ import annotations

import random
from typing import Any

import torch

from blip2cli.recipes import Recipe
from blip2cli.training.builders import BuiltModel


class TextBatcher:
    """Turns a data batch (images + texts, and questions for question-answer samples) into the model's
    keyword arguments.

    Stage 2: a caption is the LLM's target after ``model.prompt``; a question-answer sample's target is its
    answer after the model's VQA prompt (``usage["vqa_prompt_template"]``, e.g. "Question: {} Answer:"),
    which is masked from the loss like any prompt: the LLM learns to answer, not to repeat questions, and
    answers through the same template in ``ask`` and ``eval``. Stage 1 reads a question-answer sample as one
    text, "question answer"."""

    def __init__(self, recipe: Recipe, built: BuiltModel):
        self.recipe = recipe
        self.built = built
        if recipe.model.stage == 2:
            from blip2cli.models.llm import end_token

            self.end_token = end_token(built.model.language_model, built.llm_tokenizer)
            self.template = built.model.config.stored_generation("vqa").get("prompt")

    def __call__(self, batch: dict[str, Any], step: int, device: torch.device) -> dict[str, torch.Tensor]:
        m, d = self.recipe.model, self.recipe.data
        images = image_inputs(batch, device)
        texts = list(batch["text"])
        questions = list(batch.get("question") or [None] * len(texts))
        if m.stage == 1:
            texts = [t if q is None else f"{q} {t}" for t, q in zip(texts, questions)]
            tokens = qformer_tokens(self.built.qformer_tokenizer, texts, d.max_txt_len)
            return {**images, "input_ids": tokens["input_ids"].to(device),
                    "attention_mask": tokens["attention_mask"].to(device)}
        from blip2cli.models.text import (
            decoder_only_batch,
            encoder_decoder_batch,
            prefix_lm_split,
        )

        tokenizer = self.built.llm_tokenizer
        asked = any(q is not None for q in questions)
        if self.built.model.is_encoder_decoder:
            # The prefix-LM split point is drawn from a generator seeded by the step: resumable exactly.
            rng = random.Random(self.recipe.train.seed * 1_000_003 + step)
            if not asked:
                tokens = encoder_decoder_batch(tokenizer, texts, prompt=m.prompt or None, rng=rng,
                                               max_length=d.max_txt_len)
            else:  # per sample: the question's prompt, the recipe's prompt, or a prefix-LM split
                pairs = [(self.template.format(q), t) if q is not None else (m.prompt, t) if m.prompt
                         else prefix_lm_split(t, rng) for t, q in zip(texts, questions)]
                tokens = encoder_decoder_batch(tokenizer, [t for _, t in pairs], prompt=[p for p, _ in pairs],
                                               max_length=max(d.max_txt_len, *(len(tokenizer(p)["input_ids"]) for p, _ in pairs)),
                                               max_target_length=d.max_txt_len)
            keys = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")
        else:
            max_length = d.max_txt_len
            prompts: str | list[str] = m.prompt
            if asked:
                prompts = [self.template.format(q) + " " if q is not None else m.prompt for q in questions]
                # data.max_txt_len bounds the answer, not the question in front of it (else a long question
                # would cut the answer, the only labelled part, away)
                max_length += max(len(tokenizer(p)["input_ids"]) for p in prompts)
            tokens = decoder_only_batch(tokenizer, texts, prompt=prompts, max_length=max_length,
                                        end_token=self.end_token)
            keys = ("input_ids", "attention_mask", "labels")
        return {**images, **{k: tokens[k].to(device) for k in keys}}


def qformer_tokens(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Stage 1's text batch: ids and attention mask padded to ``max_length`` (``data.max_txt_len``)."""
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")


def image_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's images as the model takes them: ``pixel_values``, or ``vision_features`` (the frozen
    trunk's output) when the batch comes from a feature cache."""
    key = "vision_features" if "vision_features" in batch else "pixel_values"
    return {key: batch[key].to(device, non_blocking=True)}
