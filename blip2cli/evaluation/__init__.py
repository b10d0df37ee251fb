"""Evaluation of BLIP-2 models with the paper's protocols (``blip2 eval``; spec sections (g), (h)).

- ``load_eval_data(task, data_dir, split, ...)`` reads the official annotation formats;
- ``run_eval(task, model, data, settings=..., out_dir=...)`` batched, resumable, data-parallel evaluation;
- ``evaluate(task, model, data, limit)`` the same in memory, for in-loop validation during training;
- ``rescore(task, data, predictions)`` scores an existing predictions file;
- ``metrics`` holds the official metric implementations, ``tasks`` the defaults and the paper's numbers.
"""

from blip2cli.evaluation.datasets import EvalData, EvalItem, load_eval_data
from blip2cli.evaluation.runner import RunResult, evaluate, rescore, run_eval
from blip2cli.evaluation.tasks import TASKS, EvalSettings, default_settings, task_spec

__all__ = [
    "TASKS", "EvalData", "EvalItem", "EvalSettings", "RunResult", "default_settings", "evaluate",
    "load_eval_data", "rescore", "run_eval", "task_spec",
]
