"""SQLite catalog: the embedded default, one file that several processes can share.

Files are opened in WAL mode with a 30 s busy timeout, and every write is a
``BEGIN IMMEDIATE`` transaction: concurrent writers (consumers in other
processes) queue for the write lock instead of failing with "database is
locked" when a read transaction tries to upgrade. ``synchronous=NORMAL`` keeps
commits off fsync in WAL mode (only checkpoints sync, and they are made rare);
that is safe against process crashes (what we guard against) and at worst
loses the last commits on a power cut, never the file. One connection per
catalog object, guarded by a lock, serves all threads.

Tables: ``collections``, ``datasets``, ``tagfiles`` (one row per TagFile; key
bounds as JSON plus the first key component as integers ``k0_min``/``k0_max``
for run-range queries), ``message_ids`` and ``guids`` (which committed file
holds which producer message and which file GUID), ``supersedes`` (compaction
lineage), ``trigger_menus`` and ``schema_version``.

Columns added later (``tagfiles.retired_at``) are added to older files when
they are opened, without changing the schema version: older code still reads
and writes such a file, and entries it retires carry no time (the superseding
file's commit time stands in, and ``catalog gc`` stamps the rest).

Index rows for message ids and GUIDs are written when a file is committed. A
file that supersedes others also inherits their index rows, because their
records now live in it: a redelivered message stays absorbed, and a GUID lookup
finds the compacted file, even after the old files are garbage-collected.

The change token (``Catalog.change_token``) is ``PRAGMA data_version`` read on
a second connection that never writes. ``data_version`` changes whenever
ANOTHER connection commits to the file, and to the watching connection every
writer is another: this object's own connection, other catalog objects and
processes, older code, the sqlite3 shell. No writer needs to cooperate, and
reading it costs no write: in WAL mode it is read from the shared WAL index, a
few microseconds. The watcher has a lock of its own, so a token read never
waits for a query of the main connection (listing a large catalog holds it for
half a second). A generation row bumped by every write transaction would serve
too, but only for writers that bump it, and would add a write to every
transaction. A WAL checkpoint also changes ``data_version`` (a spurious change:
one extra listing). An in-memory catalog has one connection, whose
``total_changes`` (rows written) is the token.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from catalog.base import Catalog
from catalog.model import Collection, Dataset, FileKind, FileState, TagFile
from catalog.rules import (
    check_batch,
    check_batch_supersedes,
    check_supersedes_live,
    check_tagfile,
    in_first_key_range,
    listing_order,
)
from eventindex.errors import AlreadyExistsError, CatalogError, NotFoundError
from eventindex.records.schema import RecordKind, TriggerMenu

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
WAL_CHECKPOINT_PAGES = 10_000
WAL_SIZE_LIMIT_BYTES = 64 * 2**20
# SQLite's default limit on bound parameters is 999 in old builds; stay below it.
_CHUNK = 500
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS collections (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS datasets (
        name TEXT PRIMARY KEY,
        collection TEXT NOT NULL REFERENCES collections(name),
        format TEXT NOT NULL,
        processing_tag TEXT NOT NULL,
        project TEXT NOT NULL,
        stream TEXT NOT NULL,
        upstream TEXT,
        attributes TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS datasets_by_collection ON datasets(collection, name)",
    """CREATE TABLE IF NOT EXISTS tagfiles (
        file_id TEXT PRIMARY KEY,
        dataset TEXT NOT NULL REFERENCES datasets(name),
        collection TEXT NOT NULL REFERENCES collections(name),
        kind TEXT NOT NULL,
        uri TEXT NOT NULL,
        part TEXT NOT NULL,
        row_count INTEGER NOT NULL,
        byte_size INTEGER NOT NULL,
        checksum TEXT NOT NULL,
        key_min TEXT NOT NULL,
        key_max TEXT NOT NULL,
        k0_min INTEGER,
        k0_max INTEGER,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        committed_at REAL,
        message_ids TEXT NOT NULL,
        guids TEXT NOT NULL,
        supersedes TEXT NOT NULL,
        attributes TEXT NOT NULL,
        retired_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS tagfiles_by_dataset ON tagfiles(dataset)",
    "CREATE INDEX IF NOT EXISTS tagfiles_by_first_key ON tagfiles(collection, k0_min, k0_max)",
    """CREATE TABLE IF NOT EXISTS message_ids (
        message_id TEXT NOT NULL,
        file_id TEXT NOT NULL,
        PRIMARY KEY (message_id, file_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS message_ids_by_file ON message_ids(file_id)",
    """CREATE TABLE IF NOT EXISTS guids (
        guid TEXT NOT NULL,
        file_id TEXT NOT NULL,
        PRIMARY KEY (guid, file_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS guids_by_file ON guids(file_id)",
    """CREATE TABLE IF NOT EXISTS supersedes (
        file_id TEXT NOT NULL,
        superseded_id TEXT NOT NULL,
        PRIMARY KEY (file_id, superseded_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS supersedes_by_old ON supersedes(superseded_id)",
    """CREATE TABLE IF NOT EXISTS trigger_menus (
        config_key INTEGER NOT NULL,
        level TEXT NOT NULL,
        bits TEXT NOT NULL,
        PRIMARY KEY (config_key, level)
    )""",
)

# Columns added after schema version 1 was released: added to older files on open.
_ADDED_COLUMNS = {"tagfiles": (("retired_at", "REAL"),)}

_TAGFILE_COLUMNS = (
    "file_id, dataset, collection, kind, uri, part, row_count, byte_size, checksum, "
    "key_min, key_max, k0_min, k0_max, state, created_at, committed_at, "
    "message_ids, guids, supersedes, attributes, retired_at"
)
_TAGFILE_PLACEHOLDERS = ", ".join("?" * len(_TAGFILE_COLUMNS.split(", ")))

_UPSERT_TAGFILE = (
    f"INSERT INTO tagfiles ({_TAGFILE_COLUMNS}) VALUES ({_TAGFILE_PLACEHOLDERS})"
    " ON CONFLICT (file_id) DO UPDATE SET "
    + ", ".join(
        f"{c} = excluded.{c}"
        for c in _TAGFILE_COLUMNS.split(", ")
        if c not in ("file_id", "dataset", "collection")
    )
)

# The state readers see: a committed file that a committed file supersedes is
# retired, whatever its own row says (the rule of Catalog.list_tagfiles). Its
# retirement time is its own stamp, else the commit time of what superseded it
# (entries retired by code that did not stamp it); kept only for retired rows.
_EFFECTIVE_TAGFILES = """
SELECT t.*, CASE WHEN t.state = 'committed' AND EXISTS (
        SELECT 1 FROM supersedes s JOIN tagfiles n ON n.file_id = s.file_id
        WHERE s.superseded_id = t.file_id AND n.state = 'committed'
    ) THEN 'retired' ELSE t.state END AS effective_state,
    CASE WHEN t.state = 'writing' OR t.retired_at IS NOT NULL THEN t.retired_at ELSE (
        SELECT min(coalesce(n.committed_at, n.created_at)) FROM supersedes s
        JOIN tagfiles n ON n.file_id = s.file_id
        WHERE s.superseded_id = t.file_id AND n.state = 'committed'
    ) END AS effective_retired_at
FROM tagfiles t
"""


def _dumps(value: object) -> str:
    # orjson: listing 10,000 entries decodes 60,000 JSON values.
    return orjson.dumps(value).decode()


def _loads(text: str) -> Any:
    return orjson.loads(text)


def _clamp(value: int) -> int:
    # The integer index columns are int64; clamping is monotone, so the SQL
    # prefilter never drops a match, and an exact check in Python follows.
    return max(_INT64_MIN, min(_INT64_MAX, value))


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(items: Sequence[object]) -> str:
    return ", ".join("?" * len(items))


@contextmanager
def _translated() -> Iterator[None]:
    """Turn sqlite3 errors into the project's own at the backend boundary."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        text = str(exc)
        if "UNIQUE" in text or "PRIMARY KEY" in text:
            raise AlreadyExistsError(f"catalog: {text}") from exc
        if "FOREIGN KEY" in text:
            raise NotFoundError(f"catalog: a referenced entry does not exist ({text})") from exc
        raise CatalogError(f"catalog: {text}") from exc
    except sqlite3.Error as exc:
        raise CatalogError(f"SQLite catalog: {exc}") from exc
    except OverflowError as exc:
        raise CatalogError(f"SQLite catalog: a number does not fit in 64 bits: {exc}") from exc


def _enable_wal(conn: sqlite3.Connection) -> str:
    """Put the file in WAL mode (persistent: a no-op once set) and return the mode.

    Switching the mode can fail with "database is locked" without SQLite's busy
    handler being consulted, when another process opens the same new file at the
    same moment; so it is retried here, up to the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
            if mode.lower() == "wal":
                return mode
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class SQLiteCatalog(Catalog):
    """The catalog in one SQLite file (or ``':memory:'``), safe for several processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._dataset_collections: dict[str, str] = {}
        memory = path == ":memory:" or path.startswith("file::memory:")
        with _translated():
            if not memory:
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise CatalogError(f"cannot create the folder of {path}: {exc}") from exc
            # Autocommit mode (isolation_level=None): transactions are explicit,
            # so writes can take the write lock up front with BEGIN IMMEDIATE.
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA foreign_keys = ON")
                if not memory:
                    mode = _enable_wal(conn)
                    if str(mode).lower() != "wal":
                        raise CatalogError(f"{path}: SQLite refused WAL mode (got {mode!r})")
                    conn.execute("PRAGMA synchronous = NORMAL")
                    # Checkpoints are where NORMAL fsyncs: one per ~40 MB of WAL
                    # instead of SQLite's 4 MB default halves the cost of a
                    # commit; the limit truncates the WAL again afterwards.
                    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
                    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
                self._create_schema(conn)
            except BaseException:
                conn.close()
                raise
        self._conn: sqlite3.Connection | None = conn
        self._watch_lock = threading.Lock()
        self._watcher: sqlite3.Connection | None = None
        if not memory:
            with _translated():
                try:
                    self._watcher = sqlite3.connect(
                        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
                    )
                except BaseException:
                    conn.close()
                    raise

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            for table, columns in _ADDED_COLUMNS.items():
                have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0]
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                raise CatalogError(
                    f"catalog schema version {version} is not the supported {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- plumbing ------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CatalogError(f"the SQLite catalog {self.path} is closed")
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _translated():
            yield self._connection()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error, ours or SQLite's."""
        with self._lock, _translated():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- collections ---------------------------------------------------------
    def create_collection(self, collection: Collection) -> None:
        with self._write() as conn:
            if conn.execute(
                "SELECT 1 FROM collections WHERE name = ?", (collection.name,)
            ).fetchone():
                raise AlreadyExistsError(f"collection {collection.name!r} already exists")
            conn.execute(
                "INSERT INTO collections (name, kind, description, created_at) VALUES (?, ?, ?, ?)",
                (
                    collection.name,
                    collection.kind.value,
                    collection.description,
                    collection.created_at,
                ),
            )

    def get_collection(self, name: str) -> Collection:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no collection {name!r}")
        return _collection(row)

    def list_collections(self) -> list[Collection]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM collections ORDER BY name").fetchall()
        return [_collection(row) for row in rows]

    # -- datasets ------------------------------------------------------------
    def create_dataset(self, dataset: Dataset) -> None:
        with self._write() as conn:
            self._require_collection(conn, dataset.collection)
            if conn.execute("SELECT 1 FROM datasets WHERE name = ?", (dataset.name,)).fetchone():
                raise AlreadyExistsError(f"dataset {dataset.name!r} already exists")
            conn.execute(
                "INSERT INTO datasets (name, collection, format, processing_tag, project, stream,"
                " upstream, attributes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset.name,
                    dataset.collection,
                    dataset.format,
                    dataset.processing_tag,
                    dataset.project,
                    dataset.stream,
                    dataset.upstream,
                    _dumps(dataset.attributes),
                    dataset.created_at,
                ),
            )

    def get_dataset(self, name: str) -> Dataset:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no dataset {name!r}")
        return _dataset(row)

    def list_datasets(self, collection: str | None = None) -> list[Dataset]:
        """Datasets sorted by name; ``NotFoundError`` if the named collection is unknown."""
        with self._read() as conn:
            if collection is None:
                rows = conn.execute("SELECT * FROM datasets ORDER BY name").fetchall()
            else:
                self._require_collection(conn, collection)
                rows = conn.execute(
                    "SELECT * FROM datasets WHERE collection = ? ORDER BY name", (collection,)
                ).fetchall()
        return [_dataset(row) for row in rows]

    @staticmethod
    def _require_collection(conn: sqlite3.Connection, name: str) -> None:
        if not conn.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone():
            raise NotFoundError(f"no collection {name!r}")

    def _dataset_collection(self, conn: sqlite3.Connection, name: str) -> str:
        # Datasets are never deleted or moved, so what was found once stays true.
        known = self._dataset_collections.get(name)
        if known is not None:
            return known
        row = conn.execute("SELECT collection FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no dataset {name!r}")
        self._dataset_collections[name] = str(row[0])
        return str(row[0])

    def _require_datasets(self, conn: sqlite3.Connection, tagfiles: Sequence[TagFile]) -> None:
        """Every entry's dataset exists and belongs to the collection the entry names."""
        collections: dict[str, str] = {}
        for tagfile in tagfiles:
            if tagfile.dataset not in collections:
                collections[tagfile.dataset] = self._dataset_collection(conn, tagfile.dataset)
            if collections[tagfile.dataset] != tagfile.collection:
                raise CatalogError(
                    f"TagFile {tagfile.file_id}: dataset {tagfile.dataset!r} belongs to "
                    f"collection {collections[tagfile.dataset]!r}, not {tagfile.collection!r}"
                )

    # -- TagFiles ------------------------------------------------------------
    def add_tagfiles(self, tagfiles: Sequence[TagFile]) -> None:
        """Register a batch in one transaction: all entries or none.

        A committed entry is indexed and retires what it supersedes, as
        ``commit_tagfile`` does; it may supersede files registered earlier or
        earlier in the same batch.
        """
        tagfiles = list(tagfiles)
        ids = check_batch(tagfiles)
        with self._write() as conn:
            self._require_datasets(conn, tagfiles)
            taken = self._existing_ids(conn, ids)
            if taken:
                raise AlreadyExistsError(f"file ids already registered: {', '.join(sorted(taken))}")
            superseded = sorted({s for t in tagfiles for s in t.supersedes})
            check_batch_supersedes(tagfiles, self._existing_ids(conn, superseded))
            states = {i: t.state for i, t in self._effective(conn, superseded).items()}
            for tagfile in tagfiles:
                if tagfile.state is FileState.COMMITTED:
                    check_supersedes_live(tagfile, states)
                    states.update(dict.fromkeys(tagfile.supersedes, FileState.RETIRED))
            conn.executemany(
                f"INSERT INTO tagfiles ({_TAGFILE_COLUMNS}) VALUES ({_TAGFILE_PLACEHOLDERS})",
                [_tagfile_params(t) for t in tagfiles],
            )
            for tagfile in tagfiles:
                if tagfile.state is FileState.COMMITTED:
                    self._apply_commit(conn, tagfile)

    @staticmethod
    def _existing_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(ids):
            found.update(
                row[0]
                for row in conn.execute(
                    f"SELECT file_id FROM tagfiles WHERE file_id IN ({_marks(chunk)})", chunk
                )
            )
        return found

    def commit_tagfile(self, tagfile: TagFile) -> TagFile:
        check_tagfile(tagfile)
        with self._write() as conn:
            return self._commit(conn, tagfile)

    def commit_tagfiles(self, tagfiles: Sequence[TagFile]) -> list[TagFile]:
        """Commit every entry in ONE transaction: readers see all of them or none."""
        tagfiles = list(tagfiles)
        check_batch(tagfiles)
        with self._write() as conn:
            return [self._commit(conn, tagfile) for tagfile in tagfiles]

    def _commit(self, conn: sqlite3.Connection, tagfile: TagFile) -> TagFile:
        """``commit_tagfile`` inside the caller's write transaction."""
        self._require_datasets(conn, [tagfile])
        # Only what the checks need: this runs once per file a consumer writes.
        previous = conn.execute(
            f"SELECT dataset, effective_state FROM ({_EFFECTIVE_TAGFILES} WHERE t.file_id = ?)",
            (tagfile.file_id,),
        ).fetchone()
        if previous is not None:
            if previous["effective_state"] != FileState.WRITING.value:
                raise CatalogError(
                    f"TagFile {tagfile.file_id} is {previous['effective_state']}; "
                    "only a file being written can be committed"
                )
            if previous["dataset"] != tagfile.dataset:
                raise CatalogError(
                    f"TagFile {tagfile.file_id} was registered in dataset "
                    f"{previous['dataset']!r}, not {tagfile.dataset!r}"
                )
        if tagfile.supersedes:
            olds = self._effective(conn, tagfile.supersedes)
            missing = set(tagfile.supersedes) - set(olds)
            if missing:
                raise NotFoundError(
                    f"TagFile {tagfile.file_id} supersedes unknown files: "
                    f"{', '.join(sorted(missing))}"
                )
            # In the write transaction: of two jobs that replace the same file,
            # the second one sees it retired here and is refused.
            check_supersedes_live(tagfile, {i: t.state for i, t in olds.items()})
        entry = replace(
            tagfile, state=FileState.COMMITTED, committed_at=time.time(), retired_at=None
        )
        # An upsert updates the writing row in place; REPLACE would delete
        # and re-insert it with every index entry.
        conn.execute(_UPSERT_TAGFILE, _tagfile_params(entry))
        self._apply_commit(conn, entry)
        return entry

    @staticmethod
    def _apply_commit(conn: sqlite3.Connection, entry: TagFile) -> None:
        """Index a committed entry, let it inherit what it supersedes, and retire those."""
        # A file gets supersedes, message id and GUID rows only here, once: a
        # committed file cannot be committed again.
        file_id = entry.file_id
        conn.executemany(
            "INSERT OR IGNORE INTO supersedes (file_id, superseded_id) VALUES (?, ?)",
            [(file_id, old) for old in entry.supersedes],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO message_ids (message_id, file_id) VALUES (?, ?)",
            [(message_id, file_id) for message_id in entry.message_ids],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO guids (guid, file_id) VALUES (?, ?)",
            [(guid, file_id) for guid in entry.guids],
        )
        olds = list(entry.supersedes)
        retired_at = entry.committed_at if entry.committed_at is not None else time.time()
        for chunk in _chunks(olds):
            marks = _marks(chunk)
            conn.execute(
                "INSERT OR IGNORE INTO message_ids (message_id, file_id)"
                f" SELECT message_id, ? FROM message_ids WHERE file_id IN ({marks})",
                (file_id, *chunk),
            )
            conn.execute(
                "INSERT OR IGNORE INTO guids (guid, file_id)"
                f" SELECT guid, ? FROM guids WHERE file_id IN ({marks})",
                (file_id, *chunk),
            )
            conn.execute(
                "UPDATE tagfiles SET state = 'retired', retired_at = coalesce(retired_at, ?)"
                f" WHERE file_id IN ({marks})",
                (retired_at, *chunk),
            )

    def retire_tagfiles(self, file_ids: Iterable[str]) -> None:
        """Retire committed files; writing ones are refused. Retired ones keep their
        retirement time, or are stamped with the time they are known by (their
        successor's commit, else now) if they had none."""
        ids = list(dict.fromkeys(file_ids))
        with self._write() as conn:
            current = self._effective(conn, ids)
            missing = [i for i in ids if i not in current]
            if missing:
                raise NotFoundError(f"no TagFiles {', '.join(missing)}")
            writing = [i for i in ids if current[i].state is FileState.WRITING]
            if writing:
                raise CatalogError(
                    f"TagFiles still being written cannot be retired: {', '.join(writing)}"
                )
            now = time.time()
            conn.executemany(
                "UPDATE tagfiles SET state = 'retired', retired_at = ? WHERE file_id = ?",
                [(now if t.retired_at is None else t.retired_at, i) for i, t in current.items()],
            )

    def remove_tagfile(self, file_id: str) -> None:
        with self._write() as conn:
            current = self._effective(conn, [file_id]).get(file_id)
            if current is None:
                raise NotFoundError(f"no TagFile {file_id}")
            if current.state is FileState.COMMITTED:
                raise CatalogError(f"TagFile {file_id} is committed; retire it before removing")
            for table in ("tagfiles", "message_ids", "guids", "supersedes"):
                conn.execute(f"DELETE FROM {table} WHERE file_id = ?", (file_id,))

    def get_tagfile(self, file_id: str) -> TagFile:
        with self._read() as conn:
            found = self._effective(conn, [file_id]).get(file_id)
        if found is None:
            raise NotFoundError(f"no TagFile {file_id}")
        return found

    @staticmethod
    def _effective(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, TagFile]:
        found: dict[str, TagFile] = {}
        for chunk in _chunks(ids):
            for row in conn.execute(
                f"{_EFFECTIVE_TAGFILES} WHERE t.file_id IN ({_marks(chunk)})", chunk
            ):
                found[row["file_id"]] = _tagfile(row)
        return found

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
        where: list[str] = []
        params: list[object] = []
        if dataset is not None:
            where.append("t.dataset = ?")
            params.append(dataset)
        if collection is not None:
            where.append("t.collection = ?")
            params.append(collection)
        if kinds is not None:
            kind_values = sorted({FileKind(k).value for k in kinds})
            where.append(f"t.kind IN ({_marks(kind_values)})")
            params.extend(kind_values)
        if first_key_range is not None:
            lo, hi = first_key_range
            if lo > hi:
                return self._require_names(dataset, collection)
            where.append("t.k0_min IS NOT NULL AND t.k0_min <= ? AND t.k0_max >= ?")
            params.extend([_clamp(hi), _clamp(lo)])
        sql = f"SELECT * FROM ({_EFFECTIVE_TAGFILES}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += ")"
        if states is not None:
            state_values = sorted({FileState(s).value for s in states})
            sql += f" WHERE effective_state IN ({_marks(state_values)})"
            params.extend(state_values)
        with self._read() as conn:
            self._require_names_in(conn, dataset, collection)
            found = [_tagfile(row) for row in conn.execute(sql, params)]
        if first_key_range is not None:
            found = [t for t in found if in_first_key_range(t, *first_key_range)]
        return sorted(found, key=listing_order)

    def _require_names(self, dataset: str | None, collection: str | None) -> list[TagFile]:
        with self._read() as conn:
            self._require_names_in(conn, dataset, collection)
        return []

    def _require_names_in(
        self, conn: sqlite3.Connection, dataset: str | None, collection: str | None
    ) -> None:
        if dataset is not None:
            self._dataset_collection(conn, dataset)
        if collection is not None:
            self._require_collection(conn, collection)

    def files_with_guid(self, guid: str) -> list[TagFile]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM ({_EFFECTIVE_TAGFILES}"
                " WHERE t.file_id IN (SELECT file_id FROM guids WHERE guid = ?))"
                " WHERE effective_state = 'committed'",
                (guid,),
            ).fetchall()
        return sorted((_tagfile(row) for row in rows), key=listing_order)

    def absorbed_message_ids(self, message_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(message_ids))
        absorbed: set[str] = set()
        with self._read() as conn:
            for chunk in _chunks(ids):
                absorbed.update(
                    row[0]
                    for row in conn.execute(
                        "SELECT DISTINCT m.message_id FROM message_ids m"
                        " JOIN tagfiles t ON t.file_id = m.file_id"
                        f" WHERE t.state = 'committed' AND m.message_id IN ({_marks(chunk)})",
                        chunk,
                    )
                )
        return absorbed

    # -- trigger menus -------------------------------------------------------
    def put_trigger_menu(self, menu: TriggerMenu) -> None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT bits FROM trigger_menus WHERE config_key = ? AND level = ?",
                (menu.key, menu.level),
            ).fetchone()
            if row is not None:
                if _bits(row["bits"]) == menu.bits:
                    return
                raise AlreadyExistsError(
                    f"a different {menu.level} menu is stored for configuration key {menu.key}"
                )
            conn.execute(
                "INSERT INTO trigger_menus (config_key, level, bits) VALUES (?, ?, ?)",
                (menu.key, menu.level, _dumps({str(b): n for b, n in menu.bits.items()})),
            )

    def get_trigger_menu(self, key: int, level: str) -> TriggerMenu:
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM trigger_menus WHERE config_key = ? AND level = ?", (key, level)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no {level} trigger menu for configuration key {key}")
        return _menu(row)

    def list_trigger_menus(self) -> list[TriggerMenu]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM trigger_menus ORDER BY config_key, level").fetchall()
        return [_menu(row) for row in rows]

    # -- change detection ----------------------------------------------------
    def change_token(self) -> int:
        """The watcher's ``data_version``, or ``total_changes`` in memory (module doc)."""
        if self._watcher is None:
            with self._read() as conn:
                return conn.total_changes
        with self._watch_lock, _translated():
            watcher = self._watcher
            if watcher is None or self._conn is None:
                raise CatalogError(f"the SQLite catalog {self.path} is closed")
            return int(watcher.execute("PRAGMA data_version").fetchone()[0])

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with _translated():
                    conn.close()
        with self._watch_lock:
            if self._watcher is not None:
                watcher, self._watcher = self._watcher, None
                with _translated():
                    watcher.close()


