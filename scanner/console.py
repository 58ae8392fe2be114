"""The command line's one rich console (stderr, so stdout stays clean for data)."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    """Print a clear error and return the exit to raise (exit code 2)."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)
