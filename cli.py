"""The ``dreamrelation`` command line (typer): builds ``app`` from the command groups in ``commands/``.

Heavy libraries (torch, diffusers, ray) are imported inside the commands, so ``dreamrelation --help`` is instant.
Bad input ends the command with exit code 2 and a one-line ``error:`` naming the option and the value at fault,
before any model is loaded; a model that cannot be loaded ends it with exit code 1.
"""

from __future__ import annotations

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
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks with errors, and debug logs.")) -> None:
    """DreamRelation: relation-aware customized image generation (your subjects, acting out a relation)."""
    if debug:
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

if __name__ == "__main__":
    app()
