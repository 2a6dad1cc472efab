"""HBase catalog through happybase (Thrift): one row per TagFile, row keys shaped for our scans.

Only the part of happybase's API that ``happybase_mock`` also has is used
(``Connection.table/tables/create_table/delete_table``, ``Table.row/rows/scan/
put/delete/batch/counter_inc``), so the same code runs against a real Thrift
server and the mock. happybase is imported lazily, by ``HBaseCatalog.connect``.

Tables (names start with ``table_prefix``). Key parts are joined with NUL, so
names and ids must not contain NUL; numbers in keys are fixed-width hex, so
byte order is numeric order:

======================  ========================================  ==============================
table                   row key                                   columns
======================  ========================================  ==============================
collections             name                                      m:doc (JSON)
datasets                name                                      m:doc
collection_datasets     collection NUL dataset                    m:x (prefix scan: datasets of
                                                                  a collection)
tagfiles                dataset NUL file_id                       m:doc (JSON of the immutable
                                                                  fields), s:state,
                                                                  s:committed_at, s:retired_at
                                                                  (prefix scan: files of a
                                                                  dataset)
tagfile_by_id           file_id                                   m:row (the tagfiles row key)
keyrange                collection NUL hex(k0_min) NUL file_id    m:k0_max, m:dataset (range
                                                                  scan: files whose first key
                                                                  component starts <= hi)
superseded              superseded file_id                        f:<superseding file_id> = the
                                                                  time its commit began
holdings                file_id                                   g:<guid>, i:<message id> (own
                                                                  and inherited from the files it
                                                                  supersedes)
guids                   guid                                      f:<file_id>
messages                message_id                                f:<file_id>
menus                   hex(key) NUL level                        m:doc
changes                 ``catalog``                               c:writes (a counter: the
                                                                  change token)
======================  ========================================  ==============================

``hex(k0)`` is ``k0 + 2**63`` in 17 hex digits, so signed int64 object ids and
uint64 values both sort correctly.

HBase is atomic per row only, so each entity has one authoritative row (a
TagFile's ``tagfiles`` row) and every index row is written *before* it and read
as a mere candidate that is checked against the authoritative row. A crash
leaves at worst index cells that point at nothing or at a file still being
written, and readers skip those. ``commit_tagfile`` writes the index rows, then
the file's row with state ``committed`` and its ``supersedes`` list in ONE put
(the commit point), then marks the superseded rows retired (with the commit
time as ``s:retired_at``). Until that last step finishes, readers treat a
committed file superseded by a committed file as retired, so nobody sees both.
Rows written before ``s:retired_at`` existed simply lack it (``retired_at`` is
``None``; ``catalog gc`` stamps such entries before it counts their grace time).

Two jobs replacing one file (two compactions of a dataset at once): a commit
must not supersede a file that is already retired. There is no check-and-put in
happybase, so the check is a protocol: each commit first writes its intent,
the cell ``superseded[old] f:<new> = start time``, then reads every intent on
the files it supersedes, and refuses (``SupersededError``) if another file
already committed over one of them, or another commit's intent is younger than
``INTENT_SECONDS`` (a commit in flight; a refused commit deletes its intents).
Per-row reads and writes are linearisable, so of two overlapping commits at
least one sees the other's intent: at worst both are refused, never both made.
The residual window: a commit that stalls for more than ``INTENT_SECONDS``
between its check and its commit point (it refuses itself if the stall came
before its last clock check, but not after), while a rival, seeing a stale
intent, goes ahead; and writers of older versions, which write no intent. If
both do commit, readers apply one deterministic rule: of the committed files
that supersede a common file, the one committed first (``committed_at``, then
file id) keeps its commit; the later one reads as retired (``retired_at`` = its
own commit time) and supersedes nothing, so each record is live exactly once.
The later commit also marks nothing retired if it sees the other one (if the
other lands after that check, files only the later one superseded stay marked
retired and their records unlisted until an operator re-commits them); its
extension files, committed with it, stay committed, and ``catalog verify``
reports them (their master is not committed).

The change token (``Catalog.change_token``) is the counter ``changes[catalog]
c:writes``, read with one get. Every writing operation increments it (an atomic
``counter_inc``, so writers in several processes never lose a count) AFTER its
writes, also when it failed part-way, so a reader that sees the new value lists
what was written. A writer killed between its writes and the increment leaves
its change unannounced until the next write; ``Reader.refresh`` (or the
service's ``/v1/admin/refresh``) forces a listing meanwhile.

Other limits of HBase through Thrift: two processes committing the same file
id, or creating the same collection, at the same moment are not serialised
(file ids are unique per writer); and a row deleted and re-created within the
same millisecond can stay hidden behind the delete marker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from typing import Any, Protocol

import orjson

from catalog.base import Catalog
from catalog.model import Collection, Dataset, FileKind, FileState, TagFile
from catalog.rules import (
    SupersededError,
    check_batch,
    check_batch_supersedes,
    check_supersedes_live,
    check_tagfile,
    in_first_key_range,
    listing_order,
)
from eventindex.config import HBaseSettings
from eventindex.errors import AlreadyExistsError, CatalogError, MissingExtraError, NotFoundError
from eventindex.records.schema import RecordKind, TriggerMenu

SEP = "\x00"
_K0_OFFSET = 2**63
_K0_LIMIT = 2**64  # first key components must lie in [-2**63, 2**64)
_MULTI_GET = 1000  # rows per Thrift multi-get
_BATCH = 1000  # mutations per Thrift batch
# A commit's intent on the files it supersedes counts this long; a younger one
# of another commit refuses ours (see the module doc).
INTENT_SECONDS = 300.0

# table -> column families; every family keeps one version (no history needed).
TABLES: dict[str, tuple[str, ...]] = {
    "collections": ("m",),
    "datasets": ("m",),
    "collection_datasets": ("m",),
    "tagfiles": ("m", "s"),
    "tagfile_by_id": ("m",),
    "keyrange": ("m",),
    "superseded": ("f",),
    "holdings": ("g", "i"),
    "guids": ("f",),
    "messages": ("f",),
    "menus": ("m",),
    "changes": ("c",),
}

_DOC = b"m:doc"
_STATE = b"s:state"
_COMMITTED_AT = b"s:committed_at"
_RETIRED_AT = b"s:retired_at"
_ROW = b"m:row"
_K0_MAX = b"m:k0_max"
_DATASET = b"m:dataset"
_MARK = b"m:x"
_CHANGES_ROW = b"catalog"
_WRITES = b"c:writes"

Cells = dict[bytes, bytes]


class HBaseBatch(Protocol):
    def put(self, row: bytes, data: Mapping[bytes, bytes]) -> None: ...

    def delete(self, row: bytes, columns: Sequence[bytes] | None = None) -> None: ...

    def send(self) -> None: ...


class HBaseTable(Protocol):
    """The subset of ``happybase.Table`` that ``happybase_mock.Table`` also provides."""

    def row(self, row: bytes, columns: Sequence[bytes] | None = None) -> Cells: ...

    def rows(
        self, rows: Sequence[bytes], columns: Sequence[bytes] | None = None
    ) -> list[tuple[bytes, Cells]]: ...

    def scan(
        self,
        row_start: bytes | None = None,
        row_stop: bytes | None = None,
        row_prefix: bytes | None = None,
    ) -> Iterable[tuple[bytes, Cells]]: ...

    def put(self, row: bytes, data: Mapping[bytes, bytes]) -> None: ...

    def delete(self, row: bytes, columns: Sequence[bytes] | None = None) -> None: ...

    def batch(self, timestamp: int | None = None, batch_size: int | None = None) -> HBaseBatch: ...

    # happybase returns the new value, happybase_mock None.
    def counter_inc(self, row: bytes, column: bytes, value: int = 1) -> int | None: ...


class HBaseConnection(Protocol):
    """The subset of ``happybase.Connection`` that ``happybase_mock.Connection`` also provides."""

    def table(self, name: str) -> HBaseTable: ...

    # happybase returns bytes names, happybase_mock str names.
    def tables(self) -> list[Any]: ...

    def create_table(self, name: str, families: dict[str, dict[str, Any]]) -> None: ...

    def delete_table(self, name: str, disable: bool = False) -> None: ...

    def close(self) -> None: ...


def _driver_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of the Thrift stack: sockets (OSError) and thriftpy2's TException tree."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from thriftpy2.thrift import TException
    except ImportError:
        pass
    else:
        errors.append(TException)
    return tuple(errors)


def _key(*parts: str) -> bytes:
    for part in parts:
        if SEP in part:
            raise CatalogError(f"names and ids must not contain NUL: {part!r}")
    return SEP.join(parts).encode()


def _k0(value: int) -> str:
    if not -_K0_OFFSET <= value < _K0_LIMIT:
        raise CatalogError(f"first key component {value} is outside [-2**63, 2**64)")
    return f"{value + _K0_OFFSET:017x}"


def _from_k0(text: str) -> int:
    return int(text, 16) - _K0_OFFSET


def _json(value: object) -> bytes:
    return orjson.dumps(value)


def _qualifiers(cells: Mapping[bytes, bytes], family: bytes) -> list[str]:
    prefix = family + b":"
    return [column[len(prefix) :].decode() for column in cells if column.startswith(prefix)]


def _check_row_keys(tagfile: TagFile) -> None:
    """The entry's names must make valid row keys (no NUL bytes)."""
    _key(tagfile.dataset, tagfile.file_id, tagfile.collection)


