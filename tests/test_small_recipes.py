"""The one-GPU small-model recipes (small_stage1, small_stage2) resolve, build and load data offline.

Their hub models are replaced by local directories holding configs written from the published values of the
models they name, with random weights and tokenizers trained here (BLIP2_SPEC.md (j)):

- facebook/dinov2-small: Dinov2Config hidden 384, 6 heads, patch 14, MLP ratio 4, image 518 (position table 37x37),
  with the BitImageProcessor preprocessor_config.json it publishes (shortest edge 256, center crop 224, bicubic,
  ImageNet mean/std);
- sentence-transformers/all-MiniLM-L6-v2: BertConfig hidden 384, 12 heads, intermediate 1536, vocab 30522
  (a WordPiece vocabulary trained on the captions, padded with [unused] entries to 30522, as BERT's is);
- HuggingFaceTB/SmolLM2-135M: LlamaConfig hidden 576, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied
  embeddings, RoPE theta 100000; a byte-level BPE with <|endoftext|> (0), <|im_start|> (1), <|im_end|> (2), no BOS.

To keep the test fast, only the layer counts are scaled down (ViT 12 -> 2, BERT 6 -> 2, Llama 30 -> 2); widths,
heads, patch size, vocabularies and preprocessing are the published ones, so every shape the recipes produce is.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.recipes import load_recipe

runner = CliRunner()

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "gray": (128, 128, 128)}
SHAPES = ("circle", "rectangle", "triangle")
CAPTIONS = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a red shape?", "is no circle present?"]
CORPUS = CAPTIONS + [f"Question: {q} Answer: {a}" for q in QUESTIONS for a in ("yes", "no", "red", "circle")]


def _image(colour: str, shape: str, size: int = 64):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw, box = ImageDraw.Draw(image), [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=fill)
    return image


def _shards(directory: Path, qa: bool, n: int = 8) -> str:
    """One shard in the layout `blip2 download pretrain custom` (captions) or `... vqa` (questions) writes."""
    import webdataset as wds

    directory.mkdir(parents=True)
    with wds.TarWriter(str(directory / "00000.tar")) as sink:
        for i in range(n):
            colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
            buffer = io.BytesIO()
            _image(colour, shape).save(buffer, format="JPEG", quality=95)
            if qa:
                question = QUESTIONS[i % len(QUESTIONS)]
                answer = colour if "color" in question else shape if "shape is" in question else "no"
                meta = {"question": question, "answers": json.dumps([answer] * 10), "caption": f"{question} {answer}"}
            else:
                meta = {"caption": f"a {colour} {shape}"}
            sink.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": meta["caption"], "json": meta})
    return str(directory)


def _dinov2_small(directory: Path) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                          image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0)  # published: 12 layers
    Dinov2Model(config).save_pretrained(directory)
    BitImageProcessor(
        do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
    ).save_pretrained(directory)
    return directory


def _minilm(directory: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    from blip2cli.tiny.tokenizers import train_bert_tokenizer

    trained = train_bert_tokenizer(CORPUS, vocab_size=200)
    vocab = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if t != "[DEC]"]
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]  # BERT's 30522, as all-MiniLM-L6-v2's
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    BertTokenizer(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                  mask_token="[MASK]").save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)  # published: 6 layers
    BertForMaskedLM(config).save_pretrained(directory)
    return directory


def _smollm2_135m(directory: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=0)  # published: 30 layers
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-parts")
    return {
        "vision": _dinov2_small(root / "vision"),
        "bert": _minilm(root / "bert"),
        "llm": _smollm2_135m(root / "llm"),
        "captions": _shards(root / "shards" / "captions", qa=False),
        "vqa": _shards(root / "shards" / "vqa", qa=True),
        "root": root,
    }


def _pretrain(args: list[str]):
    result = runner.invoke(app, ["pretrain", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _local(parts) -> list[str]:
    return [f"model.vision=hf:{parts['vision']}", f"model.qformer_init={parts['bert']}"]


CPU = ["model.vision_precision=fp32", "model.llm_precision=fp32", "train.precision=fp32", "data.num_workers=0"]


def test_small_recipes_name_real_models_with_stable_one_gpu_settings():
    one, two = load_recipe("small_stage1"), load_recipe("small_stage2")
    assert one.model.vision == two.model.vision == "hf:facebook/dinov2-small"
    assert one.model.qformer_init == two.model.qformer_init == "sentence-transformers/all-MiniLM-L6-v2"
    assert two.model.llm == "HuggingFaceTB/SmolLM2-135M" and one.model.stage == 1 and two.model.stage == 2
    assert one.model.num_query_tokens == two.model.num_query_tokens == 32
    for r in (one, two):
        # a frozen real LLM diverged at lr ~1e-3; 1e-4 with warmup and clipping was stable
        assert r.optim.lr <= 1e-4 and r.optim.warmup_steps >= 500 and r.optim.grad_clip > 0
        assert r.train.precision == "bf16" and r.model.freeze_vision and r.model.freeze_llm
        assert r.model.image_size is None and r.model.vision_feature_layer is None  # the encoder's own
    assert two.model.llm_precision == "bf16" and two.eval.prompt_template == "Question: {} Answer:"


def test_small_recipes_dry_run_with_published_shapes(parts, tmp_path):
    out1 = tmp_path / "stage1"
    # dry run at the recipe's own settings: DINOv2's 224 px crop (257 tokens x 384), 32 queries, batch 256
    text = _pretrain(["--stage", "1", "--recipe", "small_stage1", "--dry-run", "--out", str(out1 / "dry"),
                      "--device", "cpu", *_local(parts), *CPU, f"data.shards=[\"{parts['captions']}\"]"])
    assert "dinov2" in text and "center crop 224 px" in text and "one batch of 256" in text
    # one real step at a CPU size gives stage 2 its --init-from checkpoint (forward + backward, real widths)
    _pretrain(["--stage", "1", "--recipe", "small_stage1", "--out", str(out1), "--device", "cpu", "--resume", "never",
               *_local(parts), *CPU, f"data.shards=[\"{parts['captions']}\"]", "model.image_size=56",
               "data.global_batch_size=4", "data.micro_batch_size=4", "train.max_steps=1", "optim.warmup_steps=1"])
    final = out1 / "final"
    assert final.is_dir()
    text = _pretrain(["--stage", "2", "--recipe", "small_stage2", "--init-from", str(final), "--dry-run",
                      "--out", str(tmp_path / "stage2"), "--device", "cpu", *_local(parts), *CPU,
                      f"model.llm={parts['llm']}", f"data.shards=[\"{parts['captions']}\", \"{parts['vqa']}\"]",
                      "data.weights=[1, 1]"])
    assert "Question: {} Answer:" in text and "one batch of 128" in text
