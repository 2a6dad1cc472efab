"""``/v1/queries``: asynchronous SQL queries, run by the scan worker from the shared registry.

The service checks a query against the catalog and registers it; it never scans.
An exact key pick or a small cone over known chunks is answered during the
request (a few row groups); anything else is ``queued`` until a scan worker
(``eventindex scan-worker``, same ``[queries] registry``) walks its table.
Every route needs a bearer token from ``webservice.tokens``; the token names
the submitter (``name:secret`` tokens by their name).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from eventindex.errors import NotFoundError
from eventindex.query import jobs
from eventindex.query.registry import FINISHED_STATES, QueryRecord, QueryRegistry, QueryState
from eventindex.query.sql import SqlError
from webservice.dependencies import CatalogDep, RequireAdmin, RequireJson, ServiceDep
from webservice.problems import ProblemError, problem_responses
from webservice.responses import json_response
from webservice.routes import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/queries", tags=["queries"], dependencies=[RequireAdmin])
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="One of the tokens in the `webservice.tokens` setting.",
)
_registry_lock = threading.Lock()

QueryId = Annotated[str, Path(min_length=1, max_length=64, description="The query id.")]


class QuerySubmission(BaseModel):
    """A query in the supported SQL subset (see the README)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "sql": 'SELECT run_number, COUNT(*) AS n FROM "data15_13TeV.*.daq.RAW" '
                    "WHERE bcid BETWEEN 100 AND 200 GROUP BY run_number"
                }
            ]
        },
    )

    sql: str = Field(min_length=1, max_length=100_000, description="One SELECT statement.")


class QueryProgress(BaseModel):
    units_done: int
    units_total: int


class QueryStatus(BaseModel):
    """A query's state, progress (units of its table done) and outcome."""

    id: str
    sql: str
    table: str
    submitter: str
    state: Literal["queued", "running", "done", "failed", "cancelled", "expired"]
    progress: QueryProgress
    units_shared: int = Field(description="Units read together with other queries.")
    route: str = Field(description="`scan` (a shared walk), `direct` (key or cone), or ``.")
    error: str | None
    error_code: str | None
    result_rows: int | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None


def _registry(request: Request, service: ServiceDep) -> QueryRegistry:
    """One registry per app, opened on first use (the file is shared with the worker)."""
    registry: QueryRegistry | None = getattr(request.app.state, "query_registry", None)
    if registry is None:
        with _registry_lock:
            registry = getattr(request.app.state, "query_registry", None)
            if registry is None:
                registry = QueryRegistry(service.settings.queries.registry)
                request.app.state.query_registry = registry
    return registry


RegistryDep = Annotated[QueryRegistry, Depends(_registry)]


def _submitter(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Who sent the request: the name of a ``name:secret`` token, else a short digest of
    the token (never the token itself)."""
    token = credentials.credentials if credentials is not None else ""
    name, separator, _ = token.partition(":")
    if separator and name:
        return name
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]


SubmitterDep = Annotated[str, Depends(_submitter)]


def _record(registry: QueryRegistry, query_id: str) -> QueryRecord:
    try:
        return registry.get(query_id)
    except NotFoundError:
        raise ProblemError.bad_field(
            404, "query_id", "path", f"no query {query_id!r}", kind="not-found", code="not_found"
        ) from None


@router.post(
    "",
    status_code=202,
    response_model=QueryStatus,
    summary="Submit a query",
    dependencies=[RequireJson],
    responses=problem_responses(400, 401, 403, 413, 415, 422, 503),
)
def submit_query(
    body: QuerySubmission,
    catalog: CatalogDep,
    service: ServiceDep,
    registry: RegistryDep,
    submitter: SubmitterDep,
) -> Response:
    """Check the query against the catalog and register it; returns its id at once
    (`Location` names its status). Unsupported SQL, unknown tables or columns, type
    errors and a LIMIT above `max_result_rows` are refused with 422 naming the problem."""
    try:
        record = jobs.submit(catalog, registry, service.settings.queries, body.sql, submitter)
    except SqlError as exc:
        raise ProblemError.bad_field(422, "sql", "body", str(exc), code=exc.code) from None
    response = json_response(record.to_dict(), status_code=202)
    response.headers["Location"] = f"{API_PREFIX}/queries/{record.id}"
    return response


@router.get(
    "",
    summary="List your queries",
    responses=problem_responses(401, 403, 422),
)
def list_queries(
    registry: RegistryDep,
    submitter: SubmitterDep,
    state: Annotated[QueryState | None, Query(description="Only queries in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """The queries submitted with this token, oldest first."""
    records = registry.find(
        states=None if state is None else [state], submitter=submitter, limit=limit
    )
    return json_response({"queries": [r.to_dict() for r in records]})


@router.get(
    "/{query_id}",
    response_model=QueryStatus,
    summary="State and progress of a query",
    responses=problem_responses(401, 403, 404, 422),
)
def query_status(query_id: QueryId, registry: RegistryDep) -> Response:
    """Its state (`queued`, `running`, `done`, `failed`, `cancelled`, `expired`),
    progress in units of its table, units shared with other queries, and the error."""
    return json_response(_record(registry, query_id).to_dict())


@router.get(
    "/{query_id}/results",
    summary="The result of a done query",
    responses={
        200: {
            "description": "The rows, as JSON, CSV or Parquet.",
            "content": {
                "application/json": {},
                "text/csv": {},
                "application/vnd.apache.parquet": {},
            },
        },
        **problem_responses(401, 403, 404, 409, 410, 422),
    },
)
def query_results(
    query_id: QueryId,
    registry: RegistryDep,
    fmt: Annotated[
        Literal["json", "csv", "parquet"], Query(alias="format", description="Result format.")
    ] = "json",
) -> Response:
    """409 while the query is queued or running, or when it failed or was cancelled (the
    detail says which); 410 once its result has expired."""
    record = _record(registry, query_id)
    try:
        table = jobs.load_result(record)
        if fmt == "json":
            return json_response(jobs.result_document(record, table))
        body = jobs.result_bytes(record, table, fmt)
    except jobs.QueryStateError as exc:
        status = 410 if exc.record.state is QueryState.EXPIRED else 409
        raise ProblemError(
            status, str(exc), kind="gone" if status == 410 else "query-not-done"
        ) from None
    except ValueError as exc:
        raise ProblemError.bad_field(422, "format", "query", str(exc)) from None
    headers = {"Content-Disposition": f'attachment; filename="{record.id}.{fmt}"'}
    return Response(body, media_type=jobs.MEDIA_TYPES[fmt], headers=headers)


@router.delete(
    "/{query_id}",
    response_model=QueryStatus,
    summary="Cancel a query",
    responses=problem_responses(401, 403, 404, 409, 422),
)
def cancel_query(query_id: QueryId, registry: RegistryDep) -> Response:
    """Cancel a queued or running query (the worker drops it at its next unit);
    409 if it has already finished."""
    record = _record(registry, query_id)
    if record.state in FINISHED_STATES:
        raise ProblemError(
            409, f"query {query_id} has already finished ({record.state.value})", kind="conflict"
        )
    return json_response(registry.cancel(query_id).to_dict())
