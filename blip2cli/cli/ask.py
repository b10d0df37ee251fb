from __future__ import annotations

import sys
from typing import Optional

import typer

from blip2cli.checkpoint import DEFAULT_MODEL
from blip2cli.cli import app
from blip2cli.cli._common import quiet_libraries, stderr

EXAMPLES = """
Examples:

  blip2 ask photo.jpg                                   # a caption

  blip2 ask photo.jpg "what is the man holding?"        # an answer, and only the answer, on stdout

  blip2 ask photo.jpg --prompt "a photo of"             # a caption continuing a prompt

  blip2 ask https://example.com/cat.jpg -i --model ./runs/stage2/final   # ask question after question
"""


@app.command(epilog=EXAMPLES)
def ask(
    image: str = typer.Argument(..., help="Image path or http(s) URL."),
    question: Optional[str] = typer.Argument(None, help="A question; without one you get a caption."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Checkpoint directory or hub id."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Keep the image loaded and answer question after question."),
    prompt_template: Optional[str] = typer.Option(
        None, help="VQA prompt; {} is the question. Default: the one the checkpoint was trained with, else "
        "'Question: {} Answer:' (decoder-only LLMs) or 'Question: {} Short answer:' (encoder-decoder)."
    ),
    prompt: Optional[str] = typer.Option(None, help="Text the caption continues (captioning only), e.g. 'a photo of' [default: the checkpoint's caption prompt, else none]."),
    num_beams: Optional[int] = typer.Option(None, min=1, help="Beam width, 1 = greedy [default: the checkpoint's, else 5]."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="Generated tokens at most [default: the checkpoint's, else 30 for captions, 10 for answers]."),
    min_new_tokens: Optional[int] = typer.Option(None, min=0, help="Generated tokens at least [default: the checkpoint's, else 1]."),
    length_penalty: Optional[float] = typer.Option(None, help="Beam-search length penalty, negative favours short outputs [default: the checkpoint's, else 1.0]."),
    repetition_penalty: float = typer.Option(1.0, help="Repetition penalty (1.0 = none)."),
    sample: bool = typer.Option(False, "--sample", help="Nucleus sampling instead of beam search."),
    top_p: float = typer.Option(0.9, help="Nucleus probability mass when sampling."),
    temperature: float = typer.Option(1.0, help="Softmax temperature when sampling."),
    seed: Optional[int] = typer.Option(None, help="Random seed (for --sample)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16, float16 (frozen parts only)."),
) -> None:
    """Caption an image, or answer a question about it."""
    quiet_libraries()
    import torch

    from blip2cli.checkpoint import load_model
    from blip2cli.images import load_image
    from blip2cli.inference import Blip2Assistant, GenerationOptions, resolve_device, resolve_dtype

    picture = load_image(image)  # fail on a bad image before spending time on the model
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if seed is not None:
        torch.manual_seed(seed)
    with stderr.status(f"loading {model}", spinner="dots") if stderr.is_terminal else _nothing():
        assistant = Blip2Assistant(load_model(model, dtype=torch_dtype, device=torch_device), torch_device)

    flags = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                 length_penalty=length_penalty)
    fixed = dict(repetition_penalty=repetition_penalty, sample=sample, top_p=top_p, temperature=temperature)
    # Flags over what the checkpoint was trained with over ask's defaults; a flag that replaces a stored value says so.
    template, vqa_options, vqa_notes = assistant.resolve("vqa", {**flags, "prompt": prompt_template}, **fixed)
    caption_prompt, caption_options, caption_notes = assistant.resolve("caption", {**flags, "prompt": prompt}, **fixed)
    for note in (vqa_notes if question or interactive else []) + (caption_notes if not question or interactive else []):
        stderr.print(f"[yellow]{note}[/yellow]", highlight=False)

    def options(is_question: bool) -> GenerationOptions:
        return vqa_options if is_question else caption_options

    if not interactive:
        if question:
            print(assistant.answer(picture, question, template, options=options(True)))
        else:
            print(assistant.caption(picture, caption_prompt, options=options(False)))
        return
    _repl(assistant, picture, question, template, options, caption_prompt)


def _repl(assistant, picture, first_question, template, options, caption_prompt) -> None:
    """Question after question about one image; earlier turns are kept as context."""
    from rich.console import Console

    from blip2cli.errors import Blip2Error
    from blip2cli.images import load_image

    out = Console()
    history: list[tuple[str, str]] = []
    stderr.print("[dim]Ask about the image. Empty line or /quit ends, /reset forgets the conversation, "
              "/caption captions, /image PATH switches image.[/dim]", highlight=False)
    question = first_question
    while True:
        if question is None:
            try:
                question = out.input("[bold cyan]? [/bold cyan]") if out.is_terminal else input()
            except EOFError:
                break
        question = question.strip()
        if question in ("", "/quit", "/exit"):
            break
        if question == "/reset":
            history.clear()
        elif question == "/caption":
            out.print(assistant.caption(picture, caption_prompt, options=options(False)), highlight=False)
        elif question.startswith("/image "):
            try:
                picture = load_image(question.split(" ", 1)[1].strip())
                history.clear()
            except Blip2Error as err:
                print(f"blip2: error: {err}", file=sys.stderr)
        else:
            answer = assistant.answer(picture, question, template, history=history, options=options(True))
            history.append((question, answer))
            out.print(f"[bold green]{answer}[/bold green]" if out.is_terminal else answer, highlight=False)
        question = None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
