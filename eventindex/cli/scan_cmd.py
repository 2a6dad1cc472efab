"""``eventindex scan-worker``: run the queued queries of the registry in shared scans."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from eventindex.cli.context import catalog_of, state, stderr


def register(app: typer.Typer) -> None:
    app.command(name="scan-worker")(scan_worker)


def scan_worker(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option(help="Run until nothing is queued or running, then exit.")
    ] = False,
    name: Annotated[
        str | None,
        typer.Option(
            help="Worker name (default: the host name); a restarted worker of the same "
            "name resumes its running queries at once."
        ),
    ] = None,
) -> None:
    """Walk tables for queued queries: each unit is read once for every query riding the
    walk; key picks and small cones are answered directly. SIGTERM or Ctrl-C stops it
    after the current unit; its running queries are resumed by the next worker."""
    from eventindex.query.registry import QueryRegistry
    from eventindex.query.scan import ScanWorker

    settings = state(ctx).settings
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with catalog_of(settings) as catalog, QueryRegistry(settings.queries.registry) as registry:
            worker = ScanWorker(catalog, registry, settings.queries, name=name)
            stderr.print(f"scan worker {worker.name} on {settings.queries.registry}")
            try:
                worker.run(stop, until_idle=once)
            except KeyboardInterrupt:
                stop.set()
    finally:
        signal.signal(signal.SIGTERM, previous)
