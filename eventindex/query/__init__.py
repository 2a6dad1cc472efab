"""Answering queries with the cheapest tool: key lookups through map-file indexes."""

from eventindex.query.reader import (
    EventLocation,
    FileEvents,
    PickedEvent,
    Reader,
    check_event_key,
    select_columns,
)

__all__ = [
    "EventLocation",
    "FileEvents",
    "PickedEvent",
    "Reader",
    "check_event_key",
    "select_columns",
]
