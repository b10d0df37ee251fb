"""BLIP-2 model code: nothing here imports training, data or CLI code."""

from blip2cli.models.config import Blip2ModelConfig
from blip2cli.models.stage1 import Blip2Stage1Model, Stage1LossConfig
from blip2cli.models.stage2 import Blip2Stage2Model

__all__ = ["Blip2ModelConfig", "Blip2Stage1Model", "Blip2Stage2Model", "Stage1LossConfig"]
