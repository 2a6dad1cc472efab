"""FastAPI dependencies, as ``Annotated`` aliases the routes declare parameters with."""

from __future__ import annotations

import hmac
from email.message import Message
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from catalog.base import Catalog
from eventindex.config import WebServiceSettings
from eventindex.query import Reader
from webservice.models import MAX_COLLECTION_CHARS
from webservice.problems import ProblemError
from webservice.service import EventCollections, Service


async def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(_service)]


async def _reader(service: ServiceDep) -> Reader:
    return service.reader


async def _catalog(service: ServiceDep) -> Catalog:
    return service.catalog


async def _options(service: ServiceDep) -> WebServiceSettings:
    return service.options


async def _collections(service: ServiceDep) -> EventCollections:
    return service.collections


ReaderDep = Annotated[Reader, Depends(_reader)]
CatalogDep = Annotated[Catalog, Depends(_catalog)]
OptionsDep = Annotated[WebServiceSettings, Depends(_options)]
CollectionsDep = Annotated[EventCollections, Depends(_collections)]


async def _query_collection(
    collections: CollectionsDep,
    collection: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_COLLECTION_CHARS,
            description="The event collection; may be omitted when the catalog holds one.",
            examples=["data15_13TeV.physics_Main"],
        ),
    ] = None,
) -> str:
    if collection is not None and collections.known(collection):
        return collection  # the common case, answered without a trip to the threadpool
    # Resolving may query the catalog, which blocks: off the event loop.
    return await run_in_threadpool(collections.resolve, collection, "query")


EventCollectionQuery = Annotated[str, Depends(_query_collection)]


def json_media_type(content_type: str) -> bool:
    """Whether a ``Content-Type`` names JSON: ``application/json`` or ``application/*+json``,
    parameters allowed."""
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def _require_json(request: Request) -> None:
    """415 for a body that is not JSON (``application/json`` or ``application/*+json``)."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        if request.headers.get("content-length", "0") == "0" and (
            "transfer-encoding" not in request.headers
        ):
            return  # no body at all: validation reports the missing body
        raise ProblemError.bad_field(
            415,
            "content-type",
            "header",
            "missing; send the body as application/json",
            kind="unsupported-media-type",
            code="missing",
        )
    if not json_media_type(content_type):
        raise ProblemError.bad_field(
            415,
            "content-type",
            "header",
            f"{content_type!r} is not accepted; send the body as application/json",
            kind="unsupported-media-type",
            code="unsupported",
        )


RequireJson = Depends(_require_json)

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="One of the tokens in the `webservice.tokens` setting.",
)


async def _require_admin(
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a bearer token, 403 with a wrong one or when no tokens are configured."""
    tokens = service.settings.webservice.tokens
    if not tokens:
        raise ProblemError(
            403,
            "admin routes are disabled: no tokens are configured (set webservice.tokens)",
            kind="forbidden",
        )
    if credentials is None:
        raise ProblemError(
            401,
            "this route needs an Authorization: Bearer <token> header",
            kind="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    offered = credentials.credentials.encode()
    # Compare with every token, so the time taken says nothing about which one is close.
    matches = [hmac.compare_digest(offered, token.encode()) for token in tokens]
    if not any(matches):
        raise ProblemError(
            403,
            "the bearer token is not valid",
            kind="forbidden",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


RequireAdmin = Depends(_require_admin)
