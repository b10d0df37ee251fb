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
        return encode_images(
            self.vision_model,
            pixel_values,
            train_trunk=self.train_vision,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )

    def query_outputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Query-only Q-Former pass with cross-attention to the image: (B, NQ, hidden)."""
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        ).last_hidden_state

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}
