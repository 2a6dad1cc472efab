"""``/v1/admin``: operations that need a bearer token from ``webservice.tokens``."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from webservice.dependencies import CollectionsDep, ReaderDep, RequireAdmin
from webservice.models import RefreshResult
from webservice.problems import problem_responses
from webservice.responses import json_response
from webservice.routes import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/admin", tags=["admin"], dependencies=[RequireAdmin])


@router.post(
    "/refresh",
    response_model=RefreshResult,
    summary="Refresh the Reader now",
    responses=problem_responses(401, 403),
)
def refresh(reader: ReaderDep, collections: CollectionsDep) -> Response:
    """Re-read the catalog now instead of within `refresh_seconds`, e.g. right after new
    files or collections were registered. Needs `Authorization: Bearer <token>`."""
    reader.refresh()
    collections.refresh()
    return json_response({"refreshed": True, "reader": reader.stats()})
