"""What every command group shares: the one way to fail, and a progress bar for long jobs."""

from __future__ import annotations

from typing import Any, Callable, NoReturn

import typer

PRESET_HELP = ("'tiny' (random miniature weights, built on first use: noise images, for tests), 'toy' (a miniature "
               "model trained on the toy world, shipped: coloured shapes at 64 px; see `dreamrelation data "
               "toy-world`), 'sdxl' (public weights) or a model folder")
DEBUG = False  # `dreamrelation --debug ...` or DREAMRELATION_DEBUG=1: tracebacks with errors, and debug logging


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit (2: bad input, 1: the model or environment failed). With
    ``--debug``, the traceback of the exception being handled comes first."""
    if DEBUG:
        import sys
        import traceback

        if sys.exc_info()[0] is not None:
            traceback.print_exc()
    from manifests.errors import printable, redact

    typer.secho(f"error: {printable(redact(message))}", fg=typer.colors.RED, err=True)  # one line, no URL secrets
    raise typer.Exit(code=code)


def progress_bar(unit: str, desc: str) -> tuple[Any, Callable[[int, int], None]]:
    """A tqdm bar shown from the first report on (an error before it prints no empty bar), and the
    ``progress(done, total)`` callback a job reports to (``total`` None: not known yet); call ``.close()`` on the
    first value."""
    from tqdm import tqdm

    class Bar:
        bar = None

        def update(self, done: int, total: int | None) -> None:
            if self.bar is None:
                self.bar = tqdm(total=total, unit=unit, desc=desc)
            self.bar.total, self.bar.n = total, done
            self.bar.refresh()

        def set_description(self, text: str) -> None:
            nonlocal desc
            desc = text
            if self.bar is not None:
                self.bar.set_description(text)

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()

    bar = Bar()
    return bar, bar.update


def quiet_ray_logs() -> None:
    """Ray's own INFO lines (a local cluster started, a dataset's execution plan) stay out of the CLI's output
    (``--debug`` keeps them)."""
    import logging

    if not DEBUG:
        import ray.data  # noqa: F401 - configures its loggers on import: set the levels after that

        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled" (we show our own)


def oracle_line(name: str, rates: dict, unit: str = "images") -> str:
    """One line of the toy oracle's rates (``dreamrelation.toy.oracle.rates``), each with its 95% interval."""
    def pct(cell: dict) -> str:
        low, high = cell["ci95"]
        return f"{100 * cell['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"

    return (f"{name}: {rates['cases']} {unit}; identity {pct(rates['identity'])}, relation {pct(rates['relation'])}, "
            f"both {pct(rates['both'])}; shape + colour {pct(rates['shape_colour'])}")
