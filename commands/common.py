"""What every command group shares: the one way to fail, and a progress bar for long jobs."""

from __future__ import annotations

from typing import Any, Callable, NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit (2: bad input, 1: the model or environment failed)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def progress_bar(unit: str, desc: str) -> tuple[Any, Callable[[int, int], None]]:
    """A tqdm bar that starts empty, and the ``progress(done, total)`` callback a job reports to; close the bar."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit=unit, desc=desc)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    return bar, progress
