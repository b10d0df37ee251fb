"""`blip2 eval TASK`: the paper's evaluations (VQA, GQA, captioning, retrieval), and `blip2 eval report`."""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from pathlib import Path
from typing import List, Optional

import typer

from blip2cli.cli import app
from blip2cli.cli._common import DEVICE, ROOT, dtype_option, quiet_libraries, stderr
from blip2cli.evaluation.tasks import _ALIASES, GQA_SCORINGS, PROTOCOLS, TASKS

EXAMPLES = """
Examples:

  blip2 eval vqav2                                  # FlanT5-XXL zero-shot on <root>/eval/vqav2 (val)

  blip2 eval vqav2 --model Salesforce/blip2-opt-2.7b --limit 1000      # a quick subset

  blip2 eval coco --model ./runs/caption_coco/final --batch-size 32

  blip2 eval gqa --questions testdev_balanced_questions.json --images gqa/images

  blip2 eval okvqa --model Salesforce/blip2-opt-2.7b --protocol lavis      # LAVIS's OPT prompt and length penalty

  blip2 eval gqa --predictions runs/eval/gqa-blip2-flan-t5-xl/predictions.json --gqa-scoring release   # as at release

  blip2 eval coco --predictions runs/eval/coco-blip2-opt-2.7b-coco/predictions.json   # re-score, no model

  blip2 eval nocaps --no-java                       # no Java: METEOR and SPICE skipped

  blip2 eval flickr30k --model runs/finetune_retrieval_coco --k-test 32   # a faster, approximate re-ranking

  blip2 eval coco_retrieval --limit 1000

  torchrun --nproc-per-node 8 -m blip2cli eval vqav2               # data-parallel

  blip2 eval report blip2-data/runs/eval                          # every run there, vs the paper

Rerun the same command to resume an interrupted evaluation: finished items are not generated again.
"""

REPORT_EXAMPLES = """
Examples:

  blip2 eval report blip2-data/runs/eval            # every evaluation run in the folder (others are skipped)

  blip2 eval report runs/eval/vqav2-blip2-flan-t5-xxl runs/eval/gqa-blip2-flan-t5-xxl
"""

