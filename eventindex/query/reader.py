"""The Reader: one logical record per event, gathered from every dataset that holds it.

The catalog says which master files of a collection may hold a key (by run
range, then by each file's exact key range); map-file indexes answer the rest.
Files are immutable, so open readers are cached by file id for as long as the
catalog lists them.
"""

from __future__ import annotations

import fnmatch
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from catalog.base import Catalog
from catalog.model import Dataset, FileKind, TagFile
from eventindex.errors import NotFoundError
from eventindex.storage import MapFileReader

PICK_COLUMNS = (
    "run_number",
    "event_number",
    "lumi_block",
    "timestamp",
    "timestamp_ns",
    "bcid",
    "lvl1_id",
    "smk",
    "l1psk",
    "hltpsk",
    "references",
)


@dataclass(frozen=True)
class EventLocation:
    """Where one copy of an event lives: a file of some format, and the entry in it."""

    dataset: str
    format: str
    processing_tag: str
    guid: str
    position: int


@dataclass(frozen=True)
class PickedEvent:
    collection: str
    run_number: int
    event_number: int
    attributes: dict[str, Any]
    locations: list[EventLocation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "run_number": self.run_number,
            "event_number": self.event_number,
            "attributes": self.attributes,
            "locations": [location.__dict__ for location in self.locations],
        }


class Reader:
    """Picks events by ``(run_number, event_number)`` across the datasets of a collection."""

    def __init__(self, catalog: Catalog, max_open_files: int = 1024) -> None:
        self.catalog = catalog
        self.max_open_files = max_open_files
        self._readers: OrderedDict[str, MapFileReader] = OrderedDict()
        self._datasets: dict[str, Dataset] = {}
        self._lock = threading.Lock()

    def _reader(self, entry: TagFile) -> MapFileReader:
        with self._lock:
            reader = self._readers.get(entry.file_id)
            if reader is not None:
                self._readers.move_to_end(entry.file_id)
                return reader
        opened = MapFileReader(entry.uri)  # outside the lock: opening reads a footer
        with self._lock:
            reader = self._readers.setdefault(entry.file_id, opened)
            self._readers.move_to_end(entry.file_id)
            while len(self._readers) > self.max_open_files:
                _, old = self._readers.popitem(last=False)
                old.close()
        if reader is not opened:  # another thread opened it first
            opened.close()
        return reader

    def _dataset(self, name: str) -> Dataset | None:
        """The named dataset, or ``None`` if the catalog does not know it."""
        if name not in self._datasets:
            try:
                self._datasets[name] = self.catalog.get_dataset(name)
            except NotFoundError:
                return None
        return self._datasets[name]

    def pick(
        self,
        collection: str,
        run_number: int,
        event_number: int,
        *,
        formats: Iterable[str] | None = None,
        dataset_pattern: str | None = None,
    ) -> PickedEvent | None:
        """Every known location of one event, or ``None`` if no dataset holds it.

        ``formats`` keeps the locations of those formats; ``dataset_pattern`` (a
        glob) keeps the datasets whose names match it, both as the files read
        and as the datasets locations are attributed to.
        """
        key = (run_number, event_number)
        wanted_formats = set(formats) if formats else None
        candidates = [
            entry
            for entry in self.catalog.list_tagfiles(
                collection=collection,
                kinds=[FileKind.MASTER],
                first_key_range=(run_number, run_number),
            )
            if entry.key_min <= key <= entry.key_max
            and (dataset_pattern is None or fnmatch.fnmatchcase(entry.dataset, dataset_pattern))
        ]
        attributes: dict[str, Any] = {}
        locations: dict[tuple[str, str, int], EventLocation] = {}
        for entry in candidates:
            row = self._reader(entry).get(key, PICK_COLUMNS)
            if row is None:
                continue
            references = row.pop("references")
            if not attributes:
                attributes = {
                    k: v for k, v in row.items() if k not in ("run_number", "event_number")
                }
            dataset = self._dataset(entry.dataset) or Dataset(entry.dataset, collection)
            for reference in references:
                owner = self._owner(dataset, reference["format"])
                location = EventLocation(
                    dataset=owner.name if owner else "",
                    format=reference["format"],
                    processing_tag=owner.processing_tag if owner else "",
                    guid=reference["guid"],
                    position=reference["position"],
                )
                slot = (location.format, location.guid, location.position)
                # A dataset's own copy wins; an attributed copy beats an unattributed one.
                known = locations.get(slot)
                if known is None or owner is dataset or (owner and not known.dataset):
                    locations[slot] = location
        if not attributes:
            return None
        chosen = [
            loc
            for loc in locations.values()
            if (wanted_formats is None or loc.format in wanted_formats)
            and (dataset_pattern is None or fnmatch.fnmatchcase(loc.dataset, dataset_pattern))
        ]
        chosen.sort(key=lambda loc: (loc.format, loc.dataset, loc.guid))
        return PickedEvent(collection, run_number, event_number, attributes, chosen)

    def _owner(self, dataset: Dataset, fmt: str) -> Dataset | None:
        """The dataset whose files are of format ``fmt``: this one, or one upstream."""
        current: Dataset | None = dataset
        seen = set()
        while current is not None and current.name not in seen:
            if current.format == fmt:
                return current
            seen.add(current.name)
            current = self._dataset(current.upstream) if current.upstream else None
        return None

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
