"""Message transport between producers and consumers (STOMP or in-process)."""

from eventindex.transport.base import (
    DLQ_PREFIX,
    EVENTS_QUEUE,
    HEADER_ERROR,
    HEADER_ORIGINAL_DESTINATION,
    STATUS_TOPIC,
    Message,
    Transport,
    dead_letter_queue,
)

__all__ = [
    "DLQ_PREFIX",
    "EVENTS_QUEUE",
    "HEADER_ERROR",
    "HEADER_ORIGINAL_DESTINATION",
    "STATUS_TOPIC",
    "Message",
    "Transport",
    "dead_letter_queue",
]
