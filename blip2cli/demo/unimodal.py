"""The demo's frozen unimodal parts, each pre-trained on its own modality only, saved as transformers dirs.

BLIP-2 assumes an image encoder and an LLM that were pre-trained separately; the demo builds tiny ones:

- **Image encoder** (``vision/``, a ``ViTModel``; recipes name it ``hf:<dir>``): pre-trained on the
  training *pictures alone* (no text) with masked image modelling, the SimMIM objective
  (transformers' ``ViTForMaskedImageModeling``): half of the 4x4-pixel patches are replaced by a learned
  mask token and the encoder must reconstruct their pixels (L1). Unlike contrastive objectives with
  colour jitter, flips or crops, reconstruction keeps colour, position and shape in the features,
  which is what the captions talk about. A second, small image-only term keeps *where* each token is:
  a throwaway linear head must tell each token's patch index from the features the Q-Former reads
  (``POSITION_LOSS_WEIGHT``). Without it the tiny ViT keeps position only in weak directions of its
  penultimate features (least squares still finds each token's patch, but a regularised linear probe
  only 60% of the time), and the Q-Former's cross-attention cannot route a query to one region: even
  trained on position labels, an attention-pooling probe stayed at chance (19%); with this term it
  reads position at 99%. The term's weight trades against background texture (see the constant).
- **Language model** (``lm/``, an ``OPTForCausalLM`` with an OPT-style byte-level BPE trained here): next
  token prediction on text alone (captions and "question ... answer ..." lines, each ending in "\\n",
  BLIP-2's OPT end of text). Related documents (a caption, then a paraphrase or a question it answers) are
  packed one after the other, each behind its own ``</s>``, as LLM pre-training packs documents. That is
  what makes the frozen LM usable in stage 2: it learns to read what stands before its ``</s>``, which
  is where the visual prompts go. Trained on each line alone it ignored anything before ``</s>`` and
  stage-2 VQA stayed at the majority answer (colour questions at chance).
- **Q-Former text side** (``bert/``, a ``BertForMaskedLM`` + WordPiece vocabulary with ``[DEC]``): masked
  language modelling on the same text, plus a sentence-level term: from the ``[CLS]`` output a throwaway
  linear head predicts which words the sentence contains (bag of words). MLM alone leaves ``[CLS]``
  untrained, nearly the same vector for every sentence, and stage 1's ITC (which compares images with
  the ``[CLS]`` feature) then sits at chance for hundreds of steps before the symmetry breaks; real BERT
  has its next-sentence objective for the same purpose. The Q-Former copies the weights
  (``model.qformer_init``).

Each is trained for a fixed number of steps from a fixed seed; ``UnimodalResult`` holds the loss curves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from blip2cli.demo.world import DOCUMENT_BREAK
from blip2cli.models.config import CLIP_MEAN, CLIP_STD

IMAGE_SIZE = 32
PATCH = 4
VISION = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
LM = dict(hidden_size=96, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4)
# initializer_range: BERT's 0.02 is tuned for width 768; at width 64 it makes the Q-Former's fresh
# cross-attention (initialised at the BERT's scale) pass ~1% of the image signal to the queries, and
# stage 1 then idles at chance for hundreds of steps. 0.02 * sqrt(768 / 64) ~ 0.07 keeps the same gain.
# Weight of the patch-position term next to the pixel reconstruction loss (~0.2 at the end). Read by an
# attention-pooling probe after 400 steps: at 1.0 position crowds colour out (73%); at 0.1 background falls
# from 98% to 65%; at 0.05 position is 99.8%, background 74%; at 0.02 background keeps 90% but the term is
# still far from learned (position 98% at full size, untrustworthy with fewer steps or images).
POSITION_LOSS_WEIGHT = 0.05
BERT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, initializer_range=0.07)


@dataclass
class Steps:
    vision: int = 300
    lm: int = 1500  # the LM learns to read what precedes its "</s>" only after ~1000 steps
    bert: int = 200
    batch: int = 64


@dataclass
class UnimodalResult:
    vision_dir: Path
    lm_dir: Path
    bert_dir: Path
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


Progress = Callable[[str, int, int, float], None]  # (part, step, total, loss)


def _images_to_tensor(paths: Sequence[Path]) -> torch.Tensor:
    """Pictures -> (N, 3, 32, 32) normalised like BLIP-2's eval transform (bicubic square resize)."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for p in paths:
        with Image.open(p) as img:
            img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
            t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(IMAGE_SIZE, IMAGE_SIZE, 3)
        out.append(((t.permute(2, 0, 1).float() / 255.0) - mean) / std)
    return torch.stack(out)


