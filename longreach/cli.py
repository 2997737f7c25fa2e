"""The `longreach` command line: parsing and rendering only; the work lives in the package."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from longreach import __version__
from longreach.errors import LongreachError

app = typer.Typer(
    name="longreach",
    help="Reach past a causal LM's trained context length, and measure how far it really reaches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a LongreachError as one red line and exit 2, instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LongreachError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"longreach {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """longreach: training-free context extension, bounded memory, honest measurement."""


@app.command()
@one_line_errors
def models() -> None:
    """List the model aliases with their size, trained context length and cache state."""
    from longreach.models.registry import list_aliases

    table = Table(title="model aliases")
    for col in ("alias", "parameters", "trained length", "cached", "source"):
        table.add_column(col)
    for info in list_aliases():
        table.add_row(
            info.alias,
            info.parameters_label,
            str(info.trained_length),
            "yes" if info.cached else "no",
            info.source,
        )
    console.print(table)
    console.print(
        "Any local Hugging Face model directory works too: pass its path instead of an alias."
    )


def run() -> None:  # pragma: no cover - entry point for `python -m longreach`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
