from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from blip2cli.cli import app
from blip2cli.cli._common import stderr

recipes_app = typer.Typer(
    name="recipes",
    help="List, show and copy the shipped TOML training recipes.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(recipes_app, name="recipes")

LIST_EXAMPLES = """
Examples:

  blip2 recipes list
"""

SHOW_EXAMPLES = """
Examples:

  blip2 recipes show pretrain_stage1_vitg                         # every key with its help, marked against the paper and LAVIS

  blip2 recipes show pretrain_stage1_vitg loss.itg=0 optim.betas=[0.9,0.999]   # with overrides applied

  blip2 recipes show ./mine.toml --no-comments                    # a recipe file of your own, bare
"""

COPY_EXAMPLES = """
Examples:

  blip2 recipes copy pretrain_stage2_opt2.7b ./my_stage2.toml     # then: blip2 pretrain --recipe ./my_stage2.toml

  blip2 recipes copy tiny_stage1 configs/                         # -> configs/tiny_stage1.toml (made if needed)

  blip2 recipes copy tiny_stage1 mine.toml --force                # overwrite
"""


@recipes_app.command("list", epilog=LIST_EXAMPLES)
def list_command() -> None:
    """Print a table of the shipped recipes."""
    from blip2cli.recipes import list_recipes

    table = Table(title="blip2 recipes", title_justify="left")
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("stage / task", no_wrap=True)
    table.add_column("vision / LLM", overflow="fold")
    table.add_column("description", ratio=1, overflow="fold")
    for info in list_recipes():
        table.add_row(info.name, f"{info.stage} / {info.task}", f"{info.vision} / {info.llm or '-'}", info.description)
    Console().print(table)  # the terminal's width ($COLUMNS when piped): long descriptions wrap


# ignore_unknown_options lets `--train.max_steps=10` through as an override, as torchtune/litgpt users type it.
@recipes_app.command(
    "show", epilog=SHOW_EXAMPLES, context_settings={"ignore_unknown_options": True, "allow_extra_args": False}
)
def show_command(
    name: str = typer.Argument(..., help="A shipped recipe name (see `blip2 recipes list`) or a TOML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides, or ~section.key to reset."),
    comments: bool = typer.Option(True, "--comments/--no-comments", help="Write each key's help line above it."),
) -> None:
    """Print the resolved recipe (file + overrides, validated) as TOML; with comments, every key the paper or
    LAVIS gives a value for is marked "= paper" / "!= paper: VALUE" and "= LAVIS" / "!= LAVIS: VALUE"."""
    from blip2cli.recipes import load_recipe, recipe_to_toml, resolve_recipe_path
    from blip2cli.references import marked_toml

    recipe = load_recipe(name, overrides or [])
    header = f"resolved from {resolve_recipe_path(name)}"
    if overrides:
        header += "\nwith overrides: " + " ".join(overrides)
    print(marked_toml(recipe, header) if comments else recipe_to_toml(recipe, header=header, comments=False), end="")


@recipes_app.command("copy", epilog=COPY_EXAMPLES)
def copy_command(
    name: str = typer.Argument(..., help="A shipped recipe name (see `blip2 recipes list`)."),
    dest: str = typer.Argument(..., help="Destination file, or a directory (an existing one, or any path ending in /) to copy NAME.toml into."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the destination file if it exists."),
) -> None:
    """Copy a shipped recipe, comments and all, to edit it and pass it back with --recipe."""
    from blip2cli.recipes import copy_recipe

    target = copy_recipe(name, dest, force=force)
    stderr.print(f"[green]copied[/green] {name} -> {target}; edit it, then pass it back with --recipe {target}",
                 highlight=False, soft_wrap=True)
