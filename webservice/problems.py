"""Errors as RFC 9457 problem details (``application/problem+json``), registered once.

Every error the service returns goes through :func:`problem_response`: request
validation (naming each bad field), the project's exceptions, Starlette's HTTP
errors (unknown route, wrong method) and anything unexpected (a 500 that says
nothing about internals; the traceback goes to the log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from eventindex.errors import CatalogError, EventIndexError, NotFoundError

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:eventindex:problem:"
# A validation error over a 100,000-element list can have 200,000 entries: report the first.
MAX_REPORTED_FIELDS = 50

log = logging.getLogger("eventindex.webservice")

Location = Literal["path", "query", "header", "body"]


class FieldProblem(BaseModel):
    """One bad input field."""

    field: str = Field(description="The field, dotted for nested ones: `events.3.1`.")
    location: Location = Field(description="Where the field was: path, query, header or body.")
    detail: str = Field(description="What is wrong with it.")
    code: str = Field(description="A machine-readable reason, e.g. `greater_than_equal`.")


class Problem(BaseModel):
    """An error, as RFC 9457 problem details."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:eventindex:problem:invalid-request",
                    "title": "Invalid request",
                    "status": 422,
                    "detail": "run (path): Input should be greater than or equal to 0",
                    "instance": "/v1/events/-1/5",
                    "errors": [
                        {
                            "field": "run",
                            "location": "path",
                            "detail": "Input should be greater than or equal to 0",
                            "code": "greater_than_equal",
                        }
                    ],
                }
            ]
        }
    )

    type: str = Field(description="A URI naming the kind of problem.")
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request.")
    instance: str = Field(description="The request path.")
    errors: list[FieldProblem] | None = Field(
        None, description="For bad input: each bad field (at most 50 are listed)."
    )


class ProblemError(Exception):
    """Raised by routes and dependencies to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str,
        title: str | None = None,
        errors: Sequence[FieldProblem] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.title = title or HTTPStatus(status).phrase
        self.errors = list(errors)
        self.headers = headers

    @classmethod
    def bad_field(
        cls,
        status: int,
        field: str,
        location: Location,
        detail: str,
        *,
        kind: str = "invalid-request",
        code: str = "invalid",
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> ProblemError:
        """A problem with one named input field."""
        return cls(
            status,
            f"{field} ({location}): {detail}",
            kind=kind,
            title=title,
            errors=[FieldProblem(field=field, location=location, detail=detail, code=code)],
            headers=headers,
        )

    @classmethod
    def not_found(cls, detail: str) -> ProblemError:
        return cls(404, detail, kind="not-found")


def problem_response(
    instance: str,
    status: int,
    title: str,
    detail: str,
    *,
    kind: str | None = None,
    errors: Sequence[FieldProblem] = (),
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The problem document as a response; ``kind=None`` is the generic ``about:blank``."""
    document: dict[str, Any] = {
        "type": f"{PROBLEM_TYPE_PREFIX}{kind}" if kind else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if errors:
        document["errors"] = [e.model_dump() for e in errors]
    return Response(
        orjson.dumps(document), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def _field_problems(errors: Sequence[Any]) -> list[FieldProblem]:
    problems = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        location = loc[0] if loc and loc[0] in ("path", "query", "header", "body") else "body"
        rest = loc[1:] if loc and loc[0] == location else loc
        if error.get("type") == "json_invalid":
            rest = ()  # the location is a character offset, not a field
        problems.append(
            FieldProblem(
                field=".".join(str(part) for part in rest) or location,
                location=location,
                detail=str(error.get("msg", "invalid")).removeprefix("Value error, "),
                code=str(error.get("type", "invalid")),
            )
        )
    return problems


def _summary(problems: Sequence[FieldProblem], total: int) -> str:
    shown = "; ".join(f"{p.field} ({p.location}): {p.detail}" for p in problems[:5])
    more = total - min(total, 5)
    return f"{shown}; and {more} more" if more else shown


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    malformed = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if malformed is not None:
        loc = tuple(malformed.get("loc", ()))
        position = loc[1] if len(loc) > 1 else "?"
        reason = (malformed.get("ctx") or {}).get("error", "invalid JSON")
        detail = f"not valid JSON at character {position}: {reason}"
        problem = FieldProblem(field="body", location="body", detail=detail, code="json_invalid")
        return problem_response(
            request.url.path,
            400,
            "Malformed JSON",
            f"body: {detail}",
            kind="malformed-json",
            errors=[problem],
        )
    problems = _field_problems(errors)
    return problem_response(
        request.url.path,
        422,
        "Invalid request",
        _summary(problems, len(problems)),
        kind="invalid-request",
        errors=problems[:MAX_REPORTED_FIELDS],
    )


async def _problem_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request.url.path,
        exc.status,
        exc.title,
        exc.detail,
        kind=exc.kind,
        errors=exc.errors,
        headers=exc.headers,
    )


def _unparsable_body(request: Request, cause: BaseException) -> Response:
    if isinstance(cause, UnicodeDecodeError):
        detail = f"not valid UTF-8 at byte {cause.start}"
    elif isinstance(cause, RecursionError):
        detail = "nested too deeply to parse"
    else:
        detail = f"cannot be parsed: {type(cause).__name__}"
    problem = FieldProblem(field="body", location="body", detail=detail, code="json_invalid")
    return problem_response(
        request.url.path,
        400,
        "Malformed JSON",
        f"body: {detail}",
        kind="malformed-json",
        errors=[problem],
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's own 400 for a body its JSON parser choked on (bad UTF-8, deep nesting).
        return _unparsable_body(request, exc.__cause__)
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) else phrase
    if exc.status_code == 404 and detail == phrase:
        detail = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    return problem_response(request.url.path, exc.status_code, phrase, detail, headers=exc.headers)


async def _not_found(request: Request, exc: Exception) -> Response:
    return problem_response(request.url.path, 404, "Not Found", str(exc), kind="not-found")


async def _value_error(request: Request, exc: Exception) -> Response:
    # The Reader's contract: ValueError means the caller asked for something impossible.
    return problem_response(
        request.url.path, 422, "Invalid request", str(exc), kind="invalid-request"
    )


async def _catalog_error(request: Request, exc: Exception) -> Response:
    log.error("catalog error on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request.url.path,
        503,
        "Catalog unavailable",
        "the catalog did not answer; try again later",
        kind="catalog-unavailable",
        headers={"Retry-After": "5"},
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request.url.path,
        500,
        "Internal server error",
        "the server failed to answer; the error is in its log",
        kind="internal-error",
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Register every exception handler of the service (once, at app creation)."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(NotFoundError, _not_found)
    app.add_exception_handler(CatalogError, _catalog_error)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(EventIndexError, _internal_error)
    app.add_exception_handler(Exception, _internal_error)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses (media type fixed in app.py)."""
    return {
        status: {"model": Problem, "description": HTTPStatus(status).phrase} for status in statuses
    }
