"""Status messages on the status topic: what producers sent and what consumers stored.

Both sides publish JSON objects to ``STATUS_TOPIC``; the ``type`` key tells them
apart. A producer announces each file it sent (``FileSent``); a consumer
announces each TagFile it committed (``BatchStored``), with the message ids it
absorbed, so a producer waiting with ``produce send --wait`` knows when every
message of its file is stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final

import orjson

from eventindex.errors import ValidationError

HEADER_STATUS_TYPE: Final = "eventindex-status"
FILE_SENT: Final = "file-sent"
BATCH_STORED: Final = "batch-stored"
# STOMP header with the producer's clock at send time, for send → committed latency.
HEADER_SENT_AT: Final = "eventindex-sent-at"


@dataclass(frozen=True)
class FileSent:
    """A producer finished sending one intermediate file (per-file statistics)."""

    producer: str
    collection: str
    dataset: str
    guid: str
    events: int
    messages: int
    bytes: int
    seconds: float
    messages_sent_now: int
    type: str = FILE_SENT


@dataclass(frozen=True)
class BatchStored:
    """A consumer committed one TagFile and acknowledged the messages it absorbed."""

    consumer: str
    collection: str
    dataset: str
    file_id: str
    events: int
    guids: dict[str, int] = field(default_factory=dict)
    message_ids: list[str] = field(default_factory=list)
    committed_at: float = 0.0
    type: str = BATCH_STORED


def encode_status(status: FileSent | BatchStored) -> bytes:
    return orjson.dumps(asdict(status))


def decode_status(body: bytes) -> FileSent | BatchStored:
    """Parse a status message; ``ValidationError`` names what is wrong."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"status message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("status message is not a JSON object")
    kind = data.get("type")
    try:
        if kind == FILE_SENT:
            return FileSent(**data)
        if kind == BATCH_STORED:
            return BatchStored(**data)
    except TypeError as exc:
        raise ValidationError(f"status message of type {kind!r}: {exc}") from None
    raise ValidationError(f"unknown status message type {kind!r}")
