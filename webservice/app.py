"""The FastAPI application: ``create_app(settings)``, and the factory uvicorn workers call.

The lifespan opens the catalog (unless one is given) and one Reader, shared by
every request, and closes them at shutdown. Routes are plain ``def`` functions:
the Reader blocks on file reads, so FastAPI runs them in its threadpool and the
event loop stays free.
"""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from catalog import load_catalog
from catalog.base import Catalog
from eventindex import __version__
from eventindex.config import Settings, load_config
from eventindex.query import Reader
from webservice.metrics import HttpMetrics
from webservice.middleware import AccessLogMiddleware, BodyLimitMiddleware
from webservice.problems import PROBLEM_MEDIA_TYPE, install_problem_handlers
from webservice.routes import (
    admin,
    consistency,
    datasets,
    events,
    files,
    health,
    objects,
    queries,
    triggers,
)
from webservice.service import Service

DESCRIPTION = """\
Find every copy of an event: pick one by `(run, event)`, look up many at once,
list the events of a file, select a run range as NDJSON, browse datasets.

Errors are [RFC 9457](https://www.rfc-editor.org/rfc/rfc9457) problem details
(`application/problem+json`); bad input names each bad field under `errors`.
Admin routes need `Authorization: Bearer <token>` with a token from the
`webservice.tokens` setting.
"""


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema, with error responses declared as ``application/problem+json``."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[0] in "45" and "application/json" in content:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
    # FastAPI's own validation-error schemas, unused now that every 422 is a Problem.
    components = schema.get("components", {}).get("schemas", {})
    used = json.dumps(schema.get("paths"))
    for name in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{name}"' not in used:
            components.pop(name, None)
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings, *, catalog: Catalog | None = None) -> FastAPI:
    """The web service over ``settings``: its catalog (or ``catalog``, which the caller
    keeps and closes), one Reader, and the limits of the ``[webservice]`` section."""
    options = settings.webservice
    metrics = HttpMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened = load_catalog(settings.catalog) if catalog is None else catalog
        try:
            reader = Reader(
                opened,
                max_open_files=options.reader_max_open_files,
                refresh_seconds=options.reader_refresh_seconds,
                key_cache_bytes=options.reader_key_cache_bytes,
            )
            try:
                app.state.service = Service(settings, opened, reader, metrics)
                # What start-up made lives as long as the process: keep it out of every
                # later garbage collection, so none of them pauses a pick for long.
                gc.freeze()
                yield
            finally:
                reader.close()
                # Made on the first object request (webservice/routes/objects.py), if any.
                object_catalogs = getattr(app.state, "object_catalogs", None)
                if object_catalogs is not None:
                    object_catalogs.close()
                    app.state.object_catalogs = None
        finally:
            if catalog is None:
                opened.close()

    app = FastAPI(
        title="EventIndex",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        openapi_tags=[
            {"name": "events", "description": "Find events by run and event number."},
            {"name": "files", "description": "Events by file GUID."},
            {"name": "datasets", "description": "What the catalog holds."},
            {"name": "triggers", "description": "Trigger counts and overlaps."},
            {"name": "objects", "description": "Sky catalogs: objects by id, cone search."},
            {"name": "admin", "description": "Operations that need a bearer token."},
            {"name": "service", "description": "Health and metrics."},
        ],
    )
    install_problem_handlers(app)
    for module in (events, files, datasets, consistency, triggers, queries, objects, admin, health):
        app.include_router(module.router)
    # Added last is outermost: the access log sees the 413s the body limit sends, and
    # the picks answered ahead of routing.
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes)
    app.add_middleware(events.FastPicks)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def app_from_environment() -> FastAPI:
    """The factory ``eventindex serve`` hands uvicorn: every worker builds its own app
    from ``$EVENTINDEX_CONFIG`` and ``EVENTINDEX_<SECTION>__<KEY>`` variables."""
    return create_app(load_config())
