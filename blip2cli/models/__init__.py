"""BLIP-2 model code: nothing here imports training, data or CLI code.

The classes below are imported on first use, so that light modules of this package (``preprocessing``)
can be imported without torch and transformers.
"""

from blip2cli.lazy import lazy_attributes

__all__ = ["Blip2ModelConfig", "Blip2Stage1Model", "Blip2Stage2Model", "Stage1LossConfig"]

_WHERE = {
    "Blip2ModelConfig": "blip2cli.models.config",
    "Blip2Stage1Model": "blip2cli.models.stage1",
    "Stage1LossConfig": "blip2cli.models.stage1",
    "Blip2Stage2Model": "blip2cli.models.stage2",
}


__getattr__ = lazy_attributes(__name__, _WHERE)
