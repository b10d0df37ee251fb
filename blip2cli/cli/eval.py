"""`blip2 eval`: the paper's evaluations (VQA, GQA, captioning, retrieval) and `blip2 eval report`."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer

from blip2cli.cli import app
from blip2cli.cli._common import quiet_libraries, stderr
from blip2cli.cli._generation import device_for_rank

EXAMPLES = """
Tasks: vqav2, okvqa, gqa (zero-shot VQA), coco, nocaps (captioning), flickr30k, coco_retrieval (retrieval).

Examples:

  blip2 eval vqav2                                  # FlanT5-XXL zero-shot on <root>/eval/vqav2 (val)

  blip2 eval vqav2 --model Salesforce/blip2-opt-2.7b --limit 1000      # a quick subset

  blip2 eval coco --model ./runs/caption_coco/final --batch-size 32

  blip2 eval gqa --questions testdev_balanced_questions.json --images gqa/images

  blip2 eval okvqa --model Salesforce/blip2-opt-2.7b --protocol lavis      # LAVIS's OPT prompt and length penalty

  blip2 eval gqa --predictions runs/eval/gqa-blip2-flan-t5-xl/predictions.json --gqa-scoring release   # as at release

  blip2 eval coco --predictions runs/eval/coco-blip2-opt-2.7b-coco/predictions.json   # re-score, no model

  torchrun --nproc-per-node 8 -m blip2cli eval vqav2               # data-parallel

  blip2 eval report runs/eval/vqav2-blip2-flan-t5-xxl runs/eval/gqa-blip2-flan-t5-xxl   # vs the paper

Rerun the same command to resume an interrupted evaluation: finished items are not generated again.
"""


@app.command(name="eval", epilog=EXAMPLES)
def eval_command(
    task: str = typer.Argument(..., help="vqav2, okvqa, gqa, coco, nocaps, flickr30k, coco_retrieval, or 'report'."),
    run_dirs: Optional[list[str]] = typer.Argument(None, help="With 'report': the run directories to compare."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint directory or hub id [default: the paper's checkpoint for TASK]."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data directory with manifest.json [default: <root>/eval/TASK]."),
    split: Optional[str] = typer.Option(None, "--split", help="Split [default: val for VQAv2/OK-VQA/NoCaps, testdev for GQA, test otherwise]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory [default: <root>/runs/eval/TASK-MODEL]."),
    root: Optional[Path] = typer.Option(None, "--root", help="Workspace root (default: $BLIP2_HOME, else ./blip2-data)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N items."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per batch."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", min=0, help="Image-loading worker processes."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16 (frozen parts only)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="VQA template with {} for the question, or the caption prefix [default: the one the checkpoint was trained with, else per task and LLM family]."),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", min=1, help="Beam width [default 5]."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="[default: 10 VQA, 30 captions]."),
    min_new_tokens: Optional[int] = typer.Option(None, "--min-new-tokens", min=0, help="[default: 1 VQA, 8 captions]."),
    protocol: str = typer.Option("paper", "--protocol", help="Whose VQA generation defaults: paper (OPT: 'Question: {} Answer:', length penalty -1) or lavis (LAVIS's configs: 'Question: {} Short answer:', length penalty 0 for OPT); FlanT5 is the same in both. Recorded in metrics.json."),
    gqa_scoring: str = typer.Option("current", "--gqa-scoring", help="GQA exact match: current (LAVIS today: prediction and ground truth normalised) or release (LAVIS at release: prediction only). Recorded in metrics.json."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", help="[default: the protocol's: -1 for VQA (lavis: 0 for OPT), 1 captions]."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="[default 1.0]."),
    lemmatize: Optional[bool] = typer.Option(None, "--lemmatize/--no-lemmatize", help='Lemmatise answers with spaCy [default: on for okvqa; needs pip install -e ".[eval]" and python -m spacy download en_core_web_sm, or BLIP2_SPACY_MODEL=PATH].'),
    k_test: Optional[int] = typer.Option(None, "--k-test", min=1, help="Retrieval: ITC candidates re-ranked by ITM [default 128]."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Score this predictions file (official JSON or predictions.jsonl) instead of running a model."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="Questions JSON (VQA, GQA), instead of the manifest."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="Annotations JSON (VQA answers, Karpathy or COCO captions)."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Same as --annotations, for captioning and retrieval."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image directory."),
    image_pattern: Optional[str] = typer.Option(None, "--image-pattern", help="VQA image file name, e.g. 'COCO_val2014_{image_id:012d}.jpg'."),
    restart: bool = typer.Option(False, "--restart", help="Discard the predictions of an earlier run in --out."),
    no_java: bool = typer.Option(False, "--no-java", help="Never start Java: Python PTB tokenisation, METEOR/SPICE skipped."),
) -> None:
    """Evaluate a BLIP-2 checkpoint with the paper's protocol, or compare runs with `blip2 eval report`."""
    quiet_libraries()
    from rich.console import Console

    from blip2cli.errors import Blip2Error
    from blip2cli.evaluation import default_settings, load_eval_data, rescore, run_eval, task_spec
    from blip2cli.evaluation.tasks import check_gqa_scoring, resolve_settings
    from blip2cli.evaluation.report import report_table

    out_console = Console()
    if task == "report":
        if not run_dirs:
            raise Blip2Error("blip2 eval report needs at least one run directory")
        out_console.print(report_table(run_dirs))
        return
    spec = task_spec(task)
    if run_dirs:
        raise Blip2Error(f"unexpected arguments after the task: {' '.join(run_dirs)}")
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
    from blip2cli.inference import resolve_dtype

    model_id = model or spec.default_model
    if Path(model_id).expanduser().is_dir():  # a local checkpoint: record it independently of the cwd
        model_id = str(Path(model_id).expanduser().resolve())
    torch_device = device_for_rank(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with stderr.status(f"loading {model_id}", spinner="dots") if stderr.is_terminal else nullcontext():
        loaded = load_model(model_id, dtype=torch_dtype, device=torch_device)
    encoder_decoder = bool(getattr(loaded.model, "is_encoder_decoder", False))
    settings, replaced = resolve_settings(spec.name, loaded.config, encoder_decoder, overrides, protocol=protocol)
    for line in replaced:
        stderr.print(f"[yellow]{line}[/yellow]", highlight=False)
    target = out or _runs(root) / f"{spec.name}-{_model_name(model_id)}"
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


def _model_name(model_id: str) -> str:
    """The output folder's model part: a checkpoint directory's name, with its run's for RUN/final and RUN/step-N."""
    path = Path(str(model_id).rstrip("/"))
    if path.name == "final" or path.name.startswith("step-"):
        return f"{path.parent.name}-{path.name}"
    return path.name or "model"


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
