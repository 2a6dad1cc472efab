"""Extension columns (the Extender's vertical parts) of picked events.

An extension file holds, for one master file, the master's key columns in the
master's row order plus columns computed elsewhere (``eventindex spark
extend``); its catalog entry names the master (attribute ``master``) and the
part (``TagFile.part``). It is itself a map-file keyed like the master, so the
columns of one event are a key lookup in the extension files whose key range
holds it: the master file is not read again.

Only parts whose master is live count: when compaction retires a master, its
extension files are retired with it in the same catalog step, and the
compacted file's parts take over. ``Extensions.extend`` adds the columns to
picked events as ``attributes["extensions"] = {dataset: {column: value}}``;
binary values come as lowercase hex, as the rest of a pick's JSON does.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog.base import Catalog
from catalog.model import FileKind, TagFile
from eventindex.errors import EventIndexError
from eventindex.query.open_files import OpenFiles
from eventindex.records.schema import EVENT_KEY, EVENT_SCHEMA
from eventindex.storage import QUERY_INDEX
from eventindex.storage.keys import EncodedKeys, encode_key_columns, encode_query_keys
from eventindex.storage.mapfile import key_dtypes

logger = logging.getLogger(__name__)

MASTER_ATTRIBUTE = "master"
EXTENSIONS = "extensions"  # the attribute of a picked event that holds the columns
EventKey = tuple[int, int]
Columns = dict[str, dict[str, Any]]  # dataset -> column -> value
if TYPE_CHECKING:
    from eventindex.query.reader import PickedEvent

_KEY_DTYPES = key_dtypes(EVENT_SCHEMA, EVENT_KEY)
_BINARY_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)


def live_extensions(catalog: Catalog, collection: str | None = None) -> list[TagFile]:
    """Committed extension files whose master file is committed too."""
    extensions = catalog.list_tagfiles(collection=collection, kinds=[FileKind.EXTENSION])
    if not extensions:  # the common case: no master list needed
        return []
    masters = catalog.list_tagfiles(collection=collection, kinds=[FileKind.MASTER])
    live = {e.file_id for e in masters}
    return [e for e in extensions if e.attributes.get(MASTER_ATTRIBUTE) in live]


@dataclass
class _Parts:
    """The live extension files of one collection, sorted by first key, as listed when
    the catalog's change token was ``token``."""

    loaded_at: float
    files: list[TagFile]
    token: Hashable = None
    starts: EncodedKeys = field(init=False)
    ends: EncodedKeys = field(init=False)

    def __post_init__(self) -> None:
        self.files.sort(key=lambda e: (tuple(e.key_min), e.dataset, e.part, e.file_id))
        self.starts = encode_query_keys([tuple(e.key_min) for e in self.files], _KEY_DTYPES)
        self.ends = encode_query_keys([tuple(e.key_max) for e in self.files], _KEY_DTYPES)