def _adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))


def _lr_at(step: int, total: int, peak: float, warmup: int = 20) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    import math

    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) + peak * 0.02


def pretrain_vision(image_paths: Sequence[Path], out: Path, steps: int = 300, batch: int = 64, seed: int = 0,
                    progress: Progress | None = None, position_weight: float = POSITION_LOSS_WEIGHT,
                    device: str | torch.device = "cpu") -> list[float]:
    """Masked image modelling (plus the patch-position term) on pictures only; saves a ``ViTModel`` to
    ``out``. Returns the curve of the reconstruction loss."""
    from transformers import ViTConfig, ViTForMaskedImageModeling

    torch.manual_seed(seed)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=PATCH, encoder_stride=PATCH, **VISION,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForMaskedImageModeling(config).to(device)
    images = _images_to_tensor(image_paths).to(device)
    n_patches = (IMAGE_SIZE // PATCH) ** 2
    position_head = torch.nn.Linear(config.hidden_size, n_patches).to(device)  # discarded after pretraining
    patch_index = torch.arange(n_patches, device=device).repeat(batch)
    opt = _adamw([*model.parameters(), *position_head.parameters()], 2e-3)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, 2e-3)
        # Random draws on the CPU generator, so a run is the same on every device up to float rounding.
        idx = torch.randint(len(images), (batch,), generator=gen)
        mask = torch.rand(batch, n_patches, generator=gen).argsort(dim=1) < n_patches // 2
        res = model(pixel_values=images[idx.to(device)], bool_masked_pos=mask.to(device), output_hidden_states=True)
        # hidden_states[-2]: the penultimate layer, which BLIP-2 hands to the Q-Former (the demo recipes set it)
        patch_tokens = res.hidden_states[-2][:, 1:]
        position_loss = torch.nn.functional.cross_entropy(position_head(patch_tokens).flatten(0, 1), patch_index)
        loss = res.loss + position_weight * position_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(res.loss.item())
        if progress:
            progress("vision", step + 1, steps, losses[-1])
    encoder = model.vit
    encoder.config.use_mask_token = False
    out.mkdir(parents=True, exist_ok=True)
    # Save as a plain ViTModel (no mask token): what `hf:<dir>` loads as the frozen trunk. Its pooler is
    # never used (BLIP-2 reads hidden states) and stays as initialised.
    from transformers import ViTModel

    plain = ViTModel(encoder.config)
    state = {k: v for k, v in encoder.state_dict().items() if k != "embeddings.mask_token"}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    plain.save_pretrained(out)
    # Like any published encoder, it says how its images were prepared (what blip2 then uses for it).
    from transformers import BlipImageProcessor

    BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(CLIP_MEAN),
                       image_std=list(CLIP_STD), resample=3).save_pretrained(out)
    return losses


