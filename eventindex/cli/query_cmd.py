"""``eventindex query submit|status|result|cancel``: asynchronous SQL queries.

Locally the commands use the ``[queries]`` registry and the catalog directly (a
scan worker, ``eventindex scan-worker``, runs what is queued); with ``--url``
they go through the web service's ``/v1/queries`` with a bearer token.
"""

from __future__ import annotations

import enum
import getpass
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from eventindex.cli.context import (
    OutputFormat,
    OutputOption,
    catalog_of,
    print_json,
    state,
    stderr,
    stdout,
)
from eventindex.config import Settings
from eventindex.errors import EventIndexError

app = typer.Typer(
    help="Submit SQL queries, follow them, fetch their results, cancel them.",
    no_args_is_help=True,
)

UrlOption = Annotated[
    str | None,
    typer.Option(help="Use the web service at this URL instead of the local registry."),
]
TokenOption = Annotated[
    str | None,
    typer.Option(envvar="EVENTINDEX_TOKEN", show_envvar=True, help="Bearer token for --url."),
]
FINISHED = ("done", "failed", "cancelled", "expired")


class ResultFormat(enum.StrEnum):
    JSON = "json"
    CSV = "csv"
    PARQUET = "parquet"


class _Queries:
    """The same four operations, on the local registry or through the web service."""

    def __init__(self, settings: Settings, url: str | None, token: str | None) -> None:
        self.settings = settings
        self.url = url
        self.token = token

    @contextmanager
    def _registry(self) -> Iterator[Any]:
        from eventindex.query.registry import QueryRegistry

        with QueryRegistry(self.settings.queries.registry) as registry:
            yield registry

    @contextmanager
    def _remote(self) -> Iterator[Any]:
        from eventindex.query.remote import QueryServiceClient

        client = QueryServiceClient(self.url or "", token=self.token)
        try:
            yield client
        finally:
            client.close()

    def submit(self, sql: str, user: str) -> dict[str, Any]:
        if self.url:
            with self._remote() as client:
                answer: dict[str, Any] = client.submit(sql)
                return answer
        from eventindex.query import jobs

        with catalog_of(self.settings) as catalog, self._registry() as registry:
            return jobs.submit(catalog, registry, self.settings.queries, sql, user).to_dict()

    def status(self, query_id: str) -> dict[str, Any]:
        if self.url:
            with self._remote() as client:
                answer: dict[str, Any] = client.status(query_id)
                return answer
        with self._registry() as registry:
            return registry.get(query_id).to_dict()  # type: ignore[no-any-return]

    def cancel(self, query_id: str) -> dict[str, Any]:
        if self.url:
            with self._remote() as client:
                answer: dict[str, Any] = client.cancel(query_id)
                return answer
        with self._registry() as registry:
            record = registry.get(query_id)
            if record.state.value in FINISHED:
                raise EventIndexError(
                    f"query {query_id} has already finished ({record.state.value})"
                )
            return registry.cancel(query_id).to_dict()  # type: ignore[no-any-return]

    def result(self, query_id: str, fmt: ResultFormat) -> bytes:
        if self.url:
            with self._remote() as client:
                data: bytes = client.result(query_id, fmt.value)
                return data
        import orjson

        from eventindex.query import jobs

        with self._registry() as registry:
            record = registry.get(query_id)
            table = jobs.load_result(record)
            if fmt is ResultFormat.JSON:
                return orjson.dumps(jobs.result_document(record, table), option=orjson.OPT_INDENT_2)
            try:
                return jobs.result_bytes(record, table, fmt.value)
            except ValueError as exc:
                raise EventIndexError(str(exc)) from None


def _queries(ctx: typer.Context, url: str | None, token: str | None) -> _Queries:
    return _Queries(state(ctx).settings, url, token)


def _print_status(status: dict[str, Any], output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        print_json(status)
        return
    progress = status["progress"]
    line = (
        f"{status['id']}  {status['state']:9}  {progress['units_done']}/{progress['units_total']}"
        f" units  shared {status['units_shared']}  by {status['submitter']}"
    )
    if status.get("result_rows") is not None:
        line += f"  {status['result_rows']} rows"
    stdout.print(line)
    if status.get("error"):
        stdout.print(f"error: {status['error']}")


@app.command()
def submit(
    ctx: typer.Context,
    sql: Annotated[str, typer.Argument(help="One SELECT statement (quote it for the shell).")],
    user: Annotated[
        str | None, typer.Option(help="Submitter name (default: the login name).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the query has finished.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    output: OutputFormat = OutputOption,
) -> None:
    """Submit a query; prints its id (and, with --wait, follows it to the end)."""
    queries = _queries(ctx, url, token)
    status = queries.submit(sql, user or getpass.getuser())
    while wait and status["state"] not in FINISHED:
        progress = status["progress"]
        stderr.print(
            f"{status['state']}: {progress['units_done']}/{progress['units_total']} units",
            end="\r",
        )
        time.sleep(queries.settings.queries.poll_seconds)
        status = queries.status(status["id"])
    _print_status(status, output)
    if status["state"] == "failed":
        raise typer.Exit(2)


@app.command()
def status(
    ctx: typer.Context,
    query_id: Annotated[str, typer.Argument(help="The query id.")],
    url: UrlOption = None,
    token: TokenOption = None,
    output: OutputFormat = OutputOption,
) -> None:
    """State, progress (units done of total), units shared, and the error if any."""
    _print_status(_queries(ctx, url, token).status(query_id), output)


@app.command()
def result(
    ctx: typer.Context,
    query_id: Annotated[str, typer.Argument(help="The query id.")],
    fmt: Annotated[ResultFormat, typer.Option("--format", "-f", help="Result format.")] = (
        ResultFormat.JSON
    ),
    out: Annotated[
        Path | None, typer.Option(help="Write to this file (needed for parquet).")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """The result of a done query, as JSON, CSV or Parquet."""
    if fmt is ResultFormat.PARQUET and out is None:
        raise typer.BadParameter("parquet is binary: give --out FILE", param_hint="--format")
    data = _queries(ctx, url, token).result(query_id, fmt)
    if out is not None:
        out.write_bytes(data)
        stderr.print(f"wrote {len(data)} bytes to {out}")
        return
    sys.stdout.write(data.decode())
    if not data.endswith(b"\n"):
        sys.stdout.write("\n")


@app.command()
def cancel(
    ctx: typer.Context,
    query_id: Annotated[str, typer.Argument(help="The query id.")],
    url: UrlOption = None,
    token: TokenOption = None,
    output: OutputFormat = OutputOption,
) -> None:
    """Cancel a queued or running query."""
    _print_status(_queries(ctx, url, token).cancel(query_id), output)
