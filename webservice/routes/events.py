"""``/v1/events``: pick one event, look up many, select a run range (NDJSON)."""

from __future__ import annotations

import gc
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, Path, Query
from fastapi.routing import APIRoute
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from eventindex.query import PickedEvent as ReaderEvent
from eventindex.query import Reader
from eventindex.query.triggers import TriggerExpressionError
from webservice.dependencies import (
    CollectionsDep,
    EventCollectionQuery,
    OptionsDep,
    ReaderDep,
    RequireJson,
)
from webservice.models import (
    EXAMPLE_DATASET,
    FORMAT_PATTERN,
    MAX_COLLECTION_CHARS,
    MAX_DATASET_CHARS,
    MAX_FORMATS,
    DatasetPattern,
    FormatName,
    LookupRequest,
    LookupResponse,
    PickedEvent,
    SelectRequest,
)
from webservice.options import MAX_EVENT_NUMBER, MAX_RUN_NUMBER
from webservice.problems import ProblemError, problem_response, problem_responses
from webservice.responses import NDJSON_MEDIA_TYPE, json_response, ndjson_chunks
from webservice.routes import API_PREFIX
from webservice.routes.triggers import TriggerIndexDep, bad_expression
from webservice.service import Service

router = APIRouter(prefix=f"{API_PREFIX}/events", tags=["events"])

RunPath = Annotated[
    int, Path(ge=0, le=MAX_RUN_NUMBER, description="Run number (uint32).", examples=[284484])
]
EventPath = Annotated[
    int, Path(ge=0, le=MAX_EVENT_NUMBER, description="Event number (uint64).", examples=[191438])
]
FormatsQuery = Annotated[
    list[FormatName] | None,
    Query(
        alias="format",
        max_length=64,
        description="Only locations of this format (repeatable: `?format=AOD&format=RAW`).",
        examples=[["AOD"]],
    ),
]
DatasetQuery = Annotated[
    DatasetPattern | None,
    Query(
        alias="dataset",
        description="Only datasets whose names match this glob.",
        examples=[EXAMPLE_DATASET],
    ),
]


_FORMAT = re.compile(FORMAT_PATTERN)
_PICK_QUERY = frozenset({"collection", "format", "dataset"})
PICK_PATH = f"{API_PREFIX}/events/{{run}}/{{event}}"
_PICK_PREFIX = f"{API_PREFIX}/events/"


def _number(text: str, maximum: int) -> int | None:
    """A path segment of plain ASCII digits within ``maximum``; ``None`` for anything else."""
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        return None
    value = int(text)
    return value if value <= maximum else None


@dataclass(frozen=True)
class _PlainPick:
    run: int
    event: int
    collection: str | None  # None: the only one
    formats: list[str] | None
    dataset: str | None


def _plain_pick(path: str, query_string: bytes) -> _PlainPick | None:
    """The arguments of a well-formed pick, or ``None`` when anything in it needs the
    declared route's validation (which answers it, naming the bad field)."""
    parts = path[len(_PICK_PREFIX) :].split("/")
    if len(parts) != 2:
        return None
    run = _number(parts[0], MAX_RUN_NUMBER)
    event = _number(parts[1], MAX_EVENT_NUMBER)
    if run is None or event is None:
        return None
    # As Starlette reads a query string: latin-1, blank values kept.
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    values: dict[str, list[str]] = {}
    for name, value in pairs:
        if name not in _PICK_QUERY:
            return None
        values.setdefault(name, []).append(value)
    collections = values.get("collection", [])
    datasets = values.get("dataset", [])
    formats = values.get("format", [])
    if len(collections) > 1 or len(datasets) > 1 or len(formats) > MAX_FORMATS:
        return None
    if any(not 1 <= len(c) <= MAX_COLLECTION_CHARS for c in collections) or any(
        not 1 <= len(d) <= MAX_DATASET_CHARS for d in datasets
    ):
        return None
    # fullmatch: the models' pattern ends in "$", which Python's match (not the
    # validator's) lets end before a trailing newline.
    if not all(_FORMAT.fullmatch(f) for f in formats):
        return None
    return _PlainPick(
        run,
        event,
        collections[0] if collections else None,
        formats or None,
        datasets[0] if datasets else None,
    )


