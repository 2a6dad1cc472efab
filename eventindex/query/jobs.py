"""Asynchronous queries as their users see them: submit, follow, fetch, cancel.

The web service and ``eventindex query`` both go through here, over the same
registry. ``submit`` checks the query against the catalog first, so bad SQL,
unknown tables and columns, and type errors are refused at once (``SqlError``),
never queued. An exact key lookup or a small cone is answered on the spot (it
reads a handful of row groups or chunks); everything else is queued for a scan
worker.
"""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from catalog.base import Catalog
from eventindex.config import QuerySettings
from eventindex.errors import EventIndexError
from eventindex.query.registry import QueryRecord, QueryRegistry, QueryState
from eventindex.query.scan import direct_route, run_direct, write_result
from eventindex.query.sql import SqlError, compile_query

RESULT_FORMATS = ("json", "csv", "parquet")
MEDIA_TYPES = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}


class QueryStateError(EventIndexError):
    """A query is not in a state that allows what was asked (e.g. fetching a result
    of a running query); ``record`` is the query as it is."""

    def __init__(self, message: str, record: QueryRecord) -> None:
        super().__init__(message)
        self.record = record


def submit(
    catalog: Catalog,
    registry: QueryRegistry,
    settings: QuerySettings,
    sql: str,
    submitter: str,
) -> QueryRecord:
    """Check and register a query; answer it at once when a key or small cone allows."""
    table, plan = compile_query(catalog, sql, max_result_rows=settings.max_result_rows)
    record = registry.submit(sql, plan.table, submitter)
    # Only what a key index or known chunk positions answer: never a pass over data here.
    route = (
        direct_route(table, plan, settings.direct_max_units, catalog=catalog, read_positions=False)
        if plan.point_lookup or plan.cone is not None
        else None
    )
    if route is None:
        return record
    count = len(route.units)
    if not registry.claim(record.id, f"direct:{socket.gethostname()}", count, "direct"):
        return registry.get(record.id)
    try:
        result = run_direct(table, plan, settings.max_result_rows, route)
    except SqlError as exc:
        registry.fail(record.id, str(exc), exc.code)
        return registry.get(record.id)
    except EventIndexError as exc:  # an unreadable file: the query fails, not the request
        registry.fail(record.id, str(exc))
        return registry.get(record.id)
    path = write_result(result, settings.results_dir, record.id)
    registry.finish(
        record.id,
        path,
        result.num_rows,
        units_done=count,
        units_shared=0,
        expiry_seconds=settings.result_expiry_seconds,
    )
    return registry.get(record.id)


def _ready(record: QueryRecord) -> str:
    if record.state is QueryState.DONE and record.result_path:
        return record.result_path
    if record.state is QueryState.FAILED:
        detail = f"query {record.id} failed: {record.error}"
    elif record.state is QueryState.EXPIRED:
        detail = f"the result of query {record.id} has expired"
    elif record.state is QueryState.CANCELLED:
        detail = f"query {record.id} was cancelled"
    else:
        detail = (
            f"query {record.id} is {record.state.value} "
            f"({record.units_done} of {record.units_total} units done)"
        )
    raise QueryStateError(detail, record)


def load_result(record: QueryRecord) -> pa.Table:
    """The result table of a done query; ``QueryStateError`` otherwise."""
    path = _ready(record)
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise EventIndexError(f"the result of query {record.id} cannot be read: {exc}") from exc


def _plain_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    return value


def result_document(record: QueryRecord, table: pa.Table) -> dict[str, Any]:
    """The JSON form of a result: columns with their types, and one object per row
    (binary values, such as trigger masks, as hex)."""
    return {
        "id": record.id,
        "columns": [{"name": f.name, "type": str(f.type)} for f in table.schema],
        "row_count": table.num_rows,
        "rows": [_plain_value(row) for row in table.to_pylist()],
    }


def result_bytes(record: QueryRecord, table: pa.Table, fmt: str) -> bytes:
    """A result as CSV or Parquet bytes (JSON goes through ``result_document``).
    ``ValueError`` for an unknown format or a nested column in CSV."""
    if fmt == "parquet":
        return Path(_ready(record)).read_bytes()
    if fmt != "csv":
        raise ValueError(f"format must be one of {', '.join(RESULT_FORMATS)}, not {fmt!r}")
    columns: list[pa.Array | pa.ChunkedArray] = []
    for column_field, values in zip(table.schema, table.columns, strict=True):
        if pa.types.is_binary(column_field.type) or pa.types.is_large_binary(column_field.type):
            columns.append(pa.array([None if v is None else v.hex() for v in values.to_pylist()]))
            continue
        if pa.types.is_nested(column_field.type):
            raise ValueError(
                f"CSV cannot hold the nested column {column_field.name!r} "
                f"({column_field.type}): fetch json or parquet"
            )
        columns.append(values)
    sink = io.BytesIO()
    pacsv.write_csv(pa.table(columns, names=table.column_names), sink)
    return sink.getvalue()
