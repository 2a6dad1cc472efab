"""``/v1/files``: the event service, every event of one file GUID with its position."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.responses import Response

from webservice.dependencies import ReaderDep
from webservice.models import EXAMPLE_GUID, GUID_PATTERN, FileEvents
from webservice.problems import ProblemError, problem_responses
from webservice.responses import json_response
from webservice.routes import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/files", tags=["files"])

GuidPath = Annotated[
    str,
    Path(
        pattern=GUID_PATTERN,
        description="File GUID, canonical 8-4-4-4-12 hex form.",
        examples=[EXAMPLE_GUID],
    ),
]


@router.get(
    "/{guid}/events",
    response_model=FileEvents,
    summary="Events of one file",
    responses=problem_responses(404, 422),
)
def file_events(guid: GuidPath, reader: ReaderDep) -> Response:
    """Every event the file holds, with its entry number, and the file's format and dataset.
    404 if no catalogued file has this GUID."""
    found = reader.events_in_file(guid)
    if found is None:
        raise ProblemError.not_found(f"no catalogued events reference file {guid}")
    return json_response(found.to_dict())
