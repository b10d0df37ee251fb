from __future__ import annotations

from pathlib import Path

import typer

from blip2cli.cli import app
from blip2cli.cli._common import quiet_libraries, stderr

EXAMPLES = """
Examples:

  blip2 export runs/stage2/final hf-blip2          # then Blip2ForConditionalGeneration.from_pretrained("hf-blip2")

  blip2 export runs/stage1/final hf-blip2-itm      # stage 1 -> Blip2ForImageTextRetrieval (+ ITG head sidecar)
"""


@app.command(epilog=EXAMPLES)
def export(
    checkpoint: str = typer.Argument(..., help="A blip2 checkpoint directory (or any BLIP-2 checkpoint / hub id)."),
    out_dir: Path = typer.Argument(..., help="Where to write the transformers-format directory."),
) -> None:
    """Write a checkpoint that transformers' Blip2 classes and AutoProcessor load unchanged.

    Stage-2 checkpoints become Blip2ForConditionalGeneration; stage-1 checkpoints become
    Blip2ForImageTextRetrieval, with the ITC temperature and ITG head kept beside it in
    blip2cli_extras.safetensors. Encoders transformers cannot represent (CLIP ViT-L) are refused.
    """
    quiet_libraries()
    from blip2cli.checkpoint import load_model, save_model

    loaded = load_model(checkpoint)
    save_model(
        loaded.model,
        out_dir,
        tokenizer=loaded.tokenizer,
        image_processor=loaded.image_processor,
        qformer_tokenizer=loaded.qformer_tokenizer,
        require_transformers_format=True,
    )
    kind = "Blip2ForImageTextRetrieval" if loaded.stage == 1 else "Blip2ForConditionalGeneration"
    stderr.print(f"[green]exported[/green] {checkpoint} -> {out_dir} ({kind})")
