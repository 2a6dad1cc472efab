"""What every subcommand shares: settings from config + flags, output, exit codes."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import typer
from rich.console import Console

from eventindex.config import Settings, load_config

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # nothing matched, or a check found problems
EXIT_ERROR = 2  # bad input, bad configuration, or a failure
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False)


class OutputFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


OutputOption = typer.Option(OutputFormat.TEXT, "--output", "-o", help="Output format.")


@dataclass
class CliState:
    """Global options, turned into settings on first use."""

    config_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_config(self.config_file, self.overrides)
        return self._settings


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    if not isinstance(obj, CliState):
        obj = CliState()
        ctx.find_root().obj = obj
    return obj


def print_wide(renderable: Any) -> None:
    """Print a table at its natural width: identifiers (dataset names, GUIDs) are never
    cut short to fit a terminal or a pipe's assumed 80 columns."""
    from rich.measure import Measurement

    unbounded = stdout.options.update_width(1_000_000)
    needed = Measurement.get(stdout, unbounded, renderable).maximum
    if needed <= stdout.width:
        stdout.print(renderable)
        return
    wide = Console(file=stdout.file, width=needed, highlight=False, no_color=stdout.no_color)
    wide.print(renderable)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def catalog_of(settings: Settings) -> Iterator[Any]:
    """Open the configured catalog for the length of a command."""
    from catalog import load_catalog

    catalog = load_catalog(settings.catalog)
    try:
        yield catalog
    finally:
        catalog.close()
