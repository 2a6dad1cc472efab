"""The Reader: one logical record per event, gathered from every dataset that holds it.

The committed master TagFiles of a collection are listed from the catalog and
kept in memory as an interval index sorted by first key, so finding the files
that may hold a key is a bisect, not a catalog query. Every ``refresh_seconds``
a background thread asks the catalog's change token (microseconds) and lists
again only if it changed: new files show within about a second, and a catalog
nobody writes to costs a token read a second, not a listing. Map-file key
indexes then say which of those files hold the key (no payload is read for
that), and only the files that must be read are decoded.

A record references every processing stage of its event (DESIGN.md §1, §3):
an AOD record names its RAW file and entry too. So when a derived dataset holds
the event, the copies in its upstream datasets are already known from its
references, and those upstream files are not read; an upstream dataset is read
only if no record that was read accounts for its copy. Files are immutable, so
open readers are cached by file id for as long as the catalog lists them.

A master file with a locations file (``eventindex.storage.locations``, built by
``eventindex spark locations``) is answered from it: a bisect and a gather in
memory-mapped arrays, with no Parquet decoded. Files without one (new TagFiles
from the consumers, until the job runs again) answer through their map-file.
"""

from __future__ import annotations

import bisect
import contextlib
import fnmatch
import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from catalog.base import Catalog
from catalog.model import Collection, Dataset, FileKind, TagFile
from eventindex.errors import EventIndexError, NotFoundError
from eventindex.query.extensions import Extensions
from eventindex.query.open_files import OpenFiles, OpenLocations
from eventindex.records.schema import EVENT_KEY, EVENT_SCHEMA, RecordKind
from eventindex.storage import DEFAULT_KEY_CACHE, QUERY_INDEX, MapFileReader
from eventindex.storage.keys import EncodedKeys, encode_key_columns, encode_query_keys
from eventindex.storage.locations import (
    LOCATIONS_PART,
    MASTER_ATTRIBUTE,
    LocationIndex,
    Reference,
)
from eventindex.storage.mapfile import key_dtypes

logger = logging.getLogger(__name__)

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
REFERENCES = ("references",)
IntArray = npt.NDArray[np.int64]
# What a locations file holds besides the key and the references: the attributes a pick returns.
LOCATION_ATTRIBUTES = tuple(c for c in PICK_COLUMNS if c not in EVENT_KEY and c != "references")
RUN_NUMBER_MAX = 2**32 - 1
EVENT_NUMBER_MAX = 2**64 - 1
# Threads decoding the files of a pick side by side (a pick reads two or three).
READ_THREADS = 8
# A changed catalog is listed again at most once per this many times what the last
# listing took: while consumers commit all the time, a catalog slow to list (0.45 s for
# hundreds of thousands of GUIDs) is listed at most a quarter of the time, since listing
# holds the GIL most of the time and slows the picks of its process meanwhile.
REFRESH_COST_FACTOR = 3.0

Key = tuple[int, ...]
EventKey = tuple[int, int]
# Where a reference points: (dataset, processing tag, rank): 2 the record's own dataset,
# 1 a dataset upstream of it, 0 none the catalog knows.
_Attribution = tuple[str, str, int]
_KEY_DTYPES = key_dtypes(EVENT_SCHEMA, EVENT_KEY)
_BINARY_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)


def _check_number(name: str, value: object, maximum: int, where: str = "") -> int:
    # bool is an int subclass, but True is no event number.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{where}{name} must be an integer, not {value!r}")
    number = int(value)
    if not 0 <= number <= maximum:
        raise ValueError(f"{where}{name} must be in [0, {maximum}], not {number}")
    return number


