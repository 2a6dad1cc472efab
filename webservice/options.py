"""Limits and tuning of the HTTP service that are not (yet) part of ``config.Settings``.

They have safe defaults; ``create_app(..., options=ServiceOptions(...))`` overrides
them (the tests use small limits). Candidates for ``[webservice]`` in the config.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_RUN_NUMBER = 2**32 - 1
MAX_EVENT_NUMBER = 2**64 - 1


class ServiceOptions(BaseModel):
    """Request limits and Reader tuning of one web service process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(
        8 * 2**20,
        ge=1024,
        description="Largest request body; larger ones get 413 before any parsing.",
    )
    max_lookup_events: int = Field(
        100_000, ge=1, description="Most (run, event) pairs in one POST /events/lookup."
    )
    max_select_rows: int | None = Field(
        None, ge=1, description="Cap on the rows one POST /events/select streams (None: no cap)."
    )
    reader_max_open_files: int = Field(1024, ge=1, description="Map-file readers kept open.")
    reader_refresh_seconds: float = Field(
        1.0, ge=0, description="How stale the Reader's view of the catalog may be."
    )
    select_chunk_bytes: int = Field(
        64 * 1024, ge=1, description="NDJSON bytes gathered before each streamed chunk."
    )
