"""Tiny random models for tests, the CPU demo and smoke runs: the ``tiny`` prefix of model names.

A recipe names them like any other part (``model.vision = "tiny"``, ``model.qformer_init = "tiny"``,
``model.llm = "tiny-opt"`` / ``"tiny-t5"``); the model builder hands every name with a registered prefix to
its resolver (``training/builders.py: PART_RESOLVERS``), as open_clip resolves ``hf-hub:`` names, and
knows nothing else about them. What makes them more than random weights lives here:

- ``resolver``: the configs (2 layers, hidden 32), vocabularies trained on the run's own captions (read
  from the training shards the build is given), and a text-only pre-training of the tiny LLMs before they
  are frozen (BLIP-2 bridges a *pre-trained* LLM).
- ``tokenizers``: BERT/OPT/T5-style tokenizers trained from text in under a second (no vocabulary file
  ships with transformers, and nothing can be downloaded in tests).
- ``text_pretraining``: that text-only pre-training.
"""
