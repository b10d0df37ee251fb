"""The ``tiny`` resolver: builds the parts a recipe names ``tiny`` / ``tiny-opt`` / ``tiny-t5``.

Each function takes the part's name and the ``BuildContext`` (the run's shards, or a caption list given
directly); the vocabularies are trained on those captions, so the tiny models speak the run's language.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    Blip2VisionModel,
    OPTConfig,
    T5Config,
)

from blip2cli.errors import Blip2Error
from blip2cli.models.config import clean_config_dict
from blip2cli.models.llm import adjust_language_config, end_token, freeze

if TYPE_CHECKING:
    from blip2cli.training.builders import BuildContext

# initializer_range: Blip2VisionConfig defaults to 1e-10 (weights always come from a checkpoint), which
# would make a random tiny encoder map every image to nearly the same features.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                   initializer_range=0.02)
# A random tiny Q-Former differs from a real one (which starts from BERT) in two ways that stall learning:
# with BERT's 0.02 init every image maps to almost the same query outputs (cosine ~0.9999), and dropout
# noise is larger than that image signal. Larger init and no dropout let ITC learn within minutes.
TINY_QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    initializer_range=0.3)
TINY_LLM = dict(hidden_size=32, layers=2, heads=4, ffn=64)
TINY_LLM_TEXT_STEPS = 200  # text-only pre-training steps of the tiny LLMs on the run's captions
CAPTIONS_READ = 5000  # captions read from the run's shards to train the vocabularies


def captions(context: BuildContext, part: str) -> Sequence[str]:
    """The captions the tiny vocabularies are trained on: the context's own list, else the run's shards."""
    if context.corpus is None:
        from blip2cli.data.training import read_captions

        context.corpus = read_captions(context.shards, limit=CAPTIONS_READ) if context.shards else []
    if not context.corpus:
        raise Blip2Error(f"{part} needs captions to train its vocabulary on; no data was found")
    return context.corpus


def vision(name: str, image_size: int, context: BuildContext) -> tuple[nn.Module, dict]:
    """A random 2-layer ViT (hidden 32, patch 8) and its spec."""
    if name != "tiny":
        raise Blip2Error(f"unknown tiny image encoder {name!r}; use tiny")
    config = Blip2VisionConfig(**TINY_VISION, image_size=image_size)
    return Blip2VisionModel(config).eval(), {"kind": "eva", "config": clean_config_dict(config.to_dict())}


def qformer(name: str, vision_width: int, context: BuildContext):
    """(Blip2QFormerConfig, tokenizer with [DEC], None): a random 2-layer Q-Former, WordPiece on the captions."""
    from blip2cli.tiny.tokenizers import train_bert_tokenizer

    if name != "tiny":
        raise Blip2Error(f"unknown tiny Q-Former {name!r}; use tiny")
    tokenizer = train_bert_tokenizer(captions(context, 'qformer_init = "tiny"'), vocab_size=400)
    config = Blip2QFormerConfig(
        vocab_size=len(tokenizer), **TINY_QFORMER, encoder_hidden_size=vision_width,
        use_qformer_text_input=True, pad_token_id=tokenizer.pad_token_id,
    )
    return config, tokenizer, None


def llm(name: str, context: BuildContext):
    """(frozen LLM, tokenizer): a 2-layer OPT or T5, pre-trained on the captions (text only)."""
    from blip2cli.tiny.text_pretraining import pretrain_language_model
    from blip2cli.tiny.tokenizers import train_opt_tokenizer, train_t5_tokenizer

    t = TINY_LLM
    if name == "tiny-opt":
        corpus = captions(context, f'llm = "{name}"')
        tokenizer = train_opt_tokenizer(corpus, vocab_size=500)
        config = OPTConfig(
            vocab_size=len(tokenizer), hidden_size=t["hidden_size"], num_hidden_layers=t["layers"], ffn_dim=t["ffn"],
            num_attention_heads=t["heads"], max_position_embeddings=128, word_embed_proj_dim=t["hidden_size"],
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        auto = AutoModelForCausalLM
    elif name == "tiny-t5":
        corpus = captions(context, f'llm = "{name}"')
        tokenizer = train_t5_tokenizer(corpus, vocab_size=300)
        config = T5Config(
            vocab_size=len(tokenizer), d_model=t["hidden_size"], d_kv=8, d_ff=t["ffn"], num_layers=t["layers"],
            num_decoder_layers=t["layers"], num_heads=t["heads"], feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
        auto = AutoModelForSeq2SeqLM
    else:
        raise Blip2Error(f"unknown tiny LLM {name!r}; use tiny-opt or tiny-t5")
    config = adjust_language_config(config, tokenizer)
    model = auto.from_config(config)
    # BLIP-2 bridges a pre-trained LLM: give the tiny one its text-only pre-training before freezing it.
    pretrain_language_model(model, tokenizer, corpus, steps=TINY_LLM_TEXT_STEPS, end_token=end_token(model, tokenizer))
    freeze(model)
    return model, tokenizer