eval_app = typer.Typer(
    name="eval",
    help="Evaluate a checkpoint with the paper's protocol (one subcommand per task), or compare runs (report).",
    epilog=EXAMPLES,
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(eval_app, name="eval")

GENERATION = {"vqa", "gqa", "caption"}


def _options(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint directory, run directory or hub id."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data directory with manifest.json (`blip2 download eval TASK`) [default: <root>/eval/TASK]."),
    split: Optional[str] = typer.Option(None, "--split", help="Split [default: val for VQAv2/OK-VQA/NoCaps, testdev for GQA, test otherwise]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory [default: <root>/runs/eval/TASK-MODEL]."),
    root: Optional[Path] = ROOT,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N items [default: all]."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per batch."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", min=0, help="Image-loading worker processes."),
    device: str = DEVICE,
    dtype: str = dtype_option("Frozen parts' dtype. auto: bfloat16 on a GPU that supports it, else float32."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="VQA template with {} for the question, or the caption prefix [default: the one the checkpoint was trained with, else the protocol's per task and LLM family]."),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", min=1, help="Beam width [default: 5]."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Generated tokens at most [default: 10 for VQA, 30 for captions]."),
    min_new_tokens: Optional[int] = typer.Option(None, "--min-new-tokens", min=0, help="Generated tokens at least [default: 1 for VQA, 8 for captions]."),
    protocol: str = typer.Option("paper", "--protocol", metavar="<" + "|".join(PROTOCOLS) + ">", help="Whose VQA generation defaults: paper (OPT: 'Question: {} Answer:', length penalty -1) or lavis (LAVIS's configs: 'Question: {} Short answer:', length penalty 0 for OPT); FlanT5 is the same in both. Recorded in metrics.json."),
    gqa_scoring: str = typer.Option("current", "--gqa-scoring", metavar="<" + "|".join(GQA_SCORINGS) + ">", help="GQA exact match: current (LAVIS today: prediction and ground truth normalised) or release (LAVIS at release: prediction only). Recorded in metrics.json."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", help="Beam-search length penalty, negative favours short outputs [default: the protocol's: -1 for VQA (lavis: 0 for OPT), 1 for captions]."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="Repetition penalty, 1.0 = none [default: 1.0]."),
    lemmatize: Optional[bool] = typer.Option(None, "--lemmatize/--no-lemmatize", help='Lemmatise answers with spaCy [default: on for okvqa; needs pip install -e ".[eval]" and python -m spacy download en_core_web_sm, or BLIP2_SPACY_MODEL=PATH].'),
    k_test: Optional[int] = typer.Option(None, "--k-test", min=1, help="ITC candidates re-ranked by ITM [default: 128]; recall at K > k-test is then not meaningful."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Score this predictions file (official JSON or predictions.jsonl) instead of running a model."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="Questions JSON, instead of the manifest."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="Annotations JSON (VQA answers, Karpathy or COCO captions), instead of the manifest."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Same as --annotations, for captioning and retrieval."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory, instead of the manifest's."),
    image_pattern: Optional[str] = typer.Option(None, "--image-pattern", help="Image file name, e.g. 'COCO_val2014_{image_id:012d}.jpg'."),
    restart: bool = typer.Option(False, "--restart", help="Discard the predictions of an earlier run in --out."),
    no_java: bool = typer.Option(False, "--no-java", help="Never start Java: Python PTB tokenisation, METEOR/SPICE skipped."),
) -> None:
    """The options of every task command (a template: each task shows those that apply to it)."""


# Options that apply to some kinds of task only; elsewhere they are hidden (and still accepted, for scripts).
APPLIES = {
    "prompt": GENERATION, "num_beams": GENERATION, "max_new_tokens": GENERATION, "min_new_tokens": GENERATION,
    "length_penalty": GENERATION, "repetition_penalty": GENERATION,
    "protocol": {"vqa", "gqa"}, "gqa_scoring": {"gqa"}, "lemmatize": {"vqa"}, "questions": {"vqa", "gqa"},
    "image_pattern": {"vqa"}, "annotations": {"vqa", "caption", "retrieval"}, "captions": {"caption", "retrieval"},
    "k_test": {"retrieval"}, "no_java": {"caption"},
}


def _task_command(task: str, name: str | None = None) -> None:
    """Register ``blip2 eval NAME`` (default: TASK; another name is a hidden alias): the template's options,
    ``--model``'s default named, those that do not apply to the task hidden."""
    spec = TASKS[task]
    template = inspect.signature(_options, eval_str=True)
    params = []
    for param in template.parameters.values():
        info = copy.copy(param.default)
        if param.name == "model":
            info.help += f" [default: {spec.default_model}, the checkpoint the paper reports {task} with]"
        if spec.kind not in APPLIES.get(param.name, {spec.kind}):
            info.hidden = True
        params.append(param.replace(default=info))

    def command(**options) -> None:
        _evaluate(task, **options)

    command.__signature__ = template.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = f"{spec.description} (default model: {spec.default_model})."
    eval_app.command(name or task, epilog=_examples(task), hidden=name is not None)(command)


def _examples(task: str) -> str:
    """The examples that evaluate ``task``, and the line on resuming."""
    lines = [line for line in EXAMPLES.splitlines() if f" eval {task} " in line + " "]
    if not lines:
        return EXAMPLES
    return "\nExamples:\n\n" + "\n\n".join(lines) + "\n\n" + EXAMPLES.strip().splitlines()[-1] + "\n"


for _task in TASKS:
    _task_command(_task)
for _alias, _task in _ALIASES.items():  # coco-retrieval, ok-vqa, flickr...: other spellings, kept working
    if _alias not in TASKS:
        _task_command(_task, name=_alias)


@eval_app.command("report", epilog=REPORT_EXAMPLES)
def report(
    run_dirs: List[Path] = typer.Argument(..., help="`blip2 eval` output directories, or folders holding them (others are skipped with a warning)."),
) -> None:
    """Compare evaluation runs with the paper: one row per run, its metrics beside the paper's."""
    from rich.console import Console

    from blip2cli.errors import Blip2Error
    from blip2cli.evaluation.report import collect_runs, report_table

    runs, skipped = collect_runs(run_dirs)
    for path, why in skipped:
        stderr.print(f"[yellow]warning:[/yellow] skipped {path}: {why}", highlight=False, soft_wrap=True)
    if not runs:
        raise Blip2Error(f"no `blip2 eval` output (a directory with metrics.json) among {', '.join(map(str, run_dirs))}")
    Console().print(report_table(runs))


def _evaluate(task, model, data, split, out, root, limit, batch_size, workers, device, dtype, prompt, num_beams,
              max_new_tokens, min_new_tokens, protocol, gqa_scoring, length_penalty, repetition_penalty, lemmatize,
              k_test, predictions, questions, annotations, captions, images, image_pattern, restart, no_java) -> None:
    quiet_libraries()
    from rich.console import Console

    from blip2cli.errors import Blip2Error
    from blip2cli.evaluation import default_settings, load_eval_data, rescore, run_eval, task_spec
    from blip2cli.evaluation.tasks import check_gqa_scoring, model_folder_name, resolve_settings

    out_console = Console()
    spec = task_spec(task)
    if annotations and captions:
        raise Blip2Error("pass either --annotations or --captions, not both")
    eval_data = load_eval_data(
        spec.name, data_dir=data if data is not None else _default_data(spec.name, root, questions, annotations or captions, images),
        split=split, questions=questions, annotations=annotations or captions, images=images, image_pattern=image_pattern,
    )
    use_java = False if no_java else None
    overrides = dict(prompt=prompt, num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                     length_penalty=length_penalty, repetition_penalty=repetition_penalty, lemmatize=lemmatize,
                     k_test=k_test, gqa_scoring=check_gqa_scoring(gqa_scoring))

    if predictions is not None:
        settings = _apply(default_settings(spec.name, protocol=protocol), overrides)
        target = out or _runs(root) / f"{spec.name}-{predictions.resolve().parent.name}-rescored"
        result = rescore(spec.name, eval_data, predictions, settings=settings, out_dir=target, limit=limit,
                         use_java=use_java)
        _finish(out_console, result, f"re-scored {predictions}")
        return

    from blip2cli.checkpoint import load_model
    from blip2cli.cli._generation import device_for_rank
    from blip2cli.inference import resolve_dtype

    model_id = model or spec.default_model
    if Path(model_id).expanduser().is_dir():  # a local checkpoint: record it independently of the cwd
        model_id = str(Path(model_id).expanduser().resolve())
    torch_device = device_for_rank(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with stderr.status(f"loading {model_id}", spinner="dots") if stderr.is_terminal else contextlib.nullcontext():
        loaded = load_model(model_id, dtype=torch_dtype, device=torch_device)
    encoder_decoder = bool(getattr(loaded.model, "is_encoder_decoder", False))
    settings, replaced = resolve_settings(spec.name, loaded.config, encoder_decoder, overrides, protocol=protocol)
    for line in replaced:
        stderr.print(f"[yellow]{line}[/yellow]", highlight=False)
    target = out or _runs(root) / f"{spec.name}-{model_folder_name(model_id)}"
    from blip2cli.distributed import process_group_ended

    with process_group_ended():
        result = run_eval(
            spec.name, loaded, eval_data, settings=settings, out_dir=target, limit=limit, batch_size=batch_size,
            num_workers=workers, restart=restart, model_name=model_id, use_java=use_java,
        )
    _finish(out_console, result, f"generated {result.generated}, reused {result.reused} from an earlier run")


def _default_data(task: str, root, questions, annotations, images) -> Optional[Path]:
    if questions or annotations or images:
        return None
    from blip2cli.data.workspace import eval_dir

    return eval_dir(task, root)


def _runs(root) -> Path:
    from blip2cli.data.workspace import runs_dir

    return runs_dir("eval", root)


def _apply(settings, overrides: dict):
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings


def _finish(console, result, summary: str) -> None:
    from blip2cli.evaluation.report import metrics_table, output_warnings
    from blip2cli.distributed import group_rank_and_world as rank_and_world

    if rank_and_world()[0] != 0:
        return
    console.print(metrics_table(result.metrics))
    warnings = set(output_warnings(result.metrics))
    for note in result.metrics.get("notes", []):
        label = "[bold yellow]warning:[/bold yellow]" if note in warnings else "[yellow]note:[/yellow]"
        stderr.print(f"{label} {note}", highlight=False)
    skipped = result.metrics.get("skipped") or []
    if skipped:
        stderr.print(f"skipped: {', '.join(skipped)}", highlight=False)
    stderr.print(f"{summary}; results in {result.out_dir}", highlight=False)
