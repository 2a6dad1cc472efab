"""The message header (``"h"``): :class:`MessageHeader`, checked on construction.

The header names the producer, the message (``message_id``, what makes
redelivery idempotent), the dataset, collection and output file GUID, the task
and job, and the event count. Decoding a header is on the hot path: a
producer's messages differ only in ``message_id``, ``count`` and ``sent_at``,
so :func:`_decode_header` remembers the sources it has checked and builds a
header of a known source without the full check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from eventindex.records.codec.wire import (
    _GUID_RE,
    _KNOWN_GUIDS,
    _KNOWN_LIMIT,
    FORMAT_VERSION,
    MAX_COUNT,
    SUPPORTED_VERSIONS,
    MessageError,
    _describe,
)

_HEADER_TEXT_FIELDS: Final = (
    "producer",
    "message_id",
    "dataset",
    "collection",
    "guid",
    "task_id",
    "job_id",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageHeader:
    """What a message says about itself; every field is checked on construction.

    ``version`` is also the layout :func:`encode_events` writes: 2 (the default)
    or 1, the plain layout older consumers read.
    """

    version: int = FORMAT_VERSION
    producer: str
    message_id: str
    dataset: str
    collection: str
    guid: str
    task_id: str
    job_id: str
    count: int
    sent_at: float | None = None

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version not in SUPPORTED_VERSIONS:
            raise MessageError(
                f"unknown format version {_describe(self.version)} "
                f"(supported: {sorted(SUPPORTED_VERSIONS)})",
                field="v",
            )
        texts = (
            self.producer,
            self.message_id,
            self.dataset,
            self.collection,
            self.guid,
            self.task_id,
            self.job_id,
        )
        # One set() over the seven values is the common case; the loop only explains.
        if set(map(type, texts)) != {str} or "" in texts:
            for name, value in zip(_HEADER_TEXT_FIELDS, texts, strict=True):
                if type(value) is not str or not value:
                    raise MessageError(
                        f"expected a non-empty string, got {_describe(value)}",
                        field=f"header.{name}",
                    )
        if self.guid not in _KNOWN_GUIDS and _GUID_RE.fullmatch(self.guid) is None:
            raise MessageError(
                f"not a canonical 8-4-4-4-12 hex GUID: {self.guid!r}", field="header.guid"
            )
        if type(self.count) is not int or not 0 <= self.count <= MAX_COUNT:
            raise MessageError(
                f"expected an event count in [0, {MAX_COUNT}], got {_describe(self.count)}",
                field="header.count",
            )
        sent_at = self.sent_at
        if sent_at is not None and (
            type(sent_at) not in (int, float) or not math.isfinite(sent_at) or sent_at < 0
        ):
            raise MessageError(
                f"expected seconds since the epoch, got {_describe(sent_at)}",
                field="header.sent_at",
            )

    def wire_fields(self) -> dict[str, Any]:
        """The header as it is written under ``"h"``: everything but the version."""
        fields: dict[str, Any] = {
            "producer": self.producer,
            "message_id": self.message_id,
            "dataset": self.dataset,
            "collection": self.collection,
            "guid": self.guid,
            "task_id": self.task_id,
            "job_id": self.job_id,
            "count": self.count,
        }
        if self.sent_at is not None:
            fields["sent_at"] = self.sent_at
        return fields


_HEADER_KEYS: Final = frozenset((*_HEADER_TEXT_FIELDS, "count"))
_HEADER_KEYS_SENT: Final = _HEADER_KEYS | {"sent_at"}

# (version, producer, dataset, collection, guid, task_id, job_id) of headers already
# checked: a producer's messages differ only in message_id, count and sent_at.
_KNOWN_SOURCES: set[tuple[Any, ...]] = set()
_SET = object.__setattr__  # MessageHeader is frozen


def _decode_header(version: object, fields: object) -> MessageHeader:
    if type(fields) is not dict:
        raise MessageError(f"expected an object, got {_describe(fields)}", field="h")
    get = fields.get
    source = (
        version,
        get("producer"),
        get("dataset"),
        get("collection"),
        get("guid"),
        get("task_id"),
        get("job_id"),
    )
    message_id, count, sent_at = get("message_id"), get("count"), get("sent_at")
    try:
        known = source in _KNOWN_SOURCES
    except TypeError:  # an array or object where a string belongs
        known = False
    if (
        known
        and type(version) is int  # True == 1 as a set member
        and len(fields) == (8 if sent_at is None else 9)
        and type(message_id) is str
        and message_id
        and type(count) is int
        and 0 <= count <= MAX_COUNT
        and (
            sent_at is None
            or (type(sent_at) in (int, float) and math.isfinite(sent_at) and sent_at >= 0)
        )
    ):
        header = object.__new__(MessageHeader)
        for name, value in zip(_HEADER_FIELDS, (*source, message_id, count, sent_at), strict=True):
            _SET(header, name, value)
        return header
    header = _checked_header(version, fields)
    if len(_KNOWN_SOURCES) < _KNOWN_LIMIT:
        _KNOWN_SOURCES.add(source)
    return header


# MessageHeader's fields in the order _decode_header's fast path sets them.
_HEADER_FIELDS: Final = (
    "version",
    "producer",
    "dataset",
    "collection",
    "guid",
    "task_id",
    "job_id",
    "message_id",
    "count",
    "sent_at",
)


def _checked_header(version: object, fields: dict[str, Any]) -> MessageHeader:
    keys = fields.keys()
    if keys not in (_HEADER_KEYS, _HEADER_KEYS_SENT):
        missing = sorted(_HEADER_KEYS - keys)
        if missing:
            raise MessageError("missing header field", field=f"header.{missing[0]}")
        unknown = sorted(keys - _HEADER_KEYS_SENT)
        raise MessageError("unknown header field", field=f"header.{unknown[0]}")
    return MessageHeader(version=version, **fields)  # type: ignore[arg-type]
