"""Text-only pre-training of small language models: what BLIP-2 assumes its frozen LLM already had.

BLIP-2 bridges a *pre-trained* LLM; a random one cannot be taught anything through soft prompts because
it is frozen. The tiny recipes (``llm = "tiny-opt"`` / ``"tiny-t5"``) therefore pre-train their small LLM
on the run's own captions (text alone, no images) for a few hundred steps before freezing it, with the
same batching stage 2 uses: next-token prediction ending in the LLM's end token for decoder-only models,
prefix-LM (a random split point per caption) for encoder-decoder models.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from blip2cli.models.text import decoder_only_batch, encoder_decoder_batch


def pretrain_language_model(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    end_token: str = "\n",
    max_length: int = 32,
) -> list[float]:
    """Train ``model`` in place on ``texts`` (AdamW, linear decay) and return the loss per step.

    The model is left in eval mode; freezing it is the caller's business.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("text pre-training needs at least one text")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    device = next(model.parameters()).device
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        chunk = [rng.choice(texts) for _ in range(batch_size)]
        if model.config.is_encoder_decoder:
            batch = encoder_decoder_batch(tokenizer, chunk, rng=rng, max_length=max_length)
        else:
            batch = decoder_only_batch(tokenizer, chunk, max_length=max_length, end_token=end_token)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
