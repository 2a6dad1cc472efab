"""Root of the ``eventindex`` command and its global options."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.text import Text

from eventindex import __version__
from eventindex.cli import (
    bench_cmd,
    broker_cmd,
    catalog_cmd,
    check_cmd,
    config_cmd,
    consume_cmd,
    demo_cmd,
    generate_cmd,
    lookup_cmd,
    objects_cmd,
    pick_cmd,
    produce_cmd,
    query_cmd,
    scan_cmd,
    serve_cmd,
    spark_cmd,
    triggers_cmd,
)
from eventindex.cli.context import EXIT_ERROR, EXIT_INTERRUPTED, CliState, stderr
from eventindex.config import parse_value
from eventindex.errors import EventIndexError

app = typer.Typer(
    name="eventindex",
    help="Catalogue every event and object an experiment produces, and find any of them fast.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(catalog_cmd.app, name="catalog")
app.add_typer(broker_cmd.app, name="broker")
for module in (generate_cmd, pick_cmd, lookup_cmd, bench_cmd, demo_cmd, serve_cmd):
    module.register(app)
app.add_typer(config_cmd.app, name="config")
produce_cmd.register(app)
consume_cmd.register(app)
app.add_typer(spark_cmd.app, name="spark")
app.add_typer(triggers_cmd.app, name="triggers")
check_cmd.register(app)
app.add_typer(query_cmd.app, name="query")
app.add_typer(objects_cmd.app, name="objects")
scan_cmd.register(app)


def _parse_set(values: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                f"expected SECTION.KEY=VALUE, got {item!r}", param_hint="--set"
            )
        overrides[key.strip()] = parse_value(value, key.strip())
    return overrides


def _version(value: bool) -> None:
    if value:
        typer.echo(f"eventindex {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option(
            "--config", "-c", help="Configuration file (else $EVENTINDEX_CONFIG).", envvar=None
        ),
    ] = None,
    store: Annotated[str | None, typer.Option(help="Store root URI (store.root).")] = None,
    catalog_path: Annotated[
        str | None, typer.Option("--catalog", help="SQLite catalog file (catalog.path).")
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override any setting: SECTION.KEY=VALUE (repeatable)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Global options apply to every subcommand; flags override files and environment."""
    overrides = _parse_set(settings or [])
    if store:
        overrides["store.root"] = store
    if catalog_path:
        overrides["catalog.path"] = catalog_path
    ctx.obj = CliState(config_file=config, overrides=overrides)


def main() -> None:
    """Console-script entry point: a project error becomes one line on stderr and status 2."""
    try:
        app()
    except EventIndexError as exc:
        # One line however long (no wrapping), and the message is text, not markup.
        message = " ".join(str(exc).split())
        stderr.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        stderr.print("interrupted", style="red")
        sys.exit(EXIT_INTERRUPTED)
