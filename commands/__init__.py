"""The command groups of the ``dreamrelation`` CLI, one module per group; ``cli.py`` assembles them.

Module level stays light (typer and the standard library): each command imports what it needs when it runs.
"""
