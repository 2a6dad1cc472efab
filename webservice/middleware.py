"""Pure ASGI middleware: request body limits, and access logs with metrics.

Pure ASGI rather than ``BaseHTTPMiddleware``: no extra task per request, and
streamed responses pass straight through.
"""

from __future__ import annotations

import logging
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webservice.metrics import HttpMetrics
from webservice.problems import FieldProblem, problem_response

access_log = logging.getLogger("eventindex.access")

# Methods whose requests carry no body for any route of ours: nothing to buffer.
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
UNMATCHED_ROUTE = "<unmatched>"


def route_label(scope: Scope) -> str:
    """The route template that answered (``/v1/events/{run}/{event}``), never the raw
    path, so metric label values stay few."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if isinstance(path, str):
        return path
    return UNMATCHED_ROUTE


class AccessLogMiddleware:
    """One JSON line per request on ``eventindex.access``, and the request metrics."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers if the app raises before responding
        sent = 0

        async def send_and_watch(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        self.metrics.started()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe(scope["method"], route_label(scope), status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(
                    orjson.dumps(
                        {
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status,
                            "duration_ms": round(seconds * 1000, 3),
                            "client": f"{client[0]}:{client[1]}" if client else None,
                            "route": route_label(scope),
                            "bytes": sent,
                        }
                    ).decode()
                )


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before anything parses them.

    A declared ``Content-Length`` over the limit is refused without reading; a body
    sent in chunks is counted as it arrives and refused once it passes the limit.
    An accepted body is buffered (it is parsed whole anyway) and replayed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, detail: str) -> None:
        problem = FieldProblem(field="body", location="body", detail=detail, code="too_large")
        response = problem_response(
            scope["path"],
            413,
            "Content too large",
            f"body: {detail}",
            kind="payload-too-large",
            errors=[problem],
            headers={"Connection": "close"},  # the rest of the body is never read
        )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value
                break
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                problem = FieldProblem(
                    field="content-length",
                    location="header",
                    detail="not a non-negative integer",
                    code="invalid",
                )
                response = problem_response(
                    scope["path"],
                    400,
                    "Bad Request",
                    "content-length (header): not a non-negative integer",
                    kind="invalid-request",
                    errors=[problem],
                )
                await response(scope, receive, send)
                return
            if length > self.max_bytes:
                await self._refuse(
                    scope,
                    receive,
                    send,
                    f"{length} bytes declared; the limit is {self.max_bytes} bytes",
                )
                return
        if scope["method"] in _BODILESS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(
                    scope, receive, send, f"more than the limit of {self.max_bytes} bytes sent"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], None, receive), send)


def _replay(messages: list[Message], last: Message | None, receive: Receive) -> Receive:
    """A receive that gives ``messages`` (then ``last``) first, then the real ones."""
    pending = [*messages, *([last] if last is not None else [])]

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
