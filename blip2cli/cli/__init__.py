"""The ``blip2`` command line. Each subcommand lives in its own module and only parses, calls and prints."""

from __future__ import annotations

import sys

import typer

from blip2cli import __version__
from blip2cli.errors import Blip2Error

app = typer.Typer(
    name="blip2",
    help="BLIP-2 from the command line: pretrain, evaluate, export, ask, caption, embed and search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"blip2 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """BLIP-2 from the command line."""


# Subcommands register themselves on `app` when imported.
from blip2cli.cli import ask as _ask  # noqa: E402,F401
from blip2cli.cli import demo as _demo  # noqa: E402,F401
from blip2cli.cli import capfilt as _capfilt  # noqa: E402,F401
from blip2cli.cli import caption as _caption  # noqa: E402,F401
from blip2cli.cli import download as _download  # noqa: E402,F401
from blip2cli.cli import embed as _embed  # noqa: E402,F401  (embed, match, search)
from blip2cli.cli import eval as _eval  # noqa: E402,F401
from blip2cli.cli import export as _export  # noqa: E402,F401
from blip2cli.cli import plot as _plot  # noqa: E402,F401
from blip2cli.cli import recipes as _recipes  # noqa: E402,F401
from blip2cli.cli import train as _train  # noqa: E402,F401


def _plain_help(typer_app: typer.Typer, seen: set[int]) -> None:
    """Option and argument helps are plain text: escape what rich would read as markup ("[default: ...]",
    '".[eval]"' would vanish from the help otherwise)."""
    import inspect

    from rich.markup import escape

    for command in typer_app.registered_commands:
        for param in inspect.signature(command.callback).parameters.values():
            info = param.default
            if isinstance(info, typer.models.ParameterInfo) and info.help and id(info) not in seen:
                seen.add(id(info))
                info.help = escape(info.help)
    for group in typer_app.registered_groups:
        _plain_help(group.typer_instance, seen)


def _no_type_on_flags() -> None:
    """Typer 0.29's help shows a ``<bool>`` type beside flags (``--restart <bool>``), as if they took a value."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None:
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    option.display_type_rich = display_type_rich


_plain_help(app, set())
_no_type_on_flags()


def main() -> None:
    """Console-script entry: user errors become one line on stderr and exit status 1, never a traceback."""
    try:
        app()
    except Blip2Error as err:
        print(f"blip2: {err.heading}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("blip2: interrupted", file=sys.stderr)
        sys.exit(130)
