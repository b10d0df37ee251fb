"""blip2: BLIP-2 (Li et al. 2023) reproduced and made practical.

The package is layered so that the architecture is visible from the folders:

- ``blip2cli.models``   model code only (Q-Former, encoders, stage-1/stage-2 models, losses).
                        Imports nothing from training or CLI code.
- ``blip2cli.checkpoint`` self-describing checkpoint directories and transformers interop.
- ``blip2cli.inference`` ask, batched captioning, features, search and low-memory loading (``blip2 ask``, ``caption``, ``embed``...).
- ``blip2cli.cli``      the Typer application: argument parsing and printing, no logic.
"""

__version__ = "0.1.0"
