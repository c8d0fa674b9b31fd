"""The ``dreamrelation`` command line (typer): builds ``app`` from the command groups in ``commands/``.

Heavy libraries (torch, diffusers, ray) are imported inside the commands, so ``dreamrelation --help`` is instant.
Bad input ends the command with exit code 2 and a one-line ``error:`` naming the option and the value at fault,
before any model is loaded; a model that cannot be loaded ends it with exit code 1.
"""

from __future__ import annotations

import os
import sys

import typer

from commands.batch import batch_app
from commands.cluster import cluster_app
from commands.data import data_app
from commands.eval import eval_app
from commands.generate import generate, models_app
from commands.manifest import manifest_app
from commands.train import train_app

app = typer.Typer(
    help="DreamRelation: relation-aware customized image generation (your subjects, acting out a relation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks with errors, and debug logs "
                                                            "(also: DREAMRELATION_DEBUG=1).")) -> None:
    """DreamRelation: relation-aware customized image generation (your subjects, acting out a relation)."""
    if debug or os.environ.get("DREAMRELATION_DEBUG", "") not in ("", "0"):
        import logging

        import commands.common

        commands.common.DEBUG = True
        logging.basicConfig(level=logging.WARNING)
        for package in ("batch", "cluster", "commands", "dreamrelation", "manifests"):
            logging.getLogger(package).setLevel(logging.DEBUG)


app.command()(generate)
# the order of the groups in `--help`
app.add_typer(models_app, name="models")
app.add_typer(batch_app, name="batch")
app.add_typer(manifest_app, name="manifest")
app.add_typer(eval_app, name="eval")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(cluster_app, name="cluster")

def main() -> None:
    """The ``dreamrelation`` command: the app (which handles bad options and the commands' own errors), with any
    error a command did not handle still one line (exit 1; the traceback with ``--debug``)."""
    import commands.common

    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last resort
        from manifests.errors import one_line

        if commands.common.DEBUG:
            import traceback

            traceback.print_exc()
        typer.secho(f"error: {one_line(exc)}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
