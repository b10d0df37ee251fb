from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from blip2cli.cli import _generation as G
from blip2cli.cli import app
from blip2cli.cli._common import quiet_libraries, stderr

EXAMPLES = """
Examples:

  blip2 ask photo.jpg                                   # a caption

  blip2 ask photo.jpg "what is the man holding?"        # an answer, and only the answer, on stdout

  blip2 ask photo.jpg --prompt "a photo of"             # a caption continuing a prompt

  blip2 ask https://example.com/cat.jpg -i --model ./runs/stage2/final   # ask question after question

  blip2 ask photos/ "how many people are there?" --out answers.jsonl      # one question, many images

  blip2 ask --questions vqa.jsonl --out answers.jsonl   # {"image": ..., "question": ...} per line

  blip2 ask 'shards/{00000..00009}.tar' "is it indoors?" --quantize 8bit --out answers.jsonl

Given a folder, glob, list file (.txt) or webdataset shards, or --out / --questions, ask answers in batches
and writes one JSON record per image (stdout without --out). Rerun the same command to resume.
"""


@app.command(epilog=EXAMPLES)
def ask(
    image: Optional[str] = typer.Argument(None, help="Image path or http(s) URL; or a folder, glob, list file or .tar shards for many."),
    question: Optional[str] = typer.Argument(None, help="A question; without one you get a caption."),
    model: str = G.MODEL,
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Keep the image loaded and answer question after question."),
    prompt_template: Optional[str] = G.PROMPT_TEMPLATE,
    prompt: Optional[str] = G.PROMPT,
    num_beams: Optional[int] = G.NUM_BEAMS,
    max_new_tokens: Optional[int] = G.MAX_NEW_TOKENS,
    min_new_tokens: Optional[int] = G.MIN_NEW_TOKENS,
    length_penalty: Optional[float] = G.LENGTH_PENALTY,
    repetition_penalty: float = G.REPETITION_PENALTY,
    sample: bool = G.SAMPLE,
    top_p: float = G.TOP_P,
    temperature: float = G.TEMPERATURE,
    seed: Optional[int] = G.SEED,
    device: str = G.DEVICE,
    dtype: str = G.DTYPE,
    quantize: Optional[str] = G.QUANTIZE,
    device_map: Optional[str] = G.DEVICE_MAP,
    questions: Optional[Path] = typer.Option(None, "--questions", help='JSONL of {"image": PATH, "question": TEXT} lines (many images, a question each).'),
    out: Optional[Path] = G.OUT,
    batch_size: int = G.BATCH_SIZE,
    workers: int = G.WORKERS,
    out_shards: Optional[Path] = G.OUT_SHARDS,
    restart: bool = G.RESTART,
) -> None:
    """Caption an image, or answer a question about it (or about many images: see the examples)."""
    quiet_libraries()
    import torch

    from blip2cli.errors import Blip2Error
    from blip2cli.images import load_image
    from blip2cli.inference import GenerationOptions
    from blip2cli.inference.inputs import names_many_images

    many = questions is not None or out is not None or out_shards is not None or (image is not None and names_many_images(image))
    if many and interactive:
        raise Blip2Error("--interactive takes one image, not a folder, list, shards, --questions or --out")
    if questions is not None and (image is not None or question is not None):
        raise Blip2Error("with --questions, give no IMAGE or QUESTION arguments (the file names both)")
    if image is None and questions is None:
        raise Blip2Error("give an IMAGE (or --questions FILE)")
    if many:
        from blip2cli.inference.batch import question_jobs, read_questions
        from blip2cli.inference.inputs import collect_images

        jobs = read_questions(questions) if questions is not None else None
        refs = collect_images([image]) if image is not None else None  # fail on bad input before loading
    else:
        picture = load_image(image)  # fail on a bad image before spending time on the model
    if seed is not None:
        torch.manual_seed(seed)
    assistant = G.load_assistant(model, device, dtype, quantize, device_map)

    flags = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                 length_penalty=length_penalty)
    fixed = dict(repetition_penalty=repetition_penalty, sample=sample, top_p=top_p, temperature=temperature)
    # Flags over what the checkpoint was trained with over ask's defaults; a flag that replaces a stored value says so.
    template, vqa_options, vqa_notes = assistant.resolve("vqa", {**flags, "prompt": prompt_template}, **fixed)
    caption_prompt, caption_options, caption_notes = assistant.resolve("caption", {**flags, "prompt": prompt}, **fixed)
    asks = bool(question or interactive or questions)
    G.print_notes((vqa_notes if asks else []) + (caption_notes if not question and not questions or interactive else []))

    if many:
        if jobs is None:
            from blip2cli.inference.batch import caption_jobs

            jobs = question_jobs(refs, question) if question else caption_jobs(refs)
        prompt_used, options_used = (template, vqa_options) if asks else (caption_prompt, caption_options)
        G.run_many(assistant, jobs, prompt_used, options_used, model, out, batch_size, workers, restart, out_shards)
        return

    def options(is_question: bool) -> GenerationOptions:
        return vqa_options if is_question else caption_options

    if not interactive:
        if question:
            print(assistant.answer(picture, question, template, options=options(True)))
        else:
            print(assistant.caption(picture, caption_prompt, options=options(False)))
        return
    _repl(assistant, picture, question, template, options, caption_prompt)


REPL_COMMANDS = {
    "/caption": "caption the image",
    "/image PATH": "switch to another image (the conversation starts over)",
    "/reset": "forget the conversation",
    "/help": "list these commands",
    "/quit": "end (so does an empty line)",
}


def _repl(assistant, picture, first_question, template, options, caption_prompt) -> None:
    """Question after question about one image; earlier turns are kept as context."""
    from rich.console import Console

    from blip2cli.errors import Blip2Error
    from blip2cli.images import load_image

    out = Console()
    history: list[tuple[str, str]] = []
    listing = ", ".join(REPL_COMMANDS)
    stderr.print(f"[dim]Ask about the image; commands: {listing}.[/dim]", highlight=False, soft_wrap=True)
    question = first_question
    while True:
        if question is None:
            try:
                question = out.input("[bold cyan]? [/bold cyan]") if out.is_terminal else input()
            except EOFError:
                break
        question = question.strip()
        command, _, argument = question.partition(" ")
        if question in ("", "/quit", "/exit"):
            break
        if not question.startswith("/"):
            answer = assistant.answer(picture, question, template, history=history, options=options(True))
            history.append((question, answer))
            out.print(f"[bold green]{answer}[/bold green]" if out.is_terminal else answer, highlight=False, soft_wrap=True)
        elif command == "/reset":
            history.clear()
            stderr.print("conversation forgotten", highlight=False, soft_wrap=True)
        elif command == "/caption":
            out.print(assistant.caption(picture, caption_prompt, options=options(False)), highlight=False, soft_wrap=True)
        elif command == "/image" and argument.strip():
            try:
                picture = load_image(argument.strip())
                history.clear()
                stderr.print(f"now asking about {argument.strip()} (conversation started over)", highlight=False, soft_wrap=True)
            except Blip2Error as err:
                print(f"blip2: error: {err}", file=sys.stderr)
        elif command == "/help":
            for name, what in REPL_COMMANDS.items():
                stderr.print(f"  {name:<12} {what}", highlight=False, soft_wrap=True)
        else:
            usage = "/image needs a path: /image PATH" if command == "/image" else f"unknown command {command}"
            stderr.print(f"{usage}; commands: {listing} (a question cannot start with /)", highlight=False, soft_wrap=True)
        question = None