def pretrain_lm(texts: Sequence[str], out: Path, steps: int = 300, batch: int = 64, seed: int = 0,
                progress: Progress | None = None, device: str | torch.device = "cpu") -> list[float]:
    """Causal LM on text only; saves an ``OPTForCausalLM`` + tokenizer to ``out``. Returns the loss curve."""
    from transformers import OPTConfig, OPTForCausalLM

    from blip2cli.tiny.tokenizers import train_opt_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_opt_tokenizer([t.replace(DOCUMENT_BREAK, " ") for t in texts], vocab_size=400)
    config = OPTConfig(
        vocab_size=len(tokenizer), word_embed_proj_dim=LM["hidden_size"], max_position_embeddings=96,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0, **LM,
        # Untied output layer (written when blip2's native checkpoints could not restore tied LM heads; the
        # demo's reported figures were measured with it).
        tie_word_embeddings=False,
    )
    model = OPTForCausalLM(config).to(device)
    rng = random.Random(seed)
    opt = _adamw(model.parameters(), 3e-3)
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, 3e-3)
        input_ids, attention_mask = (t.to(device) for t in _packed_batch(tokenizer, rng.sample(list(texts), batch)))
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress:
            progress("lm", step + 1, steps, losses[-1])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return losses


def _packed_batch(tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of ``texts``; a text made of several documents (joined by ``DOCUMENT_BREAK``) is
    packed the way LLM pre-training packs documents: each one ``</s> document \\n`` after the other."""
    rows = [[tid for doc in text.split(DOCUMENT_BREAK) for tid in tokenizer(doc + "\n")["input_ids"]] for text in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def pretrain_bert(texts: Sequence[str], out: Path, steps: int = 200, batch: int = 64, seed: int = 0,
                  progress: Progress | None = None, device: str | torch.device = "cpu") -> list[float]:
    """Masked LM on text only; saves a ``BertForMaskedLM`` + tokenizer (with ``[DEC]``) to ``out``."""
    from transformers import BertConfig, BertForMaskedLM

    from blip2cli.tiny.tokenizers import train_bert_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_bert_tokenizer([t.replace(DOCUMENT_BREAK, " ") for t in texts], vocab_size=400)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **BERT)
    model = BertForMaskedLM(config).to(device)
    bow_head = torch.nn.Linear(config.hidden_size, config.vocab_size).to(device)  # discarded after pretraining
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = _adamw([*model.parameters(), *bow_head.parameters()], 2e-3)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, 2e-3)
        enc = tokenizer([t.replace(DOCUMENT_BREAK, " ") for t in rng.sample(list(texts), batch)], padding=True,
                        return_tensors="pt")
        ids = enc["input_ids"]
        candidates = ~torch.isin(ids, special)
        chosen = (torch.rand(ids.shape, generator=gen) < 0.15) & candidates
        chosen[:, 1] |= candidates[:, 1] & ~chosen.any(dim=1)  # at least one masked token per text
        labels = ids.masked_fill(~chosen, -100)
        inputs = ids.masked_fill(chosen, tokenizer.mask_token_id)
        res = model(input_ids=inputs.to(device), attention_mask=enc["attention_mask"].to(device),
                    labels=labels.to(device), output_hidden_states=True)
        bag = torch.zeros(batch, config.vocab_size).scatter_(1, ids, 1.0).to(device)
        bag[:, special] = 0.0
        bow_logits = bow_head(res.hidden_states[-1][:, 0])
        loss = res.loss + torch.nn.functional.binary_cross_entropy_with_logits(bow_logits, bag) * 10
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(res.loss.item())
        if progress:
            progress("bert", step + 1, steps, losses[-1])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return losses


def pretrain_unimodal(image_paths: Sequence[Path], texts: Sequence[str], out: Path, steps: Steps | None = None,
                      seed: int = 0, progress: Progress | None = None,
                      device: str | torch.device = "cpu") -> UnimodalResult:
    """All three parts into ``out/vision``, ``out/lm``, ``out/bert``, trained on ``device``."""
    steps = steps or Steps()
    result = UnimodalResult(out / "vision", out / "lm", out / "bert")
    for name, fn, arg, n, d in (
        ("vision", pretrain_vision, image_paths, steps.vision, result.vision_dir),
        ("lm", pretrain_lm, texts, steps.lm, result.lm_dir),
        ("bert", pretrain_bert, texts, steps.bert, result.bert_dir),
    ):
        start = time.perf_counter()
        result.losses[name] = fn(arg, d, steps=n, batch=steps.batch, seed=seed, progress=progress,
                                    device=device)
        result.seconds[name] = time.perf_counter() - start
    return result
