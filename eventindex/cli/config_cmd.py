"""``eventindex config show``: the effective configuration."""

from __future__ import annotations

import typer

from eventindex.cli.context import print_json, state

app = typer.Typer(help="Show the configuration in effect.", no_args_is_help=True)


@app.command()
def show(ctx: typer.Context) -> None:
    """Print the settings after defaults, config file, environment and flags (JSON)."""
    print_json(state(ctx).settings.model_dump())
