"""Tiny random BLIP-2 parts built from configs (spec section (j)), shared by the tests.

Nothing is downloaded: tokenizers are trained at import-free speed on CAPTIONS, models are random.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    OPTConfig,
    T5Config,
)

from blip2cli.models.config import CLIP_MEAN, CLIP_STD
from blip2cli.tiny.tokenizers import train_bert_tokenizer, train_opt_tokenizer, train_t5_tokenizer

IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4

CAPTIONS = [
    "a red circle on a blue background",
    "two green squares near a yellow tree",
    "a photo of a small brown dog",
    "a large white cat sleeping on a sofa",
    "question: what colour is the circle? answer: red",
    "a man riding a bike down the street",
    "three birds sitting on a wire",
    "a plate of food with rice and vegetables",
    "what is this? a picture of a red bus",
    "an orange triangle above a purple square",
]


def vision_config(**overrides) -> Blip2VisionConfig:
    values = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8,
    )
    values.update(overrides)
    return Blip2VisionConfig(**values)


def qformer_config(vocab_size: int = 100, **overrides) -> Blip2QFormerConfig:
    values = dict(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, cross_attention_frequency=2,
        encoder_hidden_size=32, use_qformer_text_input=True,
    )
    values.update(overrides)
    return Blip2QFormerConfig(**values)


def opt_tokenizer():
    return train_opt_tokenizer(CAPTIONS * 4)


def t5_tokenizer():
    return train_t5_tokenizer(CAPTIONS * 4)


def bert_tokenizer():
    return train_bert_tokenizer(CAPTIONS * 4)


def image_processor(size: int = IMAGE_SIZE) -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def hf_blip2(family: str, tokenizer, seed: int = 0, image_sensitive: bool = False):
    """A tiny transformers Blip2ForConditionalGeneration whose LM vocabulary covers ``tokenizer``
    plus the processor's ``<image>`` token (added to ``tokenizer`` here, as Blip2Processor would).

    ``image_sensitive``: a ViT initialised with std 0.02 instead of Blip2VisionConfig's 1e-10 and every other
    matrix with std 0.3, so that different images give different outputs (otherwise every image looks the
    same to the Q-Former, and the tiny LLM ignores its visual prompts)."""
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(tokenizer)
    if family == "opt":
        newline = tokenizer.convert_tokens_to_ids("\u010a")  # byte-level "\n", OPT's end-of-caption token
        text = OPTConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=newline,
        )
    elif family == "t5":
        text = T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, bos_token_id=1,
        )
    else:
        raise ValueError(family)
    config = Blip2Config(
        vision_config=(vision_config(initializer_range=0.02) if image_sensitive else vision_config()).to_dict(),
        qformer_config=qformer_config(use_qformer_text_input=False).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    # Random init leaves the queries at zero; give them values so every query differs.
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.02)
        if image_sensitive:
            for name, param in model.named_parameters():
                if param.dim() == 2 and not name.startswith("vision_model"):
                    param.normal_(0, 0.3)
    return model


def save_hf_blip2(directory: Path, family: str, seed: int = 0, image_sensitive: bool = False) -> Path:
    tokenizer = opt_tokenizer() if family == "opt" else t5_tokenizer()
    model = hf_blip2(family, tokenizer, seed=seed, image_sensitive=image_sensitive)
    if family == "opt":
        tokenizer.padding_side = "left"
    processor = Blip2Processor(image_processor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def random_images(n: int, size: int = IMAGE_SIZE, seed: int = 0):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size + 8, size + 3, 3), dtype=np.uint8)) for _ in range(n)]


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}


def shape_image(fg: str, bg: str, size: int = IMAGE_SIZE):
    """A square of colour ``fg`` on a ``bg`` background: images whose captions are learnable."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), COLOURS[bg])
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=COLOURS[fg])
    return image


def write_shards(directory: Path, num_shards: int = 2, per_shard: int = 8, corrupt: int = 0,
                 colour: tuple[int, int, int] | None = None) -> list[str]:
    """Webdataset shards in img2dataset's layout ({key}.jpg/.txt/.json) of coloured-square images.

    ``corrupt`` extra samples per shard carry bytes that are not an image; ``colour`` makes every image one
    flat colour instead.
    """
    import io
    import itertools

    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    pairs = [(fg, bg) for fg, bg in itertools.permutations(COLOURS, 2)]
    paths, index = [], 0
    for shard in range(num_shards):
        path = directory / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard + corrupt):
                key = f"{shard:05d}{i:04d}"
                if i >= per_shard:
                    sink.write({"__key__": key, "jpg": b"not a jpeg", "txt": "broken"})
                    continue
                fg, bg = pairs[index % len(pairs)]
                index += 1
                buffer = io.BytesIO()
                image = shape_image(fg, bg) if colour is None else __import__("PIL.Image").Image.new("RGB", (IMAGE_SIZE,) * 2, colour)
                image.save(buffer, format="JPEG", quality=95)
                caption = f"a {fg} square on a {bg} background"
                sink.write({"__key__": key, "jpg": buffer.getvalue(), "txt": caption, "json": {"caption": caption}})
        paths.append(str(path))
    return paths


def losses_and_query_grad(model, inputs: dict, seed: int = 11) -> tuple[dict, torch.Tensor]:
    """One training forward and backward of ``model`` on ``inputs``, with dropout and ITM's negative draws
    seeded: its losses and the gradient of its query tokens."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**inputs)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items() if k.startswith("loss")}, model.query_tokens.grad.clone()
