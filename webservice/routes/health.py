"""``/v1/health`` and ``/metrics``: is the service up, and what has it done."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from eventindex import __version__
from webservice.dependencies import CatalogDep, ServiceDep
from webservice.metrics import CONTENT_TYPE, reader_series
from webservice.models import Health
from webservice.problems import problem_responses
from webservice.responses import json_response
from webservice.routes import API_PREFIX

router = APIRouter(tags=["service"])


@router.get(
    f"{API_PREFIX}/health",
    response_model=Health,
    summary="Health",
    responses=problem_responses(503),
)
def health(catalog: CatalogDep) -> Response:
    """`ok` with the version and number of collections when the catalog answers; 503 when
    it does not."""
    collections = catalog.list_collections()  # CatalogError -> 503
    return json_response({"status": "ok", "version": __version__, "collections": len(collections)})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"description": "Text exposition format 0.0.4.", "content": {CONTENT_TYPE: {}}}
    },
)
def metrics(service: ServiceDep) -> Response:
    """Requests by route and status, a latency histogram per route, and the Reader's cache
    statistics (hits, misses, open files), for this process."""
    text = service.metrics.render(reader_series(service.reader.stats()))
    return Response(text, media_type=CONTENT_TYPE)
