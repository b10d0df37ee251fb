"""Captioning and visual question answering with a loaded stage-2 model (what ``blip2 ask`` runs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blip2cli.checkpoint import LoadedModel
from blip2cli.errors import Blip2Error

# BLIP-2's zero-shot VQA prompts (spec section (g)); `{}` is the question.
DECODER_ONLY_TEMPLATE = "Question: {} Answer:"
ENCODER_DECODER_TEMPLATE = "Question: {} Short answer:"


@dataclass
class GenerationOptions:
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0

    def generate_kwargs(self) -> dict:
        kwargs = dict(
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            length_penalty=self.length_penalty,
            repetition_penalty=self.repetition_penalty,
            do_sample=self.sample,
        )
        if self.sample:
            kwargs.update(top_p=self.top_p, temperature=self.temperature)
        return kwargs


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Blip2Error(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Blip2Error("--device cuda was asked for but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on a GPU that supports it, fp32 elsewhere (CPU half precision is slow)."""
    from blip2cli.models.llm import resolve_dtype as parse_dtype

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return parse_dtype(name)
    except ValueError as err:
        raise Blip2Error(str(err)) from None


class Blip2Assistant:
    """Captions and answers for images, keeping the model loaded between calls."""

    def __init__(self, loaded: LoadedModel, device: torch.device | str = "cpu"):
        if loaded.stage != 2:
            raise Blip2Error(
                f"{loaded.source} is a stage-1 (Q-Former only) checkpoint; captioning and questions need a "
                "stage-2 checkpoint with a language model"
            )
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(device)

    @property
    def default_template(self) -> str:
        return ENCODER_DECODER_TEMPLATE if self.model.is_encoder_decoder else DECODER_ONLY_TEMPLATE

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        batch = self.loaded.image_processor(images=list(images), return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    def generate(self, images: Sequence, prompts: Sequence[str] | None, options: GenerationOptions) -> list[str]:
        """One output per image; ``prompts`` None or empty strings mean plain captioning."""
        pixel_values = self.pixel_values(images)
        input_ids = attention_mask = None
        if prompts is not None and any(prompts):
            batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
            input_ids = batch["input_ids"].to(self.device)
            attention_mask = batch["attention_mask"].to(self.device)
        output = self.model.generate(pixel_values, input_ids, attention_mask, **options.generate_kwargs())
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def caption(self, image, prompt: str = "", options: GenerationOptions | None = None) -> str:
        return self.generate([image], [prompt] if prompt else None, options or GenerationOptions())[0]

    def answer(
        self,
        image,
        question: str,
        template: str | None = None,
        history: Sequence[tuple[str, str]] = (),
        options: GenerationOptions | None = None,
    ) -> str:
        """Answer ``question``; ``history`` holds earlier (question, answer) turns about the same image,
        concatenated in front as in the paper's visual conversation examples."""
        options = options or GenerationOptions(max_new_tokens=10)
        template = template or self.default_template
        history = list(history)
        prompt = conversation_prompt(template, question, history)
        # Forget the oldest turns when the conversation no longer fits the LLM's context.
        while history and not self._fits(prompt, options.max_new_tokens):
            history.pop(0)
            prompt = conversation_prompt(template, question, history)
        return self.generate([image], [prompt], options)[0]

    def _fits(self, prompt: str, max_new_tokens: int) -> bool:
        limit = getattr(self.model.language_model.config, "max_position_embeddings", None)
        if not limit:
            return True
        used = self.model.config.num_query_tokens + len(self.tokenizer(prompt)["input_ids"]) + max_new_tokens
        return used <= limit


def conversation_prompt(template: str, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
    if "{}" not in template:
        raise Blip2Error(f"prompt template {template!r} has no '{{}}' for the question")
    turns = [f"{template.format(q)} {a}" for q, a in history]
    return " ".join([*turns, template.format(question)])
