"""Answering queries with the cheapest tool: key lookups through map-file indexes."""

from eventindex.query.reader import EventLocation, PickedEvent, Reader

__all__ = ["EventLocation", "PickedEvent", "Reader"]
