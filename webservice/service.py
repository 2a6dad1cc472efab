"""What a running service holds: settings (limits among them), the catalog, one Reader, metrics."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from catalog.base import Catalog
from eventindex.config import Settings, WebServiceSettings
from eventindex.errors import NotFoundError
from eventindex.query import Reader
from eventindex.records.schema import RecordKind
from webservice.metrics import HttpMetrics
from webservice.problems import Location, ProblemError


class EventCollections:
    """Checks collection names from requests; resolves an omitted one to the only one.

    Collections are never removed, so a name once seen stays valid; a name not seen
    yet makes the catalog be asked again, at most once per ``refresh_seconds`` (as the
    Reader does), so a stream of bad names cannot flood the catalog with queries.
    """

    def __init__(self, catalog: Catalog, reader: Reader, refresh_seconds: float) -> None:
        self._catalog = catalog
        self._reader = reader
        self._refresh_seconds = refresh_seconds
        self._kinds: dict[str, RecordKind] = {}
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def _kind(self, name: str) -> RecordKind | None:
        with self._lock:
            kind = self._kinds.get(name)
            stale = time.monotonic() - self._loaded_at >= self._refresh_seconds
        if kind is None and stale:
            known = {c.name: c.kind for c in self._catalog.list_collections()}
            with self._lock:
                self._kinds.update(known)
                self._loaded_at = time.monotonic()
            kind = known.get(name)
        return kind

    def known(self, name: str) -> bool:
        """Whether ``name`` is an event collection already seen: no catalog query."""
        with self._lock:
            return self._kinds.get(name) is RecordKind.EVENTS

    def refresh(self) -> None:
        """Ask the catalog again on the next unseen name, however recent the last look."""
        with self._lock:
            self._loaded_at = float("-inf")

    def resolve(self, name: str | None, location: Location) -> str:
        """The event collection to query: ``name``, or the only one when ``None``.

        A ``ProblemError`` naming the ``collection`` field if the name is unknown
        (404), names an object catalog (404), or is omitted while the catalog
        holds several event collections (422) or none (404).
        """
        if name is None:
            try:
                return self._reader.default_collection()
            except NotFoundError as exc:
                several = (
                    sum(c.kind is RecordKind.EVENTS for c in self._catalog.list_collections()) > 1
                )
                raise ProblemError.bad_field(
                    422 if several else 404,
                    "collection",
                    location,
                    f"{'required' if several else 'no collection to default to'}: {exc}",
                    kind="invalid-request" if several else "not-found",
                    code="missing" if several else "not_found",
                ) from None
        kind = self._kind(name)
        if kind is None:
            raise ProblemError.bad_field(
                404,
                "collection",
                location,
                f"no collection {name!r}",
                kind="not-found",
                code="not_found",
            )
        if kind is not RecordKind.EVENTS:
            raise ProblemError.bad_field(
                404,
                "collection",
                location,
                f"collection {name!r} holds {kind.value}, not events",
                kind="not-found",
                code="not_events",
            )
        return name


@dataclass
class Service:
    """The state every request shares, built by the app's lifespan."""

    settings: Settings
    catalog: Catalog
    reader: Reader
    metrics: HttpMetrics
    collections: EventCollections = field(init=False)

    @property
    def options(self) -> WebServiceSettings:
        """The ``[webservice]`` settings: request limits and Reader tuning."""
        return self.settings.webservice

    def __post_init__(self) -> None:
        self.collections = EventCollections(
            self.catalog, self.reader, self.options.reader_refresh_seconds
        )
