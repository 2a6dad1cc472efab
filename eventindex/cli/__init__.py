"""The ``eventindex`` command: one entry point, a subcommand per task."""

from eventindex.cli.app import app, main

__all__ = ["app", "main"]
