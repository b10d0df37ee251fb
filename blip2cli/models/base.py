"""What both BLIP-2 stages share: frozen image encoder -> ``ln_vision`` -> learned queries -> Q-Former.

Attribute names are transformers' (``vision_model``, ``query_tokens``, ``qformer``), so state dicts
line up with ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` key for key.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerModel

from blip2cli.models.config import Blip2ModelConfig
from blip2cli.models.vision import encode_images, freeze_trunk, ln_vision


class Blip2Base(nn.Module):
    def __init__(
        self,
        config: Blip2ModelConfig,
        vision_model: nn.Module,
        qformer: Blip2QFormerModel,
        query_tokens: torch.Tensor | None = None,
        train_vision: bool = False,
    ):
        super().__init__()
        self.config = config
        self.vision_model = vision_model
        if query_tokens is None:
            # BLIP-2 initialises the queries N(0, 0.02) (LAVIS blip2.py L57-60).
            query_tokens = torch.randn(1, config.num_query_tokens, qformer.config.hidden_size) * 0.02
        self.query_tokens = nn.Parameter(query_tokens.detach().clone() if query_tokens.requires_grad else query_tokens)
        self.qformer = qformer
        self.train_vision = train_vision
        if not train_vision:
            freeze_trunk(self.vision_model)

    # ----------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts stay in eval mode (no dropout / drop-path), as in LAVIS.
        if not self.train_vision:
            self.vision_model.eval()
        return self

    # ----------------------------------------------------------------- image -> queries
    def image_features(self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool = False,
                       vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, tokens, vision width) after ``ln_vision``.

        ``pixel_values``: normalised floats, or uint8 pixels as the training loaders send them, normalised here
        on their device with the model's own mean/std (``ImagePreprocessing.normalized``; bit-identical to
        normalising on the host with torchvision).
        ``vision_features``: instead of images, the frozen trunk's output for them (B, tokens, width), as a
        frozen-feature cache stores it; only ``ln_vision`` runs. Refused while the image encoder trains.
        """
        if vision_features is not None:
            if pixel_values is not None:
                raise ValueError("pass pixel_values or vision_features, not both")
            if self.train_vision:
                raise ValueError("vision_features (cached frozen features) need a frozen image encoder")
            return ln_vision(self.vision_model, vision_features)
        if pixel_values is None:
            raise ValueError("pixel_values or vision_features is needed")
        return (getattr(self, "_encode_images", None) or encode_images)(
            self.vision_model,
            self.config.preprocessing.normalized(pixel_values),
            train_trunk=self.train_vision,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )

    # ----------------------------------------------------------------- throughput switches
    def frozen_modules(self) -> list[nn.Module]:
        """The parts that never train: the image encoder (its trunk; ``ln_vision`` trains) unless it trains."""
        return [] if self.train_vision else [self.vision_model]

    def trainable_deep_modules(self) -> list[nn.Module]:
        """The parts whose activations backward needs: the Q-Former, and the image encoder when it trains."""
        return [self.qformer, *([self.vision_model] if self.train_vision else [])]

    def enable_gradient_checkpointing(self) -> list[str]:
        """Recompute the activations of every trainable deep part in backward (``train.grad_checkpointing``);
        returns the names of the parts that support it and got it."""
        enabled = []
        for module in self.trainable_deep_modules():
            if enable_checkpointing(module):
                enabled.append(next(name for name, m in self.named_children() if m is module))
        return enabled

    def compile_parts(self, vision: bool, qformer: bool, **options) -> None:
        """``torch.compile`` the image encoder (trunk + ``ln_vision``) and/or the Q-Former, separately
        (``train.compile_vision`` / ``train.compile_qformer``). In place: parameter names and the state dict
        are unchanged."""
        if vision:
            self._encode_images = torch.compile(encode_images, **options)
        if qformer:
            self.qformer.compile(**options)

    def query_outputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Query-only Q-Former pass with cross-attention to the image: (B, NQ, hidden)."""
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        # No encoder_attention_mask: every image token is valid, and transformers drops an all-ones mask in
        # eager mode anyway; under torch.compile it would materialise one of the wrong length.
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, return_dict=True).last_hidden_state

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}


def enable_checkpointing(module: nn.Module) -> bool:
    """Activation checkpointing through whichever switch the module (or its first descendant that has one)
    offers: transformers' ``gradient_checkpointing_enable``, open_clip/timm's ``set_grad_checkpointing``."""
    if hasattr(module, "gradient_checkpointing_enable") and getattr(module, "supports_gradient_checkpointing", True):
        module.gradient_checkpointing_enable()
        return True
    if hasattr(module, "set_grad_checkpointing"):
        module.set_grad_checkpointing(True)
        return True
    return any(enable_checkpointing(child) for child in module.children())


def store_frozen_parts_in(model: Blip2Base, dtype: torch.dtype) -> int:
    """Store the frozen parts' parameters (the image encoder's trunk, a frozen LLM) in ``dtype``, the
    autocast dtype; returns how many parameters changed dtype. Trainable parameters (``ln_vision``) and
    buffers (rotary frequencies) keep theirs; tied weights stay tied.

    Stored in another half precision than autocast's (the recipes' fp16 under bf16 autocast), the frozen
    parts are cast at every forward, the cast copies are kept alive until backward (a second frozen LLM in
    memory), and ops autocast promotes (``torch.cat`` of an fp16 and a bf16 tensor) fail outright.
    """
    converted = 0
    for part in model.frozen_modules():
        for p in part.parameters():
            if p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                continue
            p.data = p.data.to(dtype)
            converted += p.numel()
    return converted
