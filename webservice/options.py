"""Limits of the HTTP service.

Every limit and tuning knob is a ``[webservice]`` setting
(``eventindex.config.WebServiceSettings``: ``max_body_bytes``,
``max_lookup_events``, ``max_select_rows``, ``select_chunk_bytes``,
``reader_max_open_files``, ``reader_refresh_seconds``, ``reader_key_cache_bytes``),
so operators set them in one place: ``conf/eventindex.toml``, ``$EVENTINDEX_CONFIG``
or ``EVENTINDEX_WEBSERVICE__<KEY>`` variables. What stays here are the bounds that
follow from the data model, not from operations.
"""

from __future__ import annotations

from eventindex.config import WebServiceSettings

MAX_RUN_NUMBER = 2**32 - 1
MAX_EVENT_NUMBER = 2**64 - 1

# The routes' view of the limits is the settings section itself.
ServiceOptions = WebServiceSettings

__all__ = ["MAX_EVENT_NUMBER", "MAX_RUN_NUMBER", "ServiceOptions"]
