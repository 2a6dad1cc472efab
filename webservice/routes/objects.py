"""``/v1/objects``: pick an object of a spatial catalog by id, search a cone."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from eventindex.errors import NotFoundError
from eventindex.query.objects import ObjectCatalogs, ObjectTable, cone
from eventindex.spatial.chunker import SpatialError
from webservice.dependencies import ServiceDep
from webservice.problems import Location, ProblemError, problem_responses
from webservice.responses import json_response
from webservice.routes import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/objects", tags=["objects"])

MAX_CONE_RESULTS = 100_000
_create_lock = threading.Lock()


def _catalogs(request: Request, service: ServiceDep) -> ObjectCatalogs:
    """One ``ObjectCatalogs`` per app, made on the first object request."""
    state = request.app.state
    catalogs: ObjectCatalogs | None = getattr(state, "object_catalogs", None)
    if catalogs is None:
        with _create_lock:
            catalogs = getattr(state, "object_catalogs", None)
            if catalogs is None:
                # An unchanged catalog costs a change-token read per refresh, so tables
                # are checked as often as the Reader checks its file lists.
                catalogs = ObjectCatalogs(
                    service.catalog, refresh_seconds=service.options.reader_refresh_seconds
                )
                state.object_catalogs = catalogs
    return catalogs


CatalogsDep = Annotated[ObjectCatalogs, Depends(_catalogs)]
CatalogQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=256,
        description="Object catalog (collection) or partitioned table (dataset); may be "
        "omitted when there is one.",
        examples=["gaia_dr3"],
    ),
]


def _table(catalogs: ObjectCatalogs, name: str | None) -> ObjectTable:
    try:
        return catalogs.table(name)
    except NotFoundError as exc:
        raise ProblemError.bad_field(
            404, "catalog", "query", str(exc), kind="not-found", code="not_found"
        ) from None


def _bad(field: str, location: Location, exc: Exception) -> ProblemError:
    return ProblemError.bad_field(422, field, location, str(exc))


@router.get(
    "/cone",
    summary="Cone search",
    responses=problem_responses(404, 422),
)
def cone_search(
    catalogs: CatalogsDep,
    ra: Annotated[float, Query(ge=0.0, lt=360.0, description="Centre right ascension (deg).")],
    dec: Annotated[float, Query(ge=-90.0, le=90.0, description="Centre declination (deg).")],
    radius_arcsec: Annotated[
        float, Query(gt=0.0, le=648_000.0, description="Radius in arcseconds.")
    ],
    catalog: CatalogQuery = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_CONE_RESULTS, description="At most this many objects.")
    ] = 10_000,
) -> Response:
    """Every object within `radius_arcsec` of (`ra`, `dec`) by exact angular distance,
    with `distance_arcsec`; only the chunks the cone touches are read."""
    try:
        region = cone(ra, dec, radius_arcsec)
    except SpatialError as exc:
        raise _bad("radius_arcsec", "query", exc) from None
    table = _table(catalogs, catalog)
    found = table.search(region, limit=limit + 1)
    truncated = found.num_rows > limit
    rows: list[dict[str, Any]] = found.slice(0, limit).to_pylist()
    return json_response(
        {"catalog": table.name, "count": len(rows), "truncated": truncated, "objects": rows}
    )


@router.get(
    "/{object_id}",
    summary="Pick one object",
    responses=problem_responses(404, 422),
)
def get_object(
    object_id: Annotated[
        int, Path(ge=-(2**63), le=2**63 - 1, description="Object id (int64).", examples=[42])
    ],
    catalogs: CatalogsDep,
    catalog: CatalogQuery = None,
) -> Response:
    """The object's row with its `chunk_id` and `sub_chunk_id`, found through the
    director index. 404 if the catalog has no such object."""
    table = _table(catalogs, catalog)
    found = table.get(object_id)
    if found is None:
        raise ProblemError.not_found(f"object {object_id} is not in {table.name}")
    return json_response({"catalog": table.name, "object": found})
