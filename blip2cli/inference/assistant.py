"""Captioning and visual question answering with a loaded stage-2 model, one image at a time (``blip2 ask``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blip2cli.checkpoint import LoadedModel
from blip2cli.errors import Blip2Error

# BLIP-2's zero-shot VQA prompts (spec section (g)); `{}` is the question.
from blip2cli.evaluation.tasks import VQA_PROMPT_DECODER_ONLY as DECODER_ONLY_TEMPLATE  # noqa: E402
from blip2cli.evaluation.tasks import VQA_PROMPT_ENCODER_DECODER as ENCODER_DECODER_TEMPLATE  # noqa: E402


# ``blip2 ask``'s defaults where neither a flag nor the checkpoint says otherwise, per kind of output.
ASK_DEFAULTS = {
    "caption": {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0},
    "vqa": {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 1.0},
}
_FLAGS = {"prompt": "--prompt", "num_beams": "--num-beams", "max_new_tokens": "--max-new-tokens",
          "min_new_tokens": "--min-new-tokens", "length_penalty": "--length-penalty"}


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
        """The VQA template the checkpoint was trained with, else the protocol's for its LLM family."""
        stored = self.loaded.config.stored_generation("vqa").get("prompt")
        if stored:
            return stored
        return ENCODER_DECODER_TEMPLATE if self.model.is_encoder_decoder else DECODER_ONLY_TEMPLATE

    @property
    def default_caption_prompt(self) -> str:
        """The caption prompt the checkpoint was trained with, else none."""
        return self.loaded.config.stored_generation("caption").get("prompt") or ""

    def resolve(self, kind: str, flags: dict, **fixed) -> tuple[str, GenerationOptions, list[str]]:
        """(prompt or template, options, notes) for ``kind`` "vqa" or "caption": ``flags`` (None = not given)
        over what the checkpoint stored over ``ASK_DEFAULTS``; ``fixed`` options (sampling) are taken as they
        are. One note per flag that replaces a stored value."""
        stored = self.loaded.config.stored_generation(kind)
        values = {**ASK_DEFAULTS[kind], "prompt": self.default_template if kind == "vqa" else self.default_caption_prompt}
        values.update({k: v for k, v in stored.items() if k in values})
        notes = []
        for key, value in flags.items():
            if value is None:
                continue
            if key in stored and stored[key] != value:
                flag = "--prompt-template" if (key, kind) == ("prompt", "vqa") else _FLAGS.get(key, key)
                notes.append(f"{flag} {value!r} replaces the checkpoint's {stored[key]!r}")
            values[key] = value
        prompt = values.pop("prompt")
        return prompt, GenerationOptions(**values, **fixed), notes

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        batch = self.loaded.image_processor(images=list(images), return_tensors="pt")
        return batch["pixel_values"].to(self.device)

    def generate(self, images: Sequence, prompts: Sequence[str] | None, options: GenerationOptions) -> list[str]:
        """One output per image; ``prompts`` None or empty strings mean plain captioning. Generation stops
        at the token the checkpoint's training texts ended with, as ``blip2 eval`` does."""
        return self.generate_from_pixels(self.pixel_values(images), prompts, options)

    def generate_from_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str] | None,
                             options: GenerationOptions) -> list[str]:
        """``generate`` for images already processed (``pixel_values`` on any device)."""
        from blip2cli.models.text import generate_texts

        return generate_texts(self.model, self.tokenizer, pixel_values.to(self.device), prompts,
                              self.loaded.config.usage.get("end_token"), **options.generate_kwargs())

    def caption(self, image, prompt: str | None = None, options: GenerationOptions | None = None) -> str:
        """A caption; ``prompt`` None means the checkpoint's caption prompt (if any)."""
        prompt = self.default_caption_prompt if prompt is None else prompt
        return self.generate([image], [prompt] if prompt else None, options or self.resolve("caption", {})[1])[0]

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
        options = options or self.resolve("vqa", {})[1]
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