def _json_values(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    values: list[Any] = column.to_pylist()
    if any(is_type(column.type) for is_type in _BINARY_TYPES):
        return [None if v is None else v.hex() for v in values]
    return values


class Extensions:
    """Looks up the extension columns of events; thread-safe, one per query engine.

    The list of live extension files of a collection is re-read from the
    catalog when it is older than ``refresh_seconds`` and the catalog's change
    token says the catalog changed since; open readers are shared
    through ``files`` (the Reader's pool) or a pool of its own.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        refresh_seconds: float = 1.0,
        files: OpenFiles | None = None,
    ) -> None:
        self.catalog = catalog
        self.refresh_seconds = refresh_seconds
        self._files = files if files is not None else OpenFiles(256)
        self._parts: dict[str, _Parts] = {}
        self._lock = threading.Lock()

    def _snapshot(self, collection: str) -> _Parts:
        with self._lock:
            parts = self._parts.get(collection)
            if parts is None or time.monotonic() - parts.loaded_at >= self.refresh_seconds:
                previous = parts.files if parts else []
                token: Hashable = None
                try:
                    token = self.catalog.change_token()
                    if parts is not None and token == parts.token:
                        parts.loaded_at = time.monotonic()
                        return parts
                    files = live_extensions(self.catalog, collection)
                except EventIndexError as exc:
                    # A catalog outage must not fail picks: keep the list known (if any)
                    # and try again one refresh period later.
                    logger.warning("keeping the extension list of %s: %s", collection, exc)
                    files, token = list(previous), None
                parts = _Parts(time.monotonic(), files, token)
                self._parts[collection] = parts
                self._files.drop({e.file_id for e in previous} - {e.file_id for e in files})
        return parts

    def reload(self, collection: str, token: Hashable) -> None:
        """List the live extension files of ``collection`` unless the catalog is unchanged
        (``token``, read before) since the list known. For an owner that refreshes in the
        background (the Reader), so that lookups never wait for a listing; errors propagate.
        """
        parts = self._parts.get(collection)
        if parts is not None and parts.token == token:
            parts.loaded_at = time.monotonic()
            return
        files = live_extensions(self.catalog, collection)
        with self._lock:
            previous = self._parts.get(collection)
            self._parts[collection] = _Parts(time.monotonic(), files, token)
            if previous is not None:
                self._files.drop({e.file_id for e in previous.files} - {e.file_id for e in files})

    def refresh(self) -> None:
        """Forget the file lists, so the next lookup re-reads the catalog."""
        with self._lock:
            self._parts.clear()

    def columns(
        self,
        collection: str,
        keys: Sequence[EventKey],
        *,
        dataset_pattern: str | None = None,
    ) -> list[Columns]:
        """For every key, ``{dataset: {column: value}}`` from the live extension files
        that hold it (empty when none does). Each file is asked once for all its keys."""
        found: list[Columns] = [{} for _ in keys]
        if not keys:
            return found
        parts = self._snapshot(collection)
        if not parts.files:
            return found
        runs = np.fromiter((k[0] for k in keys), dtype=np.uint32, count=len(keys))
        events = np.fromiter((k[1] for k in keys), dtype=np.uint64, count=len(keys))
        encoded = encode_key_columns([runs, events])
        order = np.argsort(encoded, kind="stable")
        ordered = encoded[order]
        low = np.searchsorted(ordered, parts.starts, side="left")
        high = np.searchsorted(ordered, parts.ends, side="right")
        for index in np.flatnonzero(high > low).tolist():
            entry = parts.files[index]
            if dataset_pattern is not None and not fnmatch.fnmatchcase(
                entry.dataset, dataset_pattern
            ):
                continue
            queries = order[low[index] : high[index]].tolist()
            reader = self._files.reader(entry)
            names = [c for c in reader.schema.names if c not in EVENT_KEY]
            table = reader.get_many([keys[q] for q in queries], names)
            answered = table.column(QUERY_INDEX).to_pylist()
            values = [_json_values(table.column(name)) for name in names]
            for row, position in enumerate(answered):
                query = queries[position]
                into = found[query].setdefault(entry.dataset, {})
                for name, column in zip(names, values, strict=True):
                    # A key held twice answers with its first row, as a pick does.
                    into.setdefault(name, column[row])
        return found

    def extend(
        self,
        collection: str,
        events: Sequence[PickedEvent | None],
        *,
        dataset_pattern: str | None = None,
    ) -> list[PickedEvent | None]:
        """Picked events (``PickedEvent`` or ``None``) with their extension columns added
        as ``attributes["extensions"]``; events without any are returned unchanged."""
        present = [(i, e) for i, e in enumerate(events) if e is not None]
        keys = [(e.run_number, e.event_number) for _, e in present]
        columns = self.columns(collection, keys, dataset_pattern=dataset_pattern)
        result = list(events)
        for (position, event), extra in zip(present, columns, strict=True):
            if extra:
                result[position] = replace(
                    event, attributes={**event.attributes, EXTENSIONS: extra}
                )
        return result

    def close(self) -> None:
        self._files.close()
