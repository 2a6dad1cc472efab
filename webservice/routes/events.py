"""``/v1/events``: pick one event, look up many, select a run range (NDJSON)."""

from __future__ import annotations

import itertools
from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.responses import Response, StreamingResponse

from webservice.dependencies import (
    CollectionsDep,
    EventCollectionQuery,
    OptionsDep,
    ReaderDep,
    RequireJson,
)
from webservice.models import (
    EXAMPLE_DATASET,
    DatasetPattern,
    FormatName,
    LookupRequest,
    LookupResponse,
    PickedEvent,
    SelectRequest,
)
from webservice.options import MAX_EVENT_NUMBER, MAX_RUN_NUMBER
from webservice.problems import ProblemError, problem_responses
from webservice.responses import NDJSON_MEDIA_TYPE, json_response, ndjson_chunks
from webservice.routes import API_PREFIX

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


@router.get(
    "/{run}/{event}",
    response_model=PickedEvent,
    summary="Pick one event",
    responses=problem_responses(404, 422),
)
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
    picked = reader.pick(collection, run, event, formats=formats, dataset_pattern=dataset)
    if picked is None:
        raise ProblemError.not_found(f"event {run}/{event} is not in {collection}")
    return json_response(picked.to_dict())


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
    results = reader.lookup(
        collection, body.events, formats=body.formats, dataset_pattern=body.dataset
    )
    missing = [list(key) for key, result in zip(body.events, results, strict=True) if not result]
    return json_response(
        {
            "results": [result.to_dict() if result else None for result in results],
            "found": len(results) - len(missing),
            "missing": missing,
        }
    )


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
    body: SelectRequest, reader: ReaderDep, collections: CollectionsDep, options: OptionsDep
) -> StreamingResponse:
    """Every event row of the run range, optionally of matching datasets only and with
    only some columns, streamed as newline-delimited JSON. Bad input is refused before
    the first row; a failure mid-stream cuts the response short."""
    collection = collections.resolve(body.collection, "body")
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
        )
    )
    # Take the first row here, in the route, so a failing query still gets a problem response.
    first = next(rows, None)
    primed = itertools.chain([] if first is None else [first], rows)
    return StreamingResponse(
        ndjson_chunks(primed, options.select_chunk_bytes), media_type=NDJSON_MEDIA_TYPE
    )