def check_event_key(run_number: object, event_number: object, where: str = "") -> EventKey:
    """``(run_number, event_number)`` as ints; ``ValueError`` naming the field if one is
    not an integer or lies outside uint32 (run) / uint64 (event)."""
    return (
        _check_number("run_number", run_number, RUN_NUMBER_MAX, where),
        _check_number("event_number", event_number, EVENT_NUMBER_MAX, where),
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
    """One event: its attributes, and every copy of it that the catalog knows."""

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
            "locations": [dict(location.__dict__) for location in self.locations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PickedEvent:
        """The inverse of ``to_dict`` (for answers that came over HTTP)."""
        return cls(
            collection=data["collection"],
            run_number=int(data["run_number"]),
            event_number=int(data["event_number"]),
            attributes=dict(data.get("attributes") or {}),
            locations=[EventLocation(**location) for location in data.get("locations") or []],
        )


@dataclass(frozen=True)
class FileEvents:
    """Every event of one file (by GUID), as ``(run_number, event_number, position)``
    sorted by position: what an event service needs to read the file's events."""

    guid: str
    format: str
    dataset: str
    processing_tag: str
    events: list[tuple[int, int, int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "guid": self.guid,
            "format": self.format,
            "dataset": self.dataset,
            "processing_tag": self.processing_tag,
            "count": len(self.events),
            "events": [
                {"run_number": run, "event_number": event, "position": position}
                for run, event, position in self.events
            ],
        }


def _key_of(values: Sequence[int]) -> Key:
    return tuple(int(v) for v in values)


@dataclass
class _Snapshot:
    """The committed master files of one collection, as of ``loaded_at``, when the
    catalog's change token was ``token`` (read before listing); ``checked_at`` is
    when the token was last found unchanged.

    ``files`` are sorted by first key; ``reach[i]`` is the largest last key of
    ``files[: i + 1]``, so every file before ``bisect_left(reach, key)`` ends
    before ``key`` and every file from ``bisect_right(starts, key)`` on starts
    after it: only the files in between can hold it.
    """

    collection: str
    loaded_at: float
    files: list[TagFile]
    datasets: dict[str, Dataset]
    # Master file id -> the entry of its locations file, for the masters that have one.
    sidecars: dict[str, TagFile] = field(default_factory=dict)
    # Whether every file has a locations file that opens (None: not looked yet).
    located: bool | None = None
    load_seconds: float = 0.0  # how long listing the catalog took
    token: Hashable = None
    checked_at: float = field(init=False)
    starts: list[Key] = field(init=False)
    ends: list[Key] = field(init=False)
    reach: list[Key] = field(init=False)
    starts_encoded: EncodedKeys = field(init=False)
    ends_encoded: EncodedKeys = field(init=False)
    # Memos of what follows from the dataset graph, filled on first use.
    owners: dict[tuple[str, str], Dataset | None] = field(default_factory=dict)
    attributions: dict[tuple[str, str], _Attribution] = field(default_factory=dict)
    by_format: dict[str, dict[str, _Attribution]] = field(default_factory=dict)
    implied: dict[str, frozenset[str]] = field(default_factory=dict)
    plans: dict[tuple[str, ...], frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.checked_at = self.loaded_at
        self.files.sort(key=lambda f: (_key_of(f.key_min), f.dataset, f.file_id))
        self.starts = [_key_of(f.key_min) for f in self.files]
        self.ends = [_key_of(f.key_max) for f in self.files]
        self.reach = []
        for end in self.ends:
            self.reach.append(max(end, self.reach[-1]) if self.reach else end)
        self.starts_encoded = encode_query_keys(self.starts, _KEY_DTYPES)
        self.ends_encoded = encode_query_keys(self.ends, _KEY_DTYPES)

    @property
    def file_ids(self) -> set[str]:
        return {f.file_id for f in self.files}

    @property
    def sidecar_ids(self) -> set[str]:
        return {e.file_id for e in self.sidecars.values()}

    def candidates(self, key: Key) -> list[TagFile]:
        """Files whose key range holds ``key``."""
        low = bisect.bisect_left(self.reach, key)
        high = bisect.bisect_right(self.starts, key)
        return [self.files[i] for i in range(low, high) if self.ends[i] >= key]


@dataclass
class _Record:
    """What one dataset's file says about one event."""

    entry: TagFile
    references: list[Reference]
    attributes: dict[str, Any] | None


def _sidecars(files: Sequence[TagFile], indexes: Sequence[TagFile]) -> dict[str, TagFile]:
    """The newest committed locations file of each master that describes it exactly."""
    masters = {f.file_id: f for f in files}
    found: dict[str, TagFile] = {}
    for entry in indexes:
        master = masters.get(entry.attributes.get(MASTER_ATTRIBUTE, ""))
        if (
            entry.part != LOCATIONS_PART
            or master is None
            or entry.rows != master.rows
            or (tuple(entry.key_min), tuple(entry.key_max))
            != (tuple(master.key_min), tuple(master.key_max))
        ):
            continue
        known = found.get(master.file_id)
        if known is None or (entry.committed_at or 0.0) > (known.committed_at or 0.0):
            found[master.file_id] = entry
    return found


def _as_references(values: Sequence[dict[str, Any]]) -> list[Reference]:
    return [(v["format"], v["guid"], v["position"]) for v in values]


class Reader:
    """Picks events by ``(run_number, event_number)`` across the datasets of a collection.

    Thread-safe; one Reader serves a whole process (the web service shares one).
    ``key_cache_bytes`` sets the budget of the process-wide cache of row-group keys:
    a pick checks one row group's keys in each file that may hold the event, so a
    warm server needs room for the row groups its picks touch (12 bytes an event row).
    The file list of a collection is checked against the catalog's change token
    when it is older than ``refresh_seconds``, and listed again only if the catalog
    changed (``refresh()`` forces it), so data committed later becomes visible
    without a restart: on a background thread while the old list keeps answering
    (listed at most once per 3 times what the last listing took), or before
    answering when ``refresh_seconds`` is 0. Readers of files that were retired are
    closed ``retired_grace_seconds`` later, so a query still using them can finish.
    """

    parallel_reads: bool = True

    def __init__(
        self,
        catalog: Catalog,
        *,
        max_open_files: int = 1024,
        refresh_seconds: float = 1.0,
        key_cache_bytes: int | None = None,
        use_locations: bool = True,
    ) -> None:
        if key_cache_bytes is not None:
            # The key cache is process-wide: the budget of the last Reader made wins.
            DEFAULT_KEY_CACHE.resize(key_cache_bytes)
        self.catalog = catalog
        self.max_open_files = max_open_files
        self.refresh_seconds = refresh_seconds
        self._files = OpenFiles(max_open_files)
        # Extension columns (vertical parts) that picks and lookups add to each event; their
        # lists are refreshed with the master lists (``_load``), never on a pick's path.
        self.extensions = Extensions(catalog, refresh_seconds=math.inf, files=self._files)
        self._sidecar_files = OpenLocations(max_open_files)
        # Whether locations files answer for their masters (False: map-files only).
        self.use_locations = use_locations
        self._broken: set[str] = set()  # locations files that failed to open
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._snapshots: dict[str, _Snapshot] = {}
        self._collections: dict[str, Collection] = {}
        self._collections_at = float("-inf")
        self._collections_token: Hashable = None
        self._foreign: dict[str, Dataset | None] = {}
        self._counts = dict.fromkeys(
            (
                "catalog_refreshes",
                "catalog_checks",
                "picks_served",
                "lookups_served",
                "events_looked_up",
                "locations_reads",
                "mapfile_reads",
            ),
            0,
        )

    # -- the file index ------------------------------------------------------
    def _count(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._counts[name] += by

    def _load_collections(self, *, force: bool = True) -> None:
        """List the collections, unless the catalog is unchanged since they were listed
        (caller holds ``_refresh_lock``)."""
        token = self.catalog.change_token()
        if force or token != self._collections_token:
            self._collections = {c.name: c for c in self.catalog.list_collections()}
            self._collections_token = token
        self._collections_at = time.monotonic()

    def _fresh_collections(self, *, wait: bool) -> None:
        """Look again at a collection list older than ``refresh_seconds``; with ``wait``
        False, a list known answers meanwhile if another thread is refreshing."""
        if time.monotonic() - self._collections_at < self.refresh_seconds:
            return
        if not self._refresh_lock.acquire(blocking=wait or self._collections_token is None):
            return
        try:
            self._load_collections(force=False)
        finally:
            self._refresh_lock.release()

    def _collection(self, name: str) -> Collection:
        collection = self._collections.get(name)
        if collection is None:
            self._fresh_collections(wait=True)
            collection = self._collections.get(name)
        if collection is None:
            raise NotFoundError(f"collection {name!r} not found")
        if collection.kind is not RecordKind.EVENTS:
            raise NotFoundError(f"collection {name!r} holds {collection.kind.value}, not events")
        return collection

    def default_collection(self) -> str:
        """The name of the only event collection; ``NotFoundError`` if there are none or several."""
        self._fresh_collections(wait=False)
        names = sorted(n for n, c in self._collections.items() if c.kind is RecordKind.EVENTS)
        if len(names) != 1:
            raise NotFoundError(
                f"no collection named, and the catalog holds {len(names)} event collections "
                f"({', '.join(names) or 'none'}): name one"
            )
        return names[0]

    def _snapshot(self, collection: str) -> _Snapshot:
        snapshot = self._snapshots.get(collection)
        if snapshot is not None and not self._due(snapshot):
            return snapshot
        if snapshot is None:
            self._collection(collection)
            with self._refresh_lock:
                current = self._snapshots.get(collection)
                if current is not None and current is not snapshot:
                    return current  # another thread loaded it while this one waited
                return self._load(collection)
        # Due: one thread checks, the others keep answering from the old list meanwhile.
        if not self._refresh_lock.acquire(blocking=False):
            return snapshot
        if self.refresh_seconds > 0:
            # Off the caller's path: the token read may be a round trip (HBase), and a
            # listing takes longer than a pick.
            threading.Thread(
                target=self._reload, args=(snapshot,), name="reader-refresh", daemon=True
            ).start()
            return snapshot
        return self._reload(snapshot)

    def _due(self, snapshot: _Snapshot) -> bool:
        """Whether to ask the catalog again: the last check is ``refresh_seconds`` old, and
        the last listing old enough to list again if the catalog changed."""
        if self.refresh_seconds <= 0:
            return True
        now = time.monotonic()
        return now - snapshot.checked_at >= self.refresh_seconds and (
            now - snapshot.loaded_at
            >= max(self.refresh_seconds, REFRESH_COST_FACTOR * snapshot.load_seconds)
        )

    def _reload(self, snapshot: _Snapshot) -> _Snapshot:
        """List a file list again if the catalog changed since it was listed (the caller
        acquired ``_refresh_lock``; this releases it)."""
        try:
            token = self.catalog.change_token()
            self._count("catalog_checks")
            if token == snapshot.token:
                snapshot.checked_at = time.monotonic()
                return snapshot
            return self._load(snapshot.collection, token)
        except EventIndexError as exc:
            # A catalog outage should not fail picks the old list can answer: keep it,
            # and try again one refresh period later rather than on every pick.
            logger.warning(
                "keeping the file list of %s: refresh failed: %s", snapshot.collection, exc
            )
            snapshot.loaded_at = snapshot.checked_at = time.monotonic()
            return snapshot
        finally:
            self._refresh_lock.release()

    def _load(self, collection: str, token: Hashable = None) -> _Snapshot:
        """List the collection's files and datasets (caller holds ``_refresh_lock``).

        ``token`` is the change token read before, if the caller read it.
        """
        started = time.perf_counter()
        if token is None:
            token = self.catalog.change_token()  # first: a change made meanwhile shows next time
        files = self.catalog.list_tagfiles(collection=collection, kinds=[FileKind.MASTER])
        indexes = self.catalog.list_tagfiles(collection=collection, kinds=[FileKind.INDEX])
        datasets = {d.name: d for d in self.catalog.list_datasets(collection)}
        self.extensions.reload(collection, token)
        snapshot = _Snapshot(
            collection, time.monotonic(), files, datasets, _sidecars(files, indexes)
        )
        snapshot.load_seconds = time.perf_counter() - started
        snapshot.token = token
        previous = self._snapshots.get(collection)
        self._snapshots[collection] = snapshot
        self._foreign = {}
        self._count("catalog_refreshes")
        if previous is not None:
            self._files.drop(previous.file_ids - snapshot.file_ids)
            self._sidecar_files.drop(previous.sidecar_ids - snapshot.sidecar_ids)
        self._files.close_retired()
        self._sidecar_files.close_retired()
        return snapshot

    def refresh(self) -> None:
        """Re-read the catalog now: collections, and the files of every collection in use."""
        self.extensions.refresh()
        with self._refresh_lock:
            self._load_collections()
            for name in list(self._snapshots):
                if name in self._collections:
                    self._load(name)
                else:
                    gone = self._snapshots.pop(name)
                    self._files.drop(gone.file_ids)
                    self._sidecar_files.drop(gone.sidecar_ids)

    @property
    def retired_grace_seconds(self) -> float:
        """How long readers of retired files stay open for the queries still using them."""
        return self._files.grace_seconds

    @retired_grace_seconds.setter
    def retired_grace_seconds(self, seconds: float) -> None:
        self._files.grace_seconds = seconds
        self._sidecar_files.grace_seconds = seconds

    def _reader(self, entry: TagFile) -> MapFileReader:
        return self._files.reader(entry)

    def _sidecar(self, snapshot: _Snapshot, entry: TagFile) -> LocationIndex | None:
        """The open locations file of a master file, or ``None`` (then its map-file answers).

        One that cannot be opened is logged once and left alone: its master still answers.
        """
        if not self.use_locations:
            return None
        sidecar = snapshot.sidecars.get(entry.file_id)
        if sidecar is None or sidecar.file_id in self._broken:
            return None
        try:
            return self._sidecar_files.reader(sidecar)
        except EventIndexError as exc:
            logger.warning("locations file of %s not used: %s", entry.file_id, exc)
            with self._lock:
                self._broken.add(sidecar.file_id)
            return None

    def located(self, collection: str) -> bool:
        """Whether locations files answer for every file of the collection, so a pick
        decodes no Parquet (the web service then answers it on the event loop)."""
        snapshot = self._snapshot(collection)
        if snapshot.located is None:
            # Once per file list: open them all (a damaged one then counts as missing).
            snapshot.located = self.use_locations and all(
                self._sidecar(snapshot, entry) is not None for entry in snapshot.files
            )
        return (
            self.use_locations
            and snapshot.located
            and not (self._broken and self._broken & snapshot.sidecar_ids)
        )

    def _holds(self, snapshot: _Snapshot, entry: TagFile, key: EventKey) -> bool:
        """Whether a file holds the key, from its key index alone (no payload is read)."""
        index = self._sidecar(snapshot, entry)
        if index is not None:
            return index.find(*key) >= 0
        return self._reader(entry).get(key, EVENT_KEY) is not None

    # -- the dataset graph ---------------------------------------------------
    def _dataset(self, snapshot: _Snapshot, name: str) -> Dataset | None:
        """The named dataset, or ``None`` if the catalog does not know it."""
        known = snapshot.datasets.get(name)
        if known is not None:
            return known
        if name not in self._foreign:  # an upstream in another collection, or none at all
            try:
                self._foreign[name] = self.catalog.get_dataset(name)
            except NotFoundError:
                self._foreign[name] = None
        return self._foreign[name]

    def _owner(self, snapshot: _Snapshot, dataset: Dataset, fmt: str) -> Dataset | None:
        """The dataset whose files are of format ``fmt``: this one, or one upstream."""
        memo = (dataset.name, fmt)
        if memo in snapshot.owners:
            return snapshot.owners[memo]
        owner = None
        current: Dataset | None = dataset
        seen = set()
        while current is not None and current.name not in seen:
            if current.format == fmt:
                owner = current
                break
            seen.add(current.name)
            current = self._dataset(snapshot, current.upstream) if current.upstream else None
        snapshot.owners[memo] = owner
        return owner

    def _implied(self, snapshot: _Snapshot, name: str) -> frozenset[str]:
        """Datasets upstream of ``name`` whose copies its records reference."""
        if name not in snapshot.implied:
            dataset = self._dataset(snapshot, name)
            implied = set()
            current = dataset
            seen = {name}
            while current is not None and current.upstream and current.upstream not in seen:
                seen.add(current.upstream)
                current = self._dataset(snapshot, current.upstream)
                if (
                    current is not None
                    and dataset is not None
                    and self._owner(snapshot, dataset, current.format) is current
                ):
                    implied.add(current.name)
            snapshot.implied[name] = frozenset(implied)
        return snapshot.implied[name]

    def _plan(self, snapshot: _Snapshot, holders: tuple[str, ...]) -> frozenset[str]:
        """Which of the datasets holding an event to read: the most derived ones first,
        then any whose copy none of those references."""
        plan = snapshot.plans.get(holders)
        if plan is None:
            depth = {name: len(self._implied(snapshot, name)) for name in holders}
            read: set[str] = set()
            covered: set[str] = set()
            for name in sorted(holders, key=lambda n: (-depth[n], n)):
                if name not in covered:
                    read.add(name)
                    covered |= self._implied(snapshot, name)
            plan = snapshot.plans[holders] = frozenset(read)
        return plan

    # -- one event -----------------------------------------------------------
    def _attribution(self, snapshot: _Snapshot, name: str, fmt: str) -> _Attribution:
        """Which dataset a reference of format ``fmt`` in dataset ``name`` points into."""
        memo = (name, fmt)
        found = snapshot.attributions.get(memo)
        if found is None:
            dataset = self._dataset(snapshot, name) or Dataset(name, snapshot.collection)
            owner = self._owner(snapshot, dataset, fmt)
            rank = 0 if owner is None else 2 if owner.name == name else 1
            found = (owner.name, owner.processing_tag, rank) if owner else ("", "", 0)
            snapshot.attributions[memo] = found
        return found

    def _locations(
        self, snapshot: _Snapshot, records: Sequence[_Record]
    ) -> dict[tuple[str, str, int], _Attribution]:
        """Every copy the records reference: (format, guid, position) -> its dataset."""
        locations: dict[tuple[str, str, int], _Attribution] = {}
        for record in records:
            name = record.entry.dataset
            by_format = snapshot.by_format.get(name)
            if by_format is None:
                by_format = snapshot.by_format[name] = {}
            for slot in record.references:
                attribution = by_format.get(slot[0])
                if attribution is None:
                    attribution = by_format[slot[0]] = self._attribution(snapshot, name, slot[0])
                # A dataset's own copy wins; an attributed copy beats an unattributed one.
                known = locations.get(slot)
                if known is None or attribution[2] == 2 or (attribution[2] > known[2] == 0):
                    locations[slot] = attribution
        return locations

    def _record(
        self, snapshot: _Snapshot, entry: TagFile, key: EventKey, attributes: bool
    ) -> _Record | None:
        """One file's record of the event, with the event attributes or only its references."""
        index = self._sidecar(snapshot, entry)
        if index is not None:
            self._count("locations_reads")
            row = index.find(*key)
            if row < 0:
                return None
            return _Record(
                entry, index.references(row), index.attributes(row) if attributes else None
            )
        self._count("mapfile_reads")
        found = self._reader(entry).get(key, PICK_COLUMNS if attributes else REFERENCES)
        if found is None:
            return None
        references = _as_references(found.pop("references"))
        kept = {k: v for k, v in found.items() if k not in EVENT_KEY} if attributes else None
        return _Record(entry, references, kept)

    def _records(
        self, snapshot: _Snapshot, entries: Sequence[TagFile], key: EventKey
    ) -> list[_Record]:
        """The records of ``entries`` for one key, the first with the event attributes.

        Map-files are decoded on pool threads at once (Arrow decodes without the GIL),
        so a pick waits for its slowest file rather than for the sum of them; when
        locations files answer for all but one, there is nothing worth a thread.
        """
        decoded = sum(1 for e in entries if self._sidecar(snapshot, e) is None)
        if len(entries) > 1 and decoded > 1 and self.parallel_reads:
            pool = _read_pool()
            futures = [pool.submit(self._record, snapshot, e, key, False) for e in entries[1:]]
            found = [self._record(snapshot, entries[0], key, True), *(f.result() for f in futures)]
        else:
            found = [self._record(snapshot, e, key, i == 0) for i, e in enumerate(entries)]
        return [r for r in found if r is not None]

    def _finish(
        self,
        snapshot: _Snapshot,
        key: EventKey,
        holders: Sequence[TagFile],
        read: frozenset[str],
        records: list[_Record],
        formats: set[str] | None,
        dataset_pattern: str | None,
    ) -> PickedEvent | None:
        """The picked event from the records read, reading skipped holders whose copy
        no record accounts for (a record that lacks its upstream references)."""
        locations = self._locations(snapshot, records)
        attributed = {dataset for dataset, _, _ in locations.values()}
        skipped = [e for e in holders if e.dataset not in read and e.dataset not in attributed]
        for entry in skipped:
            record = self._record(snapshot, entry, key, attributes=not records)
            if record is not None:
                records.append(record)
        if skipped:
            locations = self._locations(snapshot, records)
        if not records:
            return None
        attributes = next((r.attributes for r in records if r.attributes is not None), None)
        if attributes is None:
            record = self._record(snapshot, records[0].entry, key, attributes=True)
            attributes = record.attributes if record and record.attributes else {}
        # Sorted as tuples (format, dataset, guid, position): no key function per item.
        chosen = sorted(
            (fmt, dataset, guid, position, tag)
            for (fmt, guid, position), (dataset, tag, _) in locations.items()
            if (formats is None or fmt in formats)
            and (dataset_pattern is None or fnmatch.fnmatchcase(dataset, dataset_pattern))
        )
        return PickedEvent(
            snapshot.collection,
            key[0],
            key[1],
            attributes,
            [EventLocation(d, f, t, g, p) for f, d, g, p, t in chosen],
        )

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
        and as the datasets locations are attributed to. ``ValueError`` for a
        key outside uint32/uint64, ``NotFoundError`` for an unknown collection.
        """
        key = check_event_key(run_number, event_number)
        wanted_formats = set(formats) if formats else None
        snapshot = self._snapshot(collection)
        self._count("picks_served")
        candidates = [
            entry
            for entry in snapshot.candidates(key)
            if dataset_pattern is None or fnmatch.fnmatchcase(entry.dataset, dataset_pattern)
        ]
        # Most derived datasets first: once one holds the key, the datasets its records
        # reference need no key check (each costs a row group's keys when not cached).
        # They stay candidates: _finish reads one only if no record accounts for it.
        candidates.sort(key=lambda e: (-len(self._implied(snapshot, e.dataset)), e.dataset))
        holders: list[TagFile] = []
        unchecked: list[TagFile] = []
        covered: set[str] = set()
        for entry in candidates:
            if entry.dataset in covered:
                unchecked.append(entry)
            # The key index alone says whether a file holds the key: no payload is read.
            elif self._holds(snapshot, entry, key):
                holders.append(entry)
                covered |= self._implied(snapshot, entry.dataset)
        if not holders:
            return None
        holders.extend(unchecked)
        holders.sort(key=lambda e: (e.dataset, _key_of(e.key_min), e.file_id))
        read = self._plan(snapshot, tuple(sorted({e.dataset for e in holders})))
        records = self._records(snapshot, [e for e in holders if e.dataset in read], key)
        event = self._finish(snapshot, key, holders, read, records, wanted_formats, dataset_pattern)
        return self.extensions.extend(collection, [event], dataset_pattern=dataset_pattern)[0]

    # -- many events -----------------------------------------------------------
    def lookup(
        self,
        collection: str,
        keys: Sequence[tuple[int, int]],
        *,
        formats: Iterable[str] | None = None,
        dataset_pattern: str | None = None,
    ) -> list[PickedEvent | None]:
        """``pick`` for many events at once: answers in the order of ``keys``.

        Each file is asked once for all its keys (``MapFileReader.get_many``), so
        a row group is decoded at most once however many of the keys it holds.
        """
        checked = [check_event_key(*key, where=f"keys[{i}]: ") for i, key in enumerate(keys)]
        with _collection_paused():
            return self._lookup(collection, checked, formats, dataset_pattern)

    def _lookup(
        self,
        collection: str,
        checked: list[EventKey],
        formats: Iterable[str] | None,
        dataset_pattern: str | None,
    ) -> list[PickedEvent | None]:
        wanted_formats = set(formats) if formats else None
        snapshot = self._snapshot(collection)
        self._count("lookups_served")
        self._count("events_looked_up", len(checked))
        if not checked:
            return []
        holders, located = self._holders(snapshot, checked, dataset_pattern)

        # Which files to read for which keys, decided as pick decides for one key; the
        # keys of one run share their holders, so each distinct holder list is planned once.
        reads: dict[int, list[int]] = {}
        attributed: dict[int, set[int]] = {}
        plans: list[frozenset[str]] = []
        planned: dict[tuple[int, ...], tuple[list[int], frozenset[str], list[int]]] = {}
        for query, files in enumerate(holders):
            found = planned.get(tuple(files))
            if found is None:
                ordered = sorted(
                    files, key=lambda i: (snapshot.files[i].dataset, snapshot.starts[i], i)
                )
                read = (
                    self._plan(snapshot, tuple(sorted({snapshot.files[i].dataset for i in files})))
                    if files
                    else frozenset()
                )
                found = planned[tuple(files)] = (
                    ordered,
                    read,
                    [i for i in ordered if snapshot.files[i].dataset in read],
                )
            ordered, read, to_read = found
            holders[query] = ordered
            plans.append(read)
            for index in to_read:
                reads.setdefault(index, []).append(query)
            if to_read:
                attributed.setdefault(to_read[0], set()).add(query)

        # The rows each locations file is read at, and every file's pages of them asked
        # for before any is read (records first: with rows of different depths, where a
        # row's references are is in its record), so the reads of all files overlap.
        rows_of: dict[int, tuple[LocationIndex, IntArray]] = {}
        for index in sorted(reads):
            if index in located:
                sidecar, held, rows = located[index]
                rows_of[index] = (sidecar, rows[np.searchsorted(held, reads[index])])
        for index, (sidecar, rows) in rows_of.items():
            wanted = attributed.get(index, set())
            mask = np.fromiter((q in wanted for q in reads[index]), bool, len(rows))
            sidecar.prefetch_rows(rows, rows[mask])
        for sidecar, rows in rows_of.values():
            sidecar.prefetch_references(rows)
        # One file at a time: get_many already decodes a file's row groups on several threads.
        records: list[list[_Record]] = [[] for _ in checked]
        for index in sorted(reads):
            entry = snapshot.files[index]
            wanted = attributed.get(index, set())
            answered = (
                self._read_many_located(
                    rows_of[index][0], entry, checked, reads[index], wanted, rows_of[index][1]
                )
                if index in rows_of
                else self._read_many(snapshot, entry, checked, reads[index], wanted)
            )
            for query, record in answered:
                records[query].append(record)
        events = [
            self._finish(
                snapshot,
                key,
                [snapshot.files[i] for i in holders[query]],
                plans[query],
                records[query],
                wanted_formats,
                dataset_pattern,
            )
            if holders[query]
            else None
            for query, key in enumerate(checked)
        ]
        return self.extensions.extend(collection, events, dataset_pattern=dataset_pattern)

    def _holders(
        self, snapshot: _Snapshot, keys: Sequence[EventKey], dataset_pattern: str | None
    ) -> tuple[list[list[int]], dict[int, tuple[LocationIndex, IntArray, IntArray]]]:
        """For every key, the indexes in ``snapshot.files`` of the files that hold it; and
        per file answered by a locations file, that file, the keys it holds (sorted) and
        their rows."""
        runs = np.fromiter((k[0] for k in keys), dtype=np.uint32, count=len(keys))
        events = np.fromiter((k[1] for k in keys), dtype=np.uint64, count=len(keys))
        encoded = encode_key_columns([runs, events])
        order = np.argsort(encoded, kind="stable")
        ordered = encoded[order]
        # Per file, the slice of the sorted keys inside its key range: two vectorised bisects.
        low = np.searchsorted(ordered, snapshot.starts_encoded, side="left")
        high = np.searchsorted(ordered, snapshot.ends_encoded, side="right")
        # (file, its keys, its locations file and their runs and events, or None and all keys)
        candidates: list[
            tuple[
                int, IntArray, LocationIndex | None, npt.NDArray[np.uint32], npt.NDArray[np.uint64]
            ]
        ] = []
        for index in np.flatnonzero(high > low).tolist():
            entry = snapshot.files[index]
            if dataset_pattern is not None and not fnmatch.fnmatchcase(
                entry.dataset, dataset_pattern
            ):
                continue
            queries = order[low[index] : high[index]]
            sidecar = self._sidecar(snapshot, entry)
            if sidecar is not None:
                file_runs, file_events = runs[queries], events[queries]
                # Every file's key blocks are asked for before any is read: the reads
                # of all files then overlap instead of waiting one file at a time.
                sidecar.prefetch_keys(file_runs, file_events)
                candidates.append((index, queries, sidecar, file_runs, file_events))
            else:
                candidates.append((index, queries, None, runs, events))
        holders: list[list[int]] = [[] for _ in keys]
        located: dict[int, tuple[LocationIndex, IntArray, IntArray]] = {}
        for index, queries, sidecar, file_runs, file_events in candidates:
            if sidecar is not None:
                rows = sidecar.find_many(file_runs, file_events, prefetched=True)
                hit = rows >= 0
                held = queries[hit]
                for query in held.tolist():
                    holders[query].append(index)
                by_query = np.argsort(held, kind="stable")
                located[index] = (sidecar, held[by_query], rows[hit][by_query])
                continue
            # Key columns only: answered from the key index, no payload is decoded.
            found = self._reader(snapshot.files[index]).get_many(
                [keys[q] for q in queries.tolist()], EVENT_KEY
            )
            for query in np.unique(queries[found.column(QUERY_INDEX).to_numpy()]).tolist():
                holders[query].append(index)
        return holders, located

    def _read_many(
        self,
        snapshot: _Snapshot,
        entry: TagFile,
        keys: Sequence[EventKey],
        queries: list[int],
        attributed: set[int],
        rows: IntArray | None = None,
    ) -> list[tuple[int, _Record]]:
        """One file's records for ``queries`` (the ``attributed`` ones with attributes),
        as (query, record) pairs; ``rows``: their rows in its locations file, found and
        asked for already."""
        sidecar = self._sidecar(snapshot, entry)
        if sidecar is not None:
            return self._read_many_located(sidecar, entry, keys, queries, attributed, rows)
        columns = PICK_COLUMNS if attributed else REFERENCES
        table = self._reader(entry).get_many([keys[q] for q in queries], columns)
        answered = [queries[i] for i in table.column(QUERY_INDEX).to_pylist()]
        references = [_as_references(r) for r in table.column("references").to_pylist()]
        names = [c for c in columns if c not in EVENT_KEY and c != "references"]
        values = [table.column(c).to_pylist() for c in names]
        found: list[tuple[int, _Record]] = []
        seen: set[int] = set()
        for row, query in enumerate(answered):
            if query in seen:  # a key held twice in one file: its first row, as get() answers
                continue
            seen.add(query)
            attributes = (
                {name: column[row] for name, column in zip(names, values, strict=True)}
                if query in attributed
                else None
            )
            found.append((query, _Record(entry, references[row], attributes)))
        return found

    def _read_many_located(
        self,
        sidecar: LocationIndex,
        entry: TagFile,
        keys: Sequence[EventKey],
        queries: list[int],
        attributed: set[int],
        rows: IntArray | None = None,
    ) -> list[tuple[int, _Record]]:
        """``_read_many`` from a locations file: one vectorised find and gather (no find
        when the ``rows`` of the queries are known and their pages asked for)."""
        self._count("locations_reads")
        prefetched = rows is not None
        if rows is None:
            runs = np.fromiter((keys[q][0] for q in queries), dtype=np.uint32, count=len(queries))
            events = np.fromiter((keys[q][1] for q in queries), dtype=np.uint64, count=len(queries))
            rows = sidecar.find_many(runs, events)
        hit = np.flatnonzero(rows >= 0)
        answered = [queries[i] for i in hit.tolist()]
        references = sidecar.references_many(rows[hit], prefetched=prefetched)
        with_attributes = [i for i, q in enumerate(answered) if q in attributed]
        attributes: list[dict[str, Any] | None] = [None] * len(answered)
        if with_attributes:
            picked = sidecar.attributes_many(rows[hit][with_attributes])
            for i, values in zip(with_attributes, picked, strict=True):
                attributes[i] = values
        return [
            (query, _Record(entry, references[i], attributes[i]))
            for i, query in enumerate(answered)
        ]

    # -- files and ranges ------------------------------------------------------
    def events_in_file(self, guid: str) -> FileEvents | None:
        """Every event of the file with this GUID, with its position in the file;
        ``None`` if no committed file references the GUID.

        The dataset that owns the file (the one upstream of every dataset that
        references it) answers alone when it is indexed; otherwise every dataset
        referencing the GUID contributes (a skim knows only the events it kept).
        """
        entries = [e for e in self.catalog.files_with_guid(guid) if e.kind is FileKind.MASTER]
        if not entries:
            return None
        entries.sort(key=lambda e: (e.dataset, _key_of(e.key_min), e.file_id))
        snapshot = self._snapshot(entries[0].collection)
        names = sorted({e.dataset for e in entries})
        roots = [
            name
            for name in names
            if all(other == name or name in self._implied(snapshot, other) for other in names)
        ]
        matches: dict[str, _GuidMatches] = {}
        scanned: set[str] = set()
        if len(roots) == 1:
            owner = self._dataset(snapshot, roots[0])
            own = [e for e in entries if e.dataset == roots[0]]
            self._scan_guid(own, guid, matches)
            scanned.update(e.file_id for e in own)
            if owner is None or set(matches) != {owner.format}:
                matches.clear()  # the owner does not account for the file: ask everyone
                scanned.clear()
        if not matches:
            self._scan_guid([e for e in entries if e.file_id not in scanned], guid, matches)
        if not matches:
            return None
        fmt, found = max(matches.items(), key=lambda item: (len(item[1].events), item[0]))
        dataset = self._dataset(snapshot, found.dataset)
        owner = self._owner(snapshot, dataset, fmt) if dataset else None
        return FileEvents(
            guid=guid,
            format=fmt,
            dataset=owner.name if owner else "",
            processing_tag=owner.processing_tag if owner else "",
            events=sorted(found.events, key=lambda e: (e[2], e[0], e[1])),
        )

    def _scan_guid(
        self, entries: Sequence[TagFile], guid: str, matches: dict[str, _GuidMatches]
    ) -> None:
        """Add the (run, event, position) of every reference to ``guid`` in ``entries``."""
        columns = [*EVENT_KEY, "references"]
        for entry in entries:
            snapshot = self._snapshot(entry.collection)
            sidecar = self._sidecar(snapshot, entry)
            if sidecar is not None:
                # A scan of fixed-width codes in the locations file: nothing to decode.
                self._count("locations_reads")
                for fmt, run, event, position in sidecar.referencing(guid):
                    found = matches.get(fmt)
                    if found is None:
                        found = matches[fmt] = _GuidMatches(entry.dataset)
                    found.events.add((run, event, position))
                continue
            for piece in self._reader(entry).scan(columns=columns):
                table = piece.combine_chunks()
                references = table.column("references").chunk(0)
                flat = pc.list_flatten(references)
                hit = pc.equal(pc.struct_field(flat, "guid"), guid)
                if not pc.any(hit).as_py():
                    continue
                rows = pc.filter(pc.list_parent_indices(references), hit)
                runs = pc.take(table.column("run_number"), rows).to_pylist()
                events = pc.take(table.column("event_number"), rows).to_pylist()
                positions = pc.filter(pc.struct_field(flat, "position"), hit).to_pylist()
                formats = pc.filter(pc.struct_field(flat, "format"), hit).to_pylist()
                for fmt, run, event, position in zip(formats, runs, events, positions, strict=True):
                    found = matches.get(fmt)
                    if found is None:
                        found = matches[fmt] = _GuidMatches(entry.dataset)
                    found.events.add((run, event, position))

    def select(
        self,
        collection: str,
        *,
        run_min: int,
        run_max: int,
        dataset_pattern: str | None = None,
        columns: Sequence[str] | None = None,
        limit: int | None = None,
        rows_of: Callable[[TagFile], npt.NDArray[np.uint32]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Events of runs ``run_min..run_max`` as JSON-ready dicts, dataset by dataset in
        key order, at most ``limit`` of them; with ``rows_of``, only the rows of each master
        file it names (ascending ordinals, e.g. ``TriggerIndex.selection(...).rows``).

        Every row has ``dataset``, the key columns and ``columns`` (default: all);
        trigger masks come as lowercase hex strings, references as lists of dicts.
        Arguments are checked before this returns (``ValueError``, ``NotFoundError``),
        so a caller can refuse a bad request before it starts streaming.
        """
        low = _check_number("run_min", run_min, RUN_NUMBER_MAX)
        high = _check_number("run_max", run_max, RUN_NUMBER_MAX)
        if low > high:
            raise ValueError(f"run_min {low} is above run_max {high}")
        if limit is not None:
            _check_number("limit", limit, 2**63 - 1)
        wanted = select_columns(columns)
        snapshot = self._snapshot(collection)
        files = sorted(
            (
                f
                for f in snapshot.files
                if f.key_min[0] <= high
                and f.key_max[0] >= low
                and (dataset_pattern is None or fnmatch.fnmatchcase(f.dataset, dataset_pattern))
            ),
            key=lambda f: (f.dataset, _key_of(f.key_min), f.file_id),
        )
        return self._select(files, low, high, wanted, limit, rows_of)

    def _select(
        self,
        files: Sequence[TagFile],
        low: int,
        high: int,
        columns: list[str],
        limit: int | None,
        rows_of: Callable[[TagFile], npt.NDArray[np.uint32]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        remaining = limit
        if remaining == 0:
            return
        for entry in files:
            reader = self._reader(entry)
            pieces = (
                reader.scan((low,), (high,), columns)
                if rows_of is None
                else reader.take(rows_of(entry), columns)
            )
            for piece in pieces:
                table = piece if remaining is None else piece.slice(0, remaining)
                if remaining is not None:
                    remaining -= table.num_rows
                yield from json_rows(table, entry.dataset)
                if remaining is not None and remaining <= 0:
                    return

    # -- lifecycle ---------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters for a metrics endpoint (the key cache is the process-wide one)."""
        with self._lock:
            figures = dict(self._counts)
        figures["open_files"], figures["retired_files_open"] = self._files.counts()
        figures["open_locations_files"], _ = self._sidecar_files.counts()
        figures["collections_cached"] = len(self._snapshots)
        figures["key_cache_hits"] = DEFAULT_KEY_CACHE.hits
        figures["key_cache_misses"] = DEFAULT_KEY_CACHE.misses
        figures["key_cache_entries"] = len(DEFAULT_KEY_CACHE)
        figures["key_cache_bytes"] = DEFAULT_KEY_CACHE.nbytes
        return figures

    def close(self) -> None:
        """Close every open file; the Reader can be used again afterwards (it reopens)."""
        self._files.close()
        self._sidecar_files.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch answer is built.

    A lookup of 10,000 events makes hundreds of thousands of small acyclic objects
    (tuples, dicts, locations), and each allocation burst would trigger collections
    that scan the whole heap: a third of the lookup's CPU. Nothing made here forms a
    cycle, so reference counting frees it all the same. (If threads overlap, one may
    re-enable collection early; that costs time, never memory or correctness.)
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_pool() -> ThreadPoolExecutor:
    """Threads that decode the files of one pick side by side: one pool per process."""
    global _pool  # noqa: PLW0603 - made on first use, shared by every Reader
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="reader")
        return _pool


@dataclass
class _GuidMatches:
    """Events referencing one GUID with one format, and a dataset they were seen in."""

    dataset: str
    events: set[tuple[int, int, int]] = field(default_factory=set)


def select_columns(columns: Sequence[str] | None) -> list[str]:
    """The key columns, then ``columns`` (default: every event column) without repeats;
    ``ValueError`` naming unknown columns."""
    if columns is None:
        return list(EVENT_SCHEMA.names)
    if isinstance(columns, str):
        raise ValueError("columns must be a list of column names, not one string")
    unknown = [c for c in columns if c not in EVENT_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown columns {unknown}; an event has {EVENT_SCHEMA.names}")
    return list(dict.fromkeys([*EVENT_KEY, *columns]))


def json_rows(table: pa.Table, dataset: str) -> Iterator[dict[str, Any]]:
    """Rows of ``table`` as dicts that ``json.dumps`` takes: binary values as lowercase hex."""
    names = table.column_names
    values = []
    for name in names:
        column = table.column(name)
        data = column.to_pylist()
        if any(is_type(column.type) for is_type in _BINARY_TYPES):
            data = [None if v is None else v.hex() for v in data]
        values.append(data)
    for row in zip(*values, strict=True):
        yield {"dataset": dataset, **dict(zip(names, row, strict=True))}