def _check_tagfile(tagfile: TagFile) -> None:
    """The shared rules, plus: the row keys must be buildable."""
    check_tagfile(tagfile)
    _check_row_keys(tagfile)


class HBaseCatalog(Catalog):
    """The catalog in HBase tables, through a happybase(-compatible) connection.

    ``connection`` is a ``happybase.Connection`` or a ``happybase_mock.Connection``;
    missing tables are created. ``owns_connection`` says whether ``close`` closes it.
    """

    def __init__(
        self,
        connection: HBaseConnection,
        *,
        table_prefix: str = "eventindex_",
        owns_connection: bool = False,
    ) -> None:
        self.table_prefix = table_prefix
        self._connection = connection
        self._owns_connection = owns_connection
        self._errors = _driver_errors()
        # happybase connections are not thread-safe; one lock serialises all calls.
        self._lock = threading.RLock()
        self._closed = False
        with self._translated():
            self._create_missing_tables()
            self._tables = {name: connection.table(table_prefix + name) for name in TABLES}

    @classmethod
    def connect(
        cls,
        host: str = "localhost",
        port: int = 9090,
        *,
        table_prefix: str = "eventindex_",
        timeout_ms: int = 10_000,
    ) -> HBaseCatalog:
        """Open a Thrift connection with happybase; ``MissingExtraError`` without it."""
        try:
            import happybase
        except ImportError as exc:
            raise MissingExtraError("happybase", "hbase", "the HBase catalog") from exc
        errors = _driver_errors()
        try:
            # Positional arguments: happybase_mock's singleton metaclass rejects
            # keywords other than host/port/table_prefix.
            connection = happybase.Connection(host, port, timeout_ms)
        except errors as exc:
            raise CatalogError(
                f"cannot reach the HBase Thrift server {host}:{port}: {exc}"
            ) from exc
        try:
            return cls(connection, table_prefix=table_prefix, owns_connection=True)
        except BaseException:
            connection.close()
            raise

    @classmethod
    def from_settings(cls, settings: HBaseSettings) -> HBaseCatalog:
        """The catalog that ``[catalog.hbase]`` settings describe."""
        return cls.connect(
            settings.host,
            settings.port,
            table_prefix=settings.table_prefix,
            timeout_ms=settings.timeout_ms,
        )

    # -- plumbing ------------------------------------------------------------
    def _existing_tables(self) -> set[str]:
        return {n.decode() if isinstance(n, bytes) else str(n) for n in self._connection.tables()}

    def _create_missing_tables(self) -> None:
        existing = self._existing_tables()
        for name, families in TABLES.items():
            full = self.table_prefix + name
            if full in existing:
                continue
            try:
                self._connection.create_table(full, {f: {"max_versions": 1} for f in families})
            except self._errors:
                # Another process may have created it since we listed the tables.
                if full not in self._existing_tables():
                    raise

    def drop_tables(self) -> None:
        """Delete every table of this catalog (tests, decommissioning); then close it."""
        with self._op():
            existing = self._existing_tables()
            for name in TABLES:
                if self.table_prefix + name in existing:
                    self._connection.delete_table(self.table_prefix + name, disable=True)
        self.close()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise CatalogError(f"HBase catalog: {type(exc).__name__}: {exc}") from exc

    @contextmanager
    def _op(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise CatalogError("the HBase catalog is closed")
            with self._translated():
                yield

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Around the writes of one operation (inside ``_op``): count a change after
        them, also when they failed part-way, since what was written may show."""
        try:
            yield
        except BaseException:
            # Best effort: the operation's own error is the one to report.
            with suppress(*self._errors):
                self._count_change()
            raise
        self._count_change()

    def _count_change(self) -> None:
        self._tables["changes"].counter_inc(_CHANGES_ROW, _WRITES)

    def _get(self, table: str, row: bytes, columns: Sequence[bytes] | None = None) -> Cells:
        return dict(self._tables[table].row(row, columns=columns) or {})

    def _multi(
        self, table: str, rows: Iterable[bytes], columns: Sequence[bytes] | None = None
    ) -> dict[bytes, Cells]:
        """Rows that exist, by key (happybase_mock also returns empty rows; drop them)."""
        keys = list(dict.fromkeys(rows))
        found: dict[bytes, Cells] = {}
        for start in range(0, len(keys), _MULTI_GET):
            chunk = keys[start : start + _MULTI_GET]
            for key, cells in self._tables[table].rows(chunk, columns=columns):
                if cells:
                    found[key] = dict(cells)
        return found

    def _scan(self, table: str, **kwargs: bytes) -> list[tuple[bytes, Cells]]:
        return [(key, cells) for key, cells in self._tables[table].scan(**kwargs) if cells]

    def _put_many(self, table: str, rows: Iterable[tuple[bytes, Mapping[bytes, bytes]]]) -> None:
        batch = self._tables[table].batch(batch_size=_BATCH)
        for key, cells in rows:
            batch.put(key, cells)
        batch.send()

    def _delete_present(self, table: str, rows: Iterable[bytes], column: bytes) -> None:
        """Delete one column from rows that have it (happybase_mock fails on absent ones)."""
        present = self._multi(table, rows, columns=[column])
        batch = self._tables[table].batch(batch_size=_BATCH)
        for key, cells in present.items():
            if column in cells:
                batch.delete(key, columns=[column])
        batch.send()

    # -- collections ---------------------------------------------------------
    def create_collection(self, collection: Collection) -> None:
        key = _key(collection.name)
        with self._op():
            if self._get("collections", key):
                raise AlreadyExistsError(f"collection {collection.name!r} already exists")
            doc = {
                "name": collection.name,
                "kind": collection.kind.value,
                "description": collection.description,
                "created_at": collection.created_at,
            }
            with self._changing():
                self._tables["collections"].put(key, {_DOC: _json(doc)})

    def get_collection(self, name: str) -> Collection:
        with self._op():
            return self._collection(name)

    def _collection(self, name: str) -> Collection:
        cells = self._get("collections", _key(name))
        if _DOC not in cells:
            raise NotFoundError(f"no collection {name!r}")
        return _collection_from(cells)

    def list_collections(self) -> list[Collection]:
        with self._op():
            rows = self._scan("collections")
        return sorted(
            (_collection_from(cells) for _, cells in rows if _DOC in cells), key=lambda c: c.name
        )

    # -- datasets ------------------------------------------------------------
    def create_dataset(self, dataset: Dataset) -> None:
        key = _key(dataset.name)
        with self._op():
            self._collection(dataset.collection)
            if self._get("datasets", key):
                raise AlreadyExistsError(f"dataset {dataset.name!r} already exists")
            doc = {
                "name": dataset.name,
                "collection": dataset.collection,
                "format": dataset.format,
                "processing_tag": dataset.processing_tag,
                "project": dataset.project,
                "stream": dataset.stream,
                "upstream": dataset.upstream,
                "attributes": dataset.attributes,
                "created_at": dataset.created_at,
            }
            # Index row first: the dataset row is what makes the dataset exist.
            with self._changing():
                self._tables["collection_datasets"].put(
                    _key(dataset.collection, dataset.name), {_MARK: b""}
                )
                self._tables["datasets"].put(key, {_DOC: _json(doc)})

    def get_dataset(self, name: str) -> Dataset:
        with self._op():
            return self._dataset(name)

    def _dataset(self, name: str) -> Dataset:
        cells = self._get("datasets", _key(name))
        if _DOC not in cells:
            raise NotFoundError(f"no dataset {name!r}")
        return _dataset_from(cells)

    def list_datasets(self, collection: str | None = None) -> list[Dataset]:
        """Datasets sorted by name; ``NotFoundError`` if the named collection is unknown."""
        with self._op():
            if collection is None:
                rows = self._scan("datasets")
                found = [_dataset_from(cells) for _, cells in rows if _DOC in cells]
            else:
                found = self._datasets_of(collection)
        return sorted(found, key=lambda d: d.name)

    def _datasets_of(self, collection: str) -> list[Dataset]:
        self._collection(collection)
        prefix = _key(collection) + SEP.encode()
        names = [
            key[len(prefix) :] for key, _ in self._scan("collection_datasets", row_prefix=prefix)
        ]
        datasets = [_dataset_from(c) for c in self._multi("datasets", names).values() if _DOC in c]
        return [d for d in datasets if d.collection == collection]

    def _require_datasets(self, tagfiles: Sequence[TagFile]) -> None:
        collections: dict[str, str] = {}
        for tagfile in tagfiles:
            if tagfile.dataset not in collections:
                collections[tagfile.dataset] = self._dataset(tagfile.dataset).collection
            if collections[tagfile.dataset] != tagfile.collection:
                raise CatalogError(
                    f"TagFile {tagfile.file_id}: dataset {tagfile.dataset!r} belongs to "
                    f"collection {collections[tagfile.dataset]!r}, not {tagfile.collection!r}"
                )

    # -- TagFiles: reading ---------------------------------------------------
    def _stored(self, file_ids: Iterable[str]) -> dict[str, TagFile]:
        """Entries as their rows say (no supersession rule), by file id."""
        ids = [i for i in dict.fromkeys(file_ids) if SEP not in i]
        pointers = self._multi("tagfile_by_id", (i.encode() for i in ids), columns=[_ROW])
        rows = self._multi("tagfiles", (c[_ROW] for c in pointers.values() if _ROW in c))
        found: dict[str, TagFile] = {}
        for cells in rows.values():
            if _DOC in cells:
                tagfile = _tagfile_from(cells)
                found[tagfile.file_id] = tagfile
        return found

    def _successors(self, file_ids: Iterable[str]) -> dict[str, list[str]]:
        """File ids that recorded an intent to supersede each file (candidates only)."""
        links = self._multi("superseded", (i.encode() for i in file_ids))
        return {key.decode(): _qualifiers(cells, b"f") for key, cells in links.items()}

    def _effective(self, tagfiles: Sequence[TagFile]) -> list[TagFile]:
        """Apply the rule that a committed file superseded by a committed file is retired
        (since that file's commit), and the double-commit rule of the module doc."""
        committed = [t for t in tagfiles if t.state is FileState.COMMITTED]
        successors = self._successors(t.file_id for t in committed)
        known = {t.file_id: t for t in tagfiles}
        unknown = {s for names in successors.values() for s in names if s not in known}
        known.update(self._stored(unknown))
        taken_by: dict[str, list[TagFile]] = {}
        for old, names in successors.items():
            for name in names:
                new = known.get(name)
                if new is not None and new.state is FileState.COMMITTED and old in new.supersedes:
                    taken_by.setdefault(old, []).append(new)
        judged = {t.file_id: t for t in committed if t.supersedes}
        judged.update({new.file_id: new for news in taken_by.values() for new in news})
        void = self._void(list(judged.values()))
        found: list[TagFile] = []
        for tagfile in tagfiles:
            if tagfile.state is not FileState.COMMITTED:
                found.append(tagfile)
            elif tagfile.file_id in void:
                found.append(
                    replace(tagfile, state=FileState.RETIRED, retired_at=_commit_order(tagfile)[0])
                )
            elif times := [
                _commit_order(new)[0]
                for new in taken_by.get(tagfile.file_id, [])
                if new.file_id not in void
            ]:
                found.append(replace(tagfile, state=FileState.RETIRED, retired_at=min(times)))
            else:
                found.append(tagfile)
        return found

    def _void(self, tagfiles: Sequence[TagFile]) -> set[str]:
        """The committed files that lost a double commit: another committed (or since
        retired) file supersedes one of the same files and was committed first."""
        successors = self._successors({old for t in tagfiles for old in t.supersedes})
        known = {t.file_id: t for t in tagfiles}
        rivals = {s for names in successors.values() for s in names if s not in known}
        known.update(self._stored(rivals))
        void: set[str] = set()
        for tagfile in tagfiles:
            for old in tagfile.supersedes:
                for name in successors.get(old, ()):
                    rival = known.get(name)
                    if (
                        rival is not None
                        and name != tagfile.file_id
                        and rival.state is not FileState.WRITING
                        and old in rival.supersedes
                        and _commit_order(rival) < _commit_order(tagfile)
                    ):
                        void.add(tagfile.file_id)
        return void

    def get_tagfile(self, file_id: str) -> TagFile:
        with self._op():
            return self._one(file_id)

    def _one(self, file_id: str) -> TagFile:
        found = self._stored([file_id]).get(file_id)
        if found is None:
            raise NotFoundError(f"no TagFile {file_id}")
        return self._effective([found])[0]

    def list_tagfiles(
        self,
        *,
        dataset: str | None = None,
        collection: str | None = None,
        kinds: Iterable[FileKind] | None = None,
        states: Iterable[FileState] | None = (FileState.COMMITTED,),
        first_key_range: tuple[int, int] | None = None,
    ) -> list[TagFile]:
        """See ``Catalog.list_tagfiles``; a named dataset or collection must exist."""
        kind_set = None if kinds is None else {FileKind(k) for k in kinds}
        state_set = None if states is None else {FileState(s) for s in states}
        with self._op():
            candidates = self._candidates(dataset, collection, first_key_range)
            found = [
                t
                for t in self._effective(candidates)
                if (dataset is None or t.dataset == dataset)
                and (collection is None or t.collection == collection)
                and (kind_set is None or t.kind in kind_set)
                and (state_set is None or t.state in state_set)
                and (first_key_range is None or in_first_key_range(t, *first_key_range))
            ]
        return sorted(found, key=listing_order)

    def _candidates(
        self, dataset: str | None, collection: str | None, first_key_range: tuple[int, int] | None
    ) -> list[TagFile]:
        """Entries that may match, read through the cheapest row-key scan."""
        collections: list[str] | None = None
        datasets: list[str] | None = None
        if dataset is not None:
            owner = self._dataset(dataset).collection
            if collection is not None:
                self._collection(collection)
                if owner != collection:
                    return []
            collections, datasets = [owner], [dataset]
        elif collection is not None:
            collections = [collection]
            if first_key_range is None:
                datasets = [d.name for d in self._datasets_of(collection)]
            else:
                self._collection(collection)
        if first_key_range is not None:
            lo, hi = first_key_range
            if lo > hi:
                return []
            if collections is None:
                collections = [key.decode() for key, _ in self._scan("collections")]
            return self._by_key_range(collections, lo, hi)
        if datasets is None:
            rows = self._scan("tagfiles")
        else:
            rows = []
            for name in datasets:
                rows.extend(self._scan("tagfiles", row_prefix=_key(name) + SEP.encode()))
        return [_tagfile_from(cells) for _, cells in rows if _DOC in cells]

    def _by_key_range(self, collections: Sequence[str], lo: int, hi: int) -> list[TagFile]:
        row_keys: list[bytes] = []
        hi_hex = _k0(min(max(hi, -_K0_OFFSET), _K0_LIMIT - 1))
        lo_clamped = max(lo, -_K0_OFFSET)
        for name in collections:
            start = _key(name) + SEP.encode()
            # Rows whose k0_min <= hi: everything up to "<hex(hi)>\x01", since
            # "\x00" follows the hex in every key.
            stop = start + hi_hex.encode() + b"\x01"
            for key, cells in self._scan("keyrange", row_start=start, row_stop=stop):
                if _K0_MAX not in cells or _from_k0(cells[_K0_MAX].decode()) < lo_clamped:
                    continue
                file_id = key.rsplit(SEP.encode(), 1)[1].decode()
                row_keys.append(_key(cells[_DATASET].decode(), file_id))
        # Index rows may be stale (a commit that moved the range); the rows decide.
        return [_tagfile_from(c) for c in self._multi("tagfiles", row_keys).values() if _DOC in c]

    def files_with_guid(self, guid: str) -> list[TagFile]:
        with self._op():
            owners = _qualifiers(self._get("guids", guid.encode()), b"f")
            stored = list(self._stored(owners).values())
            found = [t for t in self._effective(stored) if t.state is FileState.COMMITTED]
        return sorted(found, key=listing_order)

    def absorbed_message_ids(self, message_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(message_ids))
        with self._op():
            rows = self._multi("messages", (i.encode() for i in ids))
            owners = {key.decode(): _qualifiers(cells, b"f") for key, cells in rows.items()}
            stored = self._stored(o for names in owners.values() for o in names)
        # Stored state, not the supersession rule: a committed file's records are
        # absorbed whether or not a compacted file has replaced it yet.
        committed = {i for i, t in stored.items() if t.state is FileState.COMMITTED}
        return {m for m, names in owners.items() if committed.intersection(names)}

    # -- TagFiles: writing ---------------------------------------------------
    def add_tagfiles(self, tagfiles: Sequence[TagFile]) -> None:
        """Register a batch; validated as a whole before anything is written.

        HBase has no multi-row transactions: if the server fails mid-batch some
        entries may be registered (as crash debris in state ``writing``).
        A committed entry is indexed and retires what it supersedes, as
        ``commit_tagfile`` does; it may supersede files registered earlier or
        earlier in the same batch.
        """
        tagfiles = list(tagfiles)
        ids = check_batch(tagfiles)
        for tagfile in tagfiles:
            _check_row_keys(tagfile)
        with self._op():
            self._require_datasets(tagfiles)
            taken = self._stored(ids)
            if taken:
                raise AlreadyExistsError(f"file ids already registered: {', '.join(sorted(taken))}")
            superseded = {s for t in tagfiles for s in t.supersedes}
            check_batch_supersedes(tagfiles, set(self._stored(superseded)))
            plain = [t for t in tagfiles if t.state is not FileState.COMMITTED]
            with self._changing():
                self._write_index(plain)
                self._put_many("tagfiles", ((_tagfile_key(t), _tagfile_cells(t)) for t in plain))
                for tagfile in tagfiles:
                    if tagfile.state is FileState.COMMITTED:
                        self._apply(tagfile, None, *self._prepare(tagfile))

    def _write_index(self, tagfiles: Sequence[TagFile]) -> None:
        self._put_many(
            "tagfile_by_id", ((t.file_id.encode(), {_ROW: _tagfile_key(t)}) for t in tagfiles)
        )
        self._put_many(
            "keyrange",
            (
                (
                    _keyrange_key(t),
                    {_K0_MAX: _k0(t.key_max[0]).encode(), _DATASET: t.dataset.encode()},
                )
                for t in tagfiles
                if t.key_min
            ),
        )

    def _prepare(self, entry: TagFile) -> tuple[dict[str, TagFile], float]:
        """Before a commit point: record this commit's intent on every file it supersedes,
        then check that none is retired or being superseded by another commit.
        Returns the superseded entries and when the intent was written."""
        olds = self._stored(entry.supersedes)
        missing = sorted(set(entry.supersedes) - set(olds))
        if missing:
            raise NotFoundError(f"TagFile {entry.file_id} supersedes unknown files: {missing}")
        started = time.time()
        if not olds:
            return olds, started
        column = b"f:" + entry.file_id.encode()
        self._put_many("superseded", ((o.encode(), {column: repr(started).encode()}) for o in olds))
        try:
            states = {t.file_id: t.state for t in self._effective(list(olds.values()))}
            check_supersedes_live(entry, states)
            self._check_rivals(entry, started)
        except BaseException:
            self._release(entry, olds)
            raise
        return olds, started

    def _check_rivals(self, entry: TagFile, started: float) -> None:
        """Refuse if another file committed over, or is committing over, what ``entry``
        supersedes (its intent is on the same rows)."""
        successors = self._successors(entry.supersedes)
        names = {n for ns in successors.values() for n in ns if n != entry.file_id}
        rivals = self._stored(names)
        for old, found in sorted(successors.items()):
            for name in found:
                if name == entry.file_id:
                    continue
                rival = rivals.get(name)
                if rival is not None and rival.state is not FileState.WRITING:
                    if old in rival.supersedes:
                        raise SupersededError(
                            f"TagFile {entry.file_id} supersedes {old}, already superseded "
                            f"by {name}: drop this file"
                        )
                    continue  # a link left by an attempt that dropped it
                cell = self._get("superseded", old.encode(), [b"f:" + name.encode()])
                value = next(iter(cell.values()), b"")
                since = float(value) if value else 0.0
                if started - since < INTENT_SECONDS:
                    raise SupersededError(
                        f"TagFile {entry.file_id} supersedes {old}, which another commit "
                        f"({name}) is superseding right now: drop this file"
                    )

    def _release(self, entry: TagFile, olds: Mapping[str, TagFile]) -> None:
        """Delete the intents of a commit that will not happen (best effort: stale
        intents stop counting after ``INTENT_SECONDS``)."""
        with suppress(CatalogError), self._translated():
            self._delete_present(
                "superseded", (o.encode() for o in olds), b"f:" + entry.file_id.encode()
            )

    def _apply(
        self,
        entry: TagFile,
        previous: TagFile | None,
        olds: dict[str, TagFile],
        started: float,
    ) -> None:
        """Index rows, then the commit point (one put), then retire what it supersedes."""
        try:
            # The new file holds its own records and those of the files it replaces.
            guids = dict.fromkeys(entry.guids)
            messages = dict.fromkeys(entry.message_ids)
            for cells in self._multi("holdings", (o.encode() for o in entry.supersedes)).values():
                guids.update(dict.fromkeys(_qualifiers(cells, b"g")))
                messages.update(dict.fromkeys(_qualifiers(cells, b"i")))
            column = b"f:" + entry.file_id.encode()
            self._write_index([entry])
            holdings = {b"g:" + g.encode(): b"" for g in guids}
            holdings.update({b"i:" + m.encode(): b"" for m in messages})
            if holdings:
                self._tables["holdings"].put(entry.file_id.encode(), holdings)
            self._put_many("guids", ((g.encode(), {column: b""}) for g in guids))
            self._put_many("messages", ((m.encode(), {column: b""}) for m in messages))
            if olds and time.time() - started >= INTENT_SECONDS:
                # Our intent may no longer hold rivals back: refuse rather than race.
                raise SupersededError(
                    f"TagFile {entry.file_id}: the commit stalled for more than "
                    f"{INTENT_SECONDS:.0f} s before its commit point; retry it"
                )
        except BaseException:
            self._release(entry, olds)
            raise
        # The commit point: readers now see this file committed and, by the
        # supersession rule, the old ones retired.
        self._tables["tagfiles"].put(_tagfile_key(entry), _tagfile_cells(entry))
        # A commit that lost a double commit (module doc) marks nothing retired: the
        # readers' rule voids it, and what only it superseded must stay live.
        if not self._void([entry]):
            retired_at = repr(entry.committed_at or started).encode()
            self._put_many(
                "tagfiles",
                (
                    (
                        _tagfile_key(o),
                        {_STATE: FileState.RETIRED.value.encode(), _RETIRED_AT: retired_at},
                    )
                    for o in olds.values()
                ),
            )
        if (
            previous is not None
            and previous.key_min
            and (not entry.key_min or _keyrange_key(previous) != _keyrange_key(entry))
        ):
            self._tables["keyrange"].delete(_keyrange_key(previous))

    def _check_committable(self, tagfile: TagFile, stored: TagFile | None) -> None:
        """Only a new file or one being written can be committed, in its own dataset."""
        if stored is None:
            return
        state = self._effective([stored])[0].state
        if state is not FileState.WRITING:
            raise CatalogError(
                f"TagFile {tagfile.file_id} is {state.value}; "
                "only a file being written can be committed"
            )
        if stored.dataset != tagfile.dataset:
            raise CatalogError(
                f"TagFile {tagfile.file_id} was registered in dataset "
                f"{stored.dataset!r}, not {tagfile.dataset!r}"
            )

    def commit_tagfile(self, tagfile: TagFile) -> TagFile:
        return self.commit_tagfiles([tagfile])[0]

    def commit_tagfiles(self, tagfiles: Sequence[TagFile]) -> list[TagFile]:
        """Commit entries one after the other (HBase is atomic per row), after checking
        ALL of them and recording every intent: a refused file commits nothing."""
        tagfiles = list(tagfiles)
        ids = check_batch(tagfiles)
        for tagfile in tagfiles:
            _check_row_keys(tagfile)
        with self._op():
            self._require_datasets(tagfiles)
            stored = self._stored(ids)
            for tagfile in tagfiles:
                self._check_committable(tagfile, stored.get(tagfile.file_id))
            now = time.time()
            entries = [
                replace(t, state=FileState.COMMITTED, committed_at=now, retired_at=None)
                for t in tagfiles
            ]
            prepared: list[tuple[TagFile, dict[str, TagFile], float]] = []
            try:
                for entry in entries:
                    prepared.append((entry, *self._prepare(entry)))
            except BaseException:
                for entry, olds, _ in prepared:
                    self._release(entry, olds)
                raise
            with self._changing():
                for number, (entry, olds, started) in enumerate(prepared):
                    try:
                        self._apply(entry, stored.get(entry.file_id), olds, started)
                    except BaseException:
                        for later, later_olds, _ in prepared[number + 1 :]:
                            self._release(later, later_olds)
                        raise
        return entries

    def retire_tagfiles(self, file_ids: Iterable[str]) -> None:
        """Retire committed files; writing ones are refused. Retired ones keep their
        retirement time, or are stamped with the time they are known by (their
        successor's commit, else now) if they had none."""
        ids = list(dict.fromkeys(file_ids))
        with self._op():
            stored = self._stored(ids)
            missing = [i for i in ids if i not in stored]
            if missing:
                raise NotFoundError(f"no TagFiles {', '.join(missing)}")
            writing = [i for i in ids if stored[i].state is FileState.WRITING]
            if writing:
                raise CatalogError(
                    f"TagFiles still being written cannot be retired: {', '.join(writing)}"
                )
            now = time.time()
            effective = self._effective(list(stored.values()))
            with self._changing():
                self._put_many(
                    "tagfiles",
                    (
                        (
                            _tagfile_key(t),
                            {
                                _STATE: FileState.RETIRED.value.encode(),
                                _RETIRED_AT: repr(
                                    now if t.retired_at is None else t.retired_at
                                ).encode(),
                            },
                        )
                        # The rule's state decides the time; the stored one what needs a write.
                        for t in effective
                        if stored[t.file_id].state is FileState.COMMITTED or t.retired_at is None
                    ),
                )

    def remove_tagfile(self, file_id: str) -> None:
        with self._op():
            current = self._one(file_id)
            if current.state is FileState.COMMITTED:
                raise CatalogError(f"TagFile {file_id} is committed; retire it before removing")
            key = file_id.encode()
            column = b"f:" + key
            with self._changing():
                # The authoritative row goes first; index cells left by a crash
                # after this point point at nothing, which readers skip.
                self._tables["tagfiles"].delete(_tagfile_key(current))
                self._tables["tagfile_by_id"].delete(key)
                if current.key_min:
                    self._tables["keyrange"].delete(_keyrange_key(current))
                holdings = self._get("holdings", key)
                self._delete_present(
                    "guids", (g.encode() for g in _qualifiers(holdings, b"g")), column
                )
                self._delete_present(
                    "messages", (m.encode() for m in _qualifiers(holdings, b"i")), column
                )
                self._delete_present("superseded", (o.encode() for o in current.supersedes), column)
                if holdings:
                    self._tables["holdings"].delete(key)

    # -- trigger menus -------------------------------------------------------
    def put_trigger_menu(self, menu: TriggerMenu) -> None:
        key = _menu_key(menu.key, menu.level)
        with self._op():
            cells = self._get("menus", key)
            if _DOC in cells:
                if _menu_from(cells).bits == menu.bits:
                    return
                raise AlreadyExistsError(
                    f"a different {menu.level} menu is stored for configuration key {menu.key}"
                )
            doc = {
                "key": menu.key,
                "level": menu.level,
                "bits": {str(b): n for b, n in menu.bits.items()},
            }
            with self._changing():
                self._tables["menus"].put(key, {_DOC: _json(doc)})

    def get_trigger_menu(self, key: int, level: str) -> TriggerMenu:
        with self._op():
            cells = self._get("menus", _menu_key(key, level))
        if _DOC not in cells:
            raise NotFoundError(f"no {level} trigger menu for configuration key {key}")
        return _menu_from(cells)

    def list_trigger_menus(self) -> list[TriggerMenu]:
        with self._op():
            rows = self._scan("menus")
        menus = [_menu_from(cells) for _, cells in rows if _DOC in cells]
        return sorted(menus, key=lambda m: (m.key, m.level))

    # -- change detection ----------------------------------------------------
    def change_token(self) -> int:
        """The change counter (module doc): one get."""
        with self._op():
            value = self._get("changes", _CHANGES_ROW, [_WRITES]).get(_WRITES, b"")
        # HBase stores a counter as a big-endian signed 64-bit integer.
        return int.from_bytes(value, "big", signed=True) if value else 0

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._owns_connection:
                with self._translated():
                    self._connection.close()


def _commit_order(tagfile: TagFile) -> tuple[float, str]:
    """Which of two commits came first: commit time (creation time if the entry was
    registered committed without one), then file id."""
    at = tagfile.committed_at if tagfile.committed_at is not None else tagfile.created_at
    return at, tagfile.file_id


def _tagfile_key(tagfile: TagFile) -> bytes:
    return _key(tagfile.dataset, tagfile.file_id)


def _keyrange_key(tagfile: TagFile) -> bytes:
    return _key(tagfile.collection, _k0(tagfile.key_min[0]), tagfile.file_id)


def _menu_key(key: int, level: str) -> bytes:
    return _key(f"{key:08x}", level)


def _tagfile_cells(tagfile: TagFile) -> Cells:
    doc = {
        "file_id": tagfile.file_id,
        "dataset": tagfile.dataset,
        "collection": tagfile.collection,
        "kind": FileKind(tagfile.kind).value,
        "uri": tagfile.uri,
        "part": tagfile.part,
        "rows": tagfile.rows,
        "bytes": tagfile.bytes,
        "checksum": tagfile.checksum,
        "key_min": list(tagfile.key_min),
        "key_max": list(tagfile.key_max),
        "created_at": tagfile.created_at,
        "message_ids": list(tagfile.message_ids),
        "guids": list(tagfile.guids),
        "supersedes": list(tagfile.supersedes),
        "attributes": tagfile.attributes,
    }
    return {
        _DOC: _json(doc),
        _STATE: FileState(tagfile.state).value.encode(),
        _COMMITTED_AT: _time_cell(tagfile.committed_at),
        _RETIRED_AT: _time_cell(tagfile.retired_at),
    }


def _time_cell(value: float | None) -> bytes:
    return b"" if value is None else repr(value).encode()


def _time_from(value: bytes) -> float | None:
    return float(value) if value else None


def _tagfile_from(cells: Mapping[bytes, bytes]) -> TagFile:
    doc = orjson.loads(cells[_DOC])
    return TagFile(
        file_id=doc["file_id"],
        dataset=doc["dataset"],
        collection=doc["collection"],
        kind=FileKind(doc["kind"]),
        uri=doc["uri"],
        part=doc["part"],
        rows=doc["rows"],
        bytes=doc["bytes"],
        checksum=doc["checksum"],
        key_min=tuple(doc["key_min"]),
        key_max=tuple(doc["key_max"]),
        state=FileState(cells[_STATE].decode()),
        created_at=doc["created_at"],
        committed_at=_time_from(cells.get(_COMMITTED_AT, b"")),
        # Absent in rows written before the column existed.
        retired_at=_time_from(cells.get(_RETIRED_AT, b"")),
        message_ids=tuple(doc["message_ids"]),
        guids=tuple(doc["guids"]),
        supersedes=tuple(doc["supersedes"]),
        attributes=doc["attributes"],
    )


def _collection_from(cells: Mapping[bytes, bytes]) -> Collection:
    doc = orjson.loads(cells[_DOC])
    return Collection(
        name=doc["name"],
        kind=RecordKind(doc["kind"]),
        description=doc["description"],
        created_at=doc["created_at"],
    )


def _dataset_from(cells: Mapping[bytes, bytes]) -> Dataset:
    doc = orjson.loads(cells[_DOC])
    return Dataset(
        name=doc["name"],
        collection=doc["collection"],
        format=doc["format"],
        processing_tag=doc["processing_tag"],
        project=doc["project"],
        stream=doc["stream"],
        upstream=doc["upstream"],
        attributes=doc["attributes"],
        created_at=doc["created_at"],
    )


def _menu_from(cells: Mapping[bytes, bytes]) -> TriggerMenu:
    doc = orjson.loads(cells[_DOC])
    bits = {int(bit): name for bit, name in doc["bits"].items()}
    return TriggerMenu(key=doc["key"], level=doc["level"], bits=bits)