def _collection(row: sqlite3.Row) -> Collection:
    return Collection(
        name=row["name"],
        kind=RecordKind(row["kind"]),
        description=row["description"],
        created_at=row["created_at"],
    )


def _dataset(row: sqlite3.Row) -> Dataset:
    return Dataset(
        name=row["name"],
        collection=row["collection"],
        format=row["format"],
        processing_tag=row["processing_tag"],
        project=row["project"],
        stream=row["stream"],
        upstream=row["upstream"],
        attributes=_loads(row["attributes"]),
        created_at=row["created_at"],
    )


def _tagfile_params(tagfile: TagFile) -> tuple[Any, ...]:
    k0_min = _clamp(tagfile.key_min[0]) if tagfile.key_min else None
    k0_max = _clamp(tagfile.key_max[0]) if tagfile.key_max else None
    return (
        tagfile.file_id,
        tagfile.dataset,
        tagfile.collection,
        FileKind(tagfile.kind).value,
        tagfile.uri,
        tagfile.part,
        tagfile.rows,
        tagfile.bytes,
        tagfile.checksum,
        _dumps(list(tagfile.key_min)),
        _dumps(list(tagfile.key_max)),
        k0_min,
        k0_max,
        FileState(tagfile.state).value,
        tagfile.created_at,
        tagfile.committed_at,
        _dumps(list(tagfile.message_ids)),
        _dumps(list(tagfile.guids)),
        _dumps(list(tagfile.supersedes)),
        _dumps(tagfile.attributes),
        tagfile.retired_at,
    )


def _tagfile(row: sqlite3.Row) -> TagFile:
    return TagFile(
        file_id=row["file_id"],
        dataset=row["dataset"],
        collection=row["collection"],
        kind=FileKind(row["kind"]),
        uri=row["uri"],
        part=row["part"],
        rows=row["row_count"],
        bytes=row["byte_size"],
        checksum=row["checksum"],
        key_min=tuple(_loads(row["key_min"])),
        key_max=tuple(_loads(row["key_max"])),
        state=FileState(row["effective_state"]),
        created_at=row["created_at"],
        committed_at=row["committed_at"],
        retired_at=row["effective_retired_at"] if row["effective_state"] == "retired" else None,
        message_ids=tuple(_loads(row["message_ids"])),
        guids=tuple(_loads(row["guids"])),
        supersedes=tuple(_loads(row["supersedes"])),
        attributes=_loads(row["attributes"]),
    )


def _bits(text: str) -> dict[int, str]:
    return {int(bit): name for bit, name in _loads(text).items()}


def _menu(row: sqlite3.Row) -> TriggerMenu:
    return TriggerMenu(key=row["config_key"], level=row["level"], bits=_bits(row["bits"]))
