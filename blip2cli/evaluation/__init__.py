"""Evaluation of BLIP-2 models with the paper's protocols (``blip2 eval``; spec sections (g), (h)).

- ``load_eval_data(task, data_dir, split, ...)`` reads the official annotation formats;
- ``run_eval(task, model, data, settings=..., out_dir=...)`` batched, resumable, data-parallel evaluation;
- ``evaluate(task, model, data, limit)`` the same in memory, for in-loop validation during training;
- ``rescore(task, data, predictions)`` scores an existing predictions file;
- ``metrics`` holds the official metric implementations, ``tasks`` the defaults and the paper's numbers,
  ``report`` the tables of ``blip2 eval`` and ``blip2 eval report``.

The names below are imported on first use, so that ``tasks`` (and the CLI) load without torch.
"""

from blip2cli.lazy import lazy_attributes

__all__ = [
    "TASKS", "EvalData", "EvalItem", "EvalSettings", "RunResult", "default_settings", "evaluate",
    "load_eval_data", "rescore", "run_eval", "task_spec",
]

_WHERE = {
    "EvalData": "blip2cli.evaluation.datasets",
    "EvalItem": "blip2cli.evaluation.datasets",
    "load_eval_data": "blip2cli.evaluation.datasets",
    "RunResult": "blip2cli.evaluation.runner",
    "evaluate": "blip2cli.evaluation.runner",
    "rescore": "blip2cli.evaluation.runner",
    "run_eval": "blip2cli.evaluation.runner",
    "TASKS": "blip2cli.evaluation.tasks",
    "EvalSettings": "blip2cli.evaluation.tasks",
    "default_settings": "blip2cli.evaluation.tasks",
    "task_spec": "blip2cli.evaluation.tasks",
}


__getattr__ = lazy_attributes(__name__, _WHERE)
