"""Train small tokenizers of the three kinds BLIP-2 uses, from text, in well under a second.

No vocabulary file ships with transformers or tokenizers, so offline tests and ``blip2 demo`` build their
tokenizers here: a BERT WordPiece with ``[DEC]`` (the Q-Former's), an OPT-style byte-level BPE that
prepends ``</s>`` (decoder-only LLMs) and a T5-style sentencepiece unigram (encoder-decoder LLMs).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers


def train_bert_tokenizer(texts: Iterable[str], vocab_size: int = 200):
    """A BertTokenizer (WordPiece, lowercase) with ``[DEC]`` added as BOS, as LAVIS ``init_tokenizer`` does."""
    from transformers import BertTokenizer

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # A deterministic vocabulary instead of WordPieceTrainer, whose merge ties (and so its token set and
    # ids) change from run to run: every character, alone and as a "##" continuation, then whole words by
    # frequency. Every process building it from the same captions gets identical ids.
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = tok.normalizer.normalize_str(text)
        counts.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(normalized))
    chars = sorted({c for word in counts for c in word})
    vocab = special + chars + [f"##{c}" for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    bert = BertTokenizer(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    bert.add_special_tokens({"bos_token": "[DEC]"})
    return bert


def train_opt_tokenizer(texts: Iterable[str], vocab_size: int = 300):
    """A GPT2Tokenizer (byte-level BPE) whose encodings start with ``</s>``, as OPT's do."""
    from transformers import GPT2Tokenizer

    special = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        list(texts),
        trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special
        ),
    )
    bos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B:1", special_tokens=[("</s>", bos_id)]
    )
    return GPT2Tokenizer(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def train_t5_tokenizer(texts: Iterable[str], vocab_size: int = 120):
    """A T5Tokenizer (sentencepiece unigram) with T5's ids: pad 0, eos 1, unk 2, no BOS."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.txt")
        corpus.write_text("\n".join(texts) + "\n")
        prefix = Path(tmp, "spiece")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            model_type="unigram",
            vocab_size=vocab_size,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        out = Path(tmp, "t5")
        out.mkdir()
        (out / "spiece.model").write_bytes(prefix.with_suffix(".model").read_bytes())
        return T5Tokenizer.from_pretrained(str(out), extra_ids=0)
