"""What a running service holds: settings (limits among them), the catalog, one Reader, metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from catalog.base import Catalog
from eventindex.config import Settings, WebServiceSettings
from eventindex.errors import NotFoundError
from eventindex.query import Reader
from eventindex.records.schema import RecordKind
from webservice.metrics import HttpMetrics
from webservice.problems import Location, ProblemError

# No token read yet: unequal to every token a catalog gives.
_UNLISTED = object()


class EventCollections:
    """Checks collection names from requests; resolves an omitted one to the only one.

    Collections are never removed, so a name once seen stays valid. A name not seen
    yet costs a read of the catalog's change token; the collections are listed again
    only when the token moved since the last listing, and at most once per
    ``refresh_seconds``, so neither a stream of bad names nor one arriving during
    heavy ingestion (the token moving with every commit) floods the catalog with
    listings. A collection created meanwhile is known to the first request naming it
    once the last listing is ``refresh_seconds`` old.
    """

    def __init__(self, catalog: Catalog, reader: Reader, refresh_seconds: float) -> None:
        self._catalog = catalog
        self._reader = reader
        self._refresh_seconds = refresh_seconds
        self._kinds: dict[str, RecordKind] = {}
        self._token: Hashable = _UNLISTED
        self._listed_at = float("-inf")
        # Serialises token reads and listings: concurrent unknown names share one listing.
        self._lock = threading.Lock()

    def _current(self) -> dict[str, RecordKind]:
        """The kinds by name, listed again first if the catalog changed since the last
        listing and that listing is ``refresh_seconds`` old."""
        with self._lock:
            if time.monotonic() - self._listed_at >= self._refresh_seconds:
                # The token first: a change made during the listing moves it again.
                token = self._catalog.change_token()
                if token != self._token:
                    listed = {c.name: c.kind for c in self._catalog.list_collections()}
                    self._kinds = {**self._kinds, **listed}
                    self._token = token
                    self._listed_at = time.monotonic()
            return self._kinds

    def _kind(self, name: str) -> RecordKind | None:
        kind = self._kinds.get(name)
        return kind if kind is not None else self._current().get(name)

    def known(self, name: str) -> bool:
        """Whether ``name`` is an event collection already seen: no catalog query."""
        return self._kinds.get(name) is RecordKind.EVENTS

    def refresh(self) -> None:
        """List the collections on the next unseen name, whatever the token says."""
        with self._lock:
            self._token = _UNLISTED
            self._listed_at = float("-inf")

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
                several = sum(kind is RecordKind.EVENTS for kind in self._current().values()) > 1
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