class FastPicks:
    """ASGI layer that answers well-formed picks without the framework's per-request work.

    Picks are the hot path (hundreds a second per worker), and routing, dependency
    solving and validation cost more CPU than the pick itself once locations files
    answer it. A ``GET`` of the pick route with plain numbers, a known (or the only)
    collection and valid filters, over a collection that locations files cover entirely (so nothing
    blocks on Parquet decoding), is answered here, on the event loop, with the route's
    own response or its 404 problem. Everything else (bad input, an unknown or
    ambiguous collection, a failure) goes on to the declared route, so answers, errors and
    the OpenAPI schema are the same either way. Sits inside the access log, which
    then logs and counts these requests like any other.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._route: APIRoute | None = None

    def _pick_route(self) -> APIRoute | None:
        if self._route is None:
            for route in router.routes:
                if isinstance(route, APIRoute) and route.path == PICK_PATH:
                    self._route = route
        return self._route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self._answer(scope) if scope["type"] == "http" else None
        if response is None:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _answer(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        if scope["method"] != "GET" or not path.startswith(_PICK_PREFIX):
            return None
        plain = _plain_pick(path, scope["query_string"])
        if plain is None:
            return None
        service: Service | None = getattr(scope["app"].state, "service", None)
        route = self._pick_route()
        if service is None or route is None:
            return None
        reader = service.reader
        try:
            if plain.collection is None:
                collection = reader.default_collection()
            elif service.collections.known(plain.collection):
                collection = plain.collection
            else:
                return None
            if not reader.located(collection):
                return None
            picked = reader.pick(
                collection,
                plain.run,
                plain.event,
                formats=plain.formats,
                dataset_pattern=plain.dataset,
            )
        except Exception:  # the declared route answers it, and reports the failure
            return None
        scope["route"] = route  # what the access log and the metrics label it with
        if picked is None:
            error = _not_found(plain.run, plain.event, collection)
            return problem_response(path, error.status, error.title, error.detail, kind=error.kind)
        return json_response(picked.to_dict())


def _not_found(run: int, event: int, collection: str) -> ProblemError:
    return ProblemError.not_found(f"event {run}/{event} is not in {collection}")


def _picked(
    reader: ReaderDep,
    collection: str,
    run: int,
    event: int,
    formats: list[str] | None,
    dataset: str | None,
) -> Response:
    picked = reader.pick(collection, run, event, formats=formats, dataset_pattern=dataset)
    if picked is None:
        raise _not_found(run, event, collection)
    return json_response(picked.to_dict())


def pick_event(
    run: RunPath,
    event: EventPath,
    reader: ReaderDep,
    collection: EventCollectionQuery,
    formats: FormatsQuery = None,
    dataset: DatasetQuery = None,
) -> Response:
    """The event's attributes and every copy of it: dataset, format, processing tag, file
    GUID and entry number. 404 if no dataset of the collection holds it."""
    return _picked(reader, collection, run, event, formats, dataset)


router.add_api_route(
    "/{run}/{event}",
    pick_event,
    methods=["GET"],
    response_model=PickedEvent,
    summary="Pick one event",
    responses=problem_responses(404, 422),
)


def _lookup_response(keys: Sequence[Sequence[int]], results: list[ReaderEvent | None]) -> Response:
    # orjson writes the Reader's dataclasses as their to_dict() would (same fields, same
    # order), natively: no dict is made per event and location.
    missing = [[run, event] for (run, event), found in zip(keys, results, strict=True) if not found]
    return json_response(
        {"results": results, "found": len(results) - len(missing), "missing": missing}
    )


def _looked_up(
    reader: Reader,
    collection: str,
    keys: Sequence[tuple[int, int]],
    formats: list[str] | None,
    dataset: str | None,
) -> Response:
    """The lookup's answer, with cyclic garbage collection paused until the events are
    freed. The Reader pauses it only while it builds them: re-enabled then, the next
    allocation would collect the young generation, every event of the answer among it.
    Freed first, they leave the generation's count and nothing is collected."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        # No name holds the events: they are freed when the response is made.
        return _lookup_response(
            keys, reader.lookup(collection, keys, formats=formats, dataset_pattern=dataset)
        )
    finally:
        if enabled:
            gc.enable()


@router.post(
    "/lookup",
    response_model=LookupResponse,
    summary="Look up many events",
    dependencies=[RequireJson],
    responses=problem_responses(400, 404, 413, 415, 422),
)
def lookup_events(
    body: LookupRequest, reader: ReaderDep, collections: CollectionsDep, options: OptionsDep
) -> Response:
    """Every event of a list, in one call: `results[i]` answers `events[i]` (`null` when
    absent). More events than the service's limit are refused with 413."""
    if len(body.events) > options.max_lookup_events:
        raise ProblemError.bad_field(
            413,
            "events",
            "body",
            f"{len(body.events)} events; at most {options.max_lookup_events} in one request",
            kind="payload-too-large",
            code="too_long",
            title="Too many events",
        )
    collection = collections.resolve(body.collection, "body")
    return _looked_up(reader, collection, body.events, body.formats, body.dataset)


@router.post(
    "/select",
    summary="Select events by run range (NDJSON)",
    dependencies=[RequireJson],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One JSON object per line, one line per event row.",
            "content": {NDJSON_MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **problem_responses(400, 404, 413, 415, 422),
    },
)
def select_events(
    body: SelectRequest,
    reader: ReaderDep,
    collections: CollectionsDep,
    options: OptionsDep,
    triggers: TriggerIndexDep,
) -> StreamingResponse:
    """Every event row of the run range, optionally of matching datasets only, passing a
    trigger expression only (read from the inverted trigger index: only passing rows are
    read) and with only some columns, streamed as newline-delimited JSON. Bad input is
    refused before the first row; a failure mid-stream cuts the response short."""
    collection = collections.resolve(body.collection, "body")
    rows_of = None
    if body.trigger is not None:
        try:
            selection = triggers.selection(body.trigger, run_min=body.run_min, run_max=body.run_max)
        except TriggerExpressionError as exc:
            raise bad_expression("trigger", exc, "body") from exc
        rows_of = selection.rows
    limit = body.limit
    if options.max_select_rows:  # 0: no cap
        limit = min(limit or options.max_select_rows, options.max_select_rows)
    rows = iter(
        reader.select(
            collection,
            run_min=body.run_min,
            run_max=body.run_max,
            dataset_pattern=body.dataset,
            columns=body.columns,
            limit=limit,
            rows_of=rows_of,
        )
    )
    # Take the first row here, in the route, so a failing query still gets a problem response.
    first = next(rows, None)
    primed = itertools.chain([] if first is None else [first], rows)
    return StreamingResponse(
        ndjson_chunks(primed, options.select_chunk_bytes), media_type=NDJSON_MEDIA_TYPE
    )
