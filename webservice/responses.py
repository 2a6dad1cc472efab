"""Fast JSON and NDJSON bodies (orjson), for payloads the routes build themselves."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from starlette.responses import Response

NDJSON_MEDIA_TYPE = "application/x-ndjson"
_OPTIONS = orjson.OPT_NON_STR_KEYS


def _default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()  # trigger masks, should a row carry them raw
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(data: Any) -> bytes:
    return orjson.dumps(data, default=_default, option=_OPTIONS)


def json_response(data: Any, status_code: int = 200) -> Response:
    """``data`` as an ``application/json`` response, without a validation pass."""
    return Response(dumps(data), status_code=status_code, media_type="application/json")


def ndjson_chunks(rows: Iterable[Any], chunk_bytes: int) -> Iterator[bytes]:
    """One JSON document per line, gathered into chunks of about ``chunk_bytes``.

    Each chunk is one hop to the threadpool and one write, so rows are batched.
    """
    pending: list[bytes] = []
    size = 0
    for row in rows:
        line = dumps(row) + b"\n"
        pending.append(line)
        size += len(line)
        if size >= chunk_bytes:
            yield b"".join(pending)
            pending.clear()
            size = 0
    if pending:
        yield b"".join(pending)
