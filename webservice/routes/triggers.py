"""``/v1/triggers``: events passing a trigger expression, and trigger overlaps.

The routes parse, call ``eventindex.query.triggers.TriggerIndex`` (one per app,
made on first use, so its bitmap cache is shared by every request) and return.
A malformed expression is a 422 naming the token and its position; a trigger
that no stored menu has, a run whose menu is missing, or a dataset pattern
matching nothing is a 404 (the dataset is resolved first).
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from eventindex.query.triggers import (
    TriggerExpressionError,
    TriggerIndex,
    UnknownTriggerError,
)
from webservice.dependencies import CatalogDep
from webservice.models import (
    EXAMPLE_COLLECTION,
    EXAMPLE_EXPRESSION,
    EXPRESSION_DESCRIPTION,
    EXPRESSION_PATTERN,
    MAX_EXPRESSION_CHARS,
    CollectionName,
    DatasetPattern,
)
from webservice.options import MAX_RUN_NUMBER
from webservice.problems import Location, ProblemError, problem_responses
from webservice.responses import json_response
from webservice.routes import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/triggers", tags=["triggers"])

MAX_OVERLAP_TRIGGERS = 64
_index_lock = threading.Lock()


def trigger_index(request: Request, catalog: CatalogDep) -> TriggerIndex:
    with _index_lock:
        index: TriggerIndex | None = getattr(request.app.state, "trigger_index", None)
        if index is None or index.catalog is not catalog:
            index = TriggerIndex(catalog)
            request.app.state.trigger_index = index
        return index


TriggerIndexDep = Annotated[TriggerIndex, Depends(trigger_index)]
DatasetQuery = Annotated[
    DatasetPattern,
    Query(
        description="Dataset name or glob pattern, e.g. `*.daq.RAW`; the events counted "
        "are the rows of the matching datasets.",
    ),
]
CollectionQuery = Annotated[
    CollectionName | None,
    Query(description="Only datasets of this collection.", examples=[EXAMPLE_COLLECTION]),
]
RunMinQuery = Annotated[
    int | None, Query(ge=0, le=MAX_RUN_NUMBER, description="First run (inclusive).")
]
RunMaxQuery = Annotated[
    int | None, Query(ge=0, le=MAX_RUN_NUMBER, description="Last run (inclusive).")
]


class RunCountModel(BaseModel):
    run_number: int
    smk: int = Field(description="The run's super master key: the menu its bits were read with.")
    events: int
    passed: int


class TriggerCountModel(BaseModel):
    """Events passing an expression, in total and run by run."""

    expression: str
    dataset: str
    run_min: int
    run_max: int
    passed: int = Field(description="Events passing the expression.")
    events: int = Field(description="Events of the matching datasets in the run range.")
    fraction: float
    datasets: int
    files: int
    unindexed_files: int = Field(
        description="Master files without a stored trigger index (indexed in memory)."
    )
    runs: list[RunCountModel]
    seconds: float


class TriggerOverlapModel(BaseModel):
    """``matrix[i][j]``: events passing both trigger i and trigger j."""

    expressions: list[str]
    dataset: str
    run_min: int
    run_max: int
    events: int
    counts: list[int]
    matrix: list[list[int]]
    files: int
    unindexed_files: int
    seconds: float


def _check_scope(
    index: TriggerIndex,
    dataset: str,
    collection: str | None,
    run_min: int | None,
    run_max: int | None,
) -> None:
    """404 for a dataset pattern matching nothing (checked first), 422 for a reversed range."""
    index.scope(dataset, collection=collection)
    if run_min is not None and run_max is not None and run_min > run_max:
        raise ProblemError.bad_field(
            422, "run_max", "query", f"run_max {run_max} is below run_min {run_min}", code="range"
        )


def bad_expression(
    field: str, exc: TriggerExpressionError, location: Location = "query"
) -> ProblemError:
    """A 404 naming ``field`` for a trigger no menu has, a 422 for a malformed expression."""
    if isinstance(exc, UnknownTriggerError):
        return ProblemError.bad_field(
            404, field, location, str(exc), kind="not-found", code="unknown_trigger"
        )
    return ProblemError.bad_field(422, field, location, str(exc), code="trigger_expression")


@router.get(
    "/count",
    response_model=TriggerCountModel,
    summary="Count events passing a trigger expression",
    responses=problem_responses(404, 422),
)
def count_triggers(
    index: TriggerIndexDep,
    expr: Annotated[
        str,
        Query(
            min_length=1,
            max_length=MAX_EXPRESSION_CHARS,
            json_schema_extra={"pattern": EXPRESSION_PATTERN},
            description=EXPRESSION_DESCRIPTION,
            examples=[EXAMPLE_EXPRESSION],
        ),
    ],
    dataset: DatasetQuery,
    collection: CollectionQuery = None,
    run_min: RunMinQuery = None,
    run_max: RunMaxQuery = None,
) -> Response:
    """How many events of the matching datasets (and run range) pass the expression, decoded
    run by run with the menu of the run's SMK, from the inverted trigger index."""
    _check_scope(index, dataset, collection, run_min, run_max)
    try:
        answer = index.count(
            expr, dataset=dataset, collection=collection, run_min=run_min, run_max=run_max
        )
    except TriggerExpressionError as exc:
        raise bad_expression("expr", exc) from exc
    return json_response(answer.to_dict())


@router.get(
    "/overlap",
    response_model=TriggerOverlapModel,
    summary="Overlap matrix of triggers",
    responses=problem_responses(404, 422),
)
def overlap_triggers(
    index: TriggerIndexDep,
    trigger: Annotated[
        list[
            Annotated[
                str,
                Field(
                    min_length=1,
                    max_length=MAX_EXPRESSION_CHARS,
                    json_schema_extra={"pattern": EXPRESSION_PATTERN},
                ),
            ]
        ],
        Query(
            min_length=1,
            max_length=MAX_OVERLAP_TRIGGERS,
            description="A trigger name or expression (repeat: `?trigger=A&trigger=B`).",
            examples=[["L1_EM15VH", "L1_XE50"]],
        ),
    ],
    dataset: DatasetQuery,
    collection: CollectionQuery = None,
    run_min: RunMinQuery = None,
    run_max: RunMaxQuery = None,
) -> Response:
    """For every pair of the given triggers, the events passing both (the diagonal holds
    each trigger's own count)."""
    _check_scope(index, dataset, collection, run_min, run_max)
    try:
        answer = index.overlap(
            trigger, dataset=dataset, collection=collection, run_min=run_min, run_max=run_max
        )
    except TriggerExpressionError as exc:
        raise bad_expression("trigger", exc) from exc
    return json_response(answer.to_dict())
