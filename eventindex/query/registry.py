"""The persistent registry of asynchronous queries: one SQLite file shared by processes.

The web service and ``eventindex query submit`` add queries (state ``queued``);
a scan worker claims them (``running``), reports progress with a heartbeat, and
ends them (``done`` with a Parquet result, ``failed`` with the error) unless
someone cancels them first (``cancelled``). A done query's result expires after
the configured time (``expired``: the file is deleted, the record stays).

Nothing is lost on a restart: the queue lives in the file, and a running query
whose worker stopped heart-beating for ``lease_seconds`` is queued again and
walked from the start by the next worker.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eventindex.errors import CatalogError, NotFoundError


class QueryState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


FINISHED_STATES = frozenset(
    {QueryState.DONE, QueryState.FAILED, QueryState.CANCELLED, QueryState.EXPIRED}
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    id TEXT PRIMARY KEY,
    sql TEXT NOT NULL,
    table_name TEXT NOT NULL,
    submitter TEXT NOT NULL,
    state TEXT NOT NULL,
    units_done INTEGER NOT NULL DEFAULT 0,
    units_total INTEGER NOT NULL DEFAULT 0,
    units_shared INTEGER NOT NULL DEFAULT 0,
    route TEXT NOT NULL DEFAULT '',
    error TEXT,
    error_code TEXT,
    result_path TEXT,
    result_rows INTEGER,
    worker TEXT,
    submitted_at REAL NOT NULL,
    started_at REAL,
    heartbeat_at REAL,
    finished_at REAL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS queries_by_state ON queries (state, submitted_at);
"""


@dataclass(frozen=True)
class QueryRecord:
    """Everything the registry knows about one query.

    ``route`` is ``scan`` (rode a shared walk) or ``direct`` (answered from the
    few units its key or region selects); ``units_shared`` counts the units the
    query read together with at least one other query.
    """

    id: str
    sql: str
    table_name: str
    submitter: str
    state: QueryState
    units_done: int
    units_total: int
    units_shared: int
    route: str
    error: str | None
    error_code: str | None
    result_path: str | None
    result_rows: int | None
    worker: str | None
    submitted_at: float
    started_at: float | None
    heartbeat_at: float | None
    finished_at: float | None
    expires_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> QueryRecord:
        values = dict(row)
        values["state"] = QueryState(values["state"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The public view (no worker internals), as JSON-ready values."""
        data = asdict(self)
        data["state"] = self.state.value
        data["table"] = data.pop("table_name")
        data["progress"] = {"units_done": self.units_done, "units_total": self.units_total}
        for internal in ("worker", "heartbeat_at", "result_path", "units_done", "units_total"):
            data.pop(internal)
        return data


class QueryRegistry:
    """The query registry in one SQLite file (WAL mode: several processes share it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise CatalogError(f"query registry {path}: {exc}") from exc
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise CatalogError(f"query registry {self.path}: {exc}") from exc

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[QueryRecord]:
        with self._lock:
            try:
                rows = self._db.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise CatalogError(f"query registry {self.path}: {exc}") from exc
        return [QueryRecord.from_row(r) for r in rows]

    # -- submitting and reading ----------------------------------------------------
    def submit(self, sql: str, table_name: str, submitter: str) -> QueryRecord:
        """Queue a query (already checked by the caller) and return its record."""
        query_id = uuid.uuid4().hex
        with self._transaction() as db:
            db.execute(
                "INSERT INTO queries (id, sql, table_name, submitter, state, submitted_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (query_id, sql, table_name, submitter, QueryState.QUEUED.value, time.time()),
            )
        return self.get(query_id)

    def get(self, query_id: str) -> QueryRecord:
        """One query; ``NotFoundError`` for an unknown id."""
        found = self._rows("SELECT * FROM queries WHERE id = ?", (query_id,))
        if not found:
            raise NotFoundError(f"no query {query_id!r}")
        return found[0]

    def find(
        self,
        *,
        states: Iterable[QueryState] | None = None,
        submitter: str | None = None,
        limit: int = 100,
    ) -> list[QueryRecord]:
        """Queries, oldest first, of some states and one submitter when given."""
        where, args = ["1 = 1"], []
        if states is not None:
            wanted = [s.value for s in states]
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            args.extend(wanted)
        if submitter is not None:
            where.append("submitter = ?")
            args.append(submitter)
        sql = f"SELECT * FROM queries WHERE {' AND '.join(where)} ORDER BY submitted_at LIMIT ?"
        return self._rows(sql, [*args, limit])

    def states_of(self, query_ids: Iterable[str]) -> dict[str, QueryState]:
        ids = list(query_ids)
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        records = self._rows(f"SELECT * FROM queries WHERE id IN ({marks})", ids)
        return {r.id: r.state for r in records}

    # -- the worker's side -----------------------------------------------------------
    def claim(self, query_id: str, worker: str, units_total: int, route: str) -> bool:
        """Mark a queued query running on ``worker``; False if it is no longer queued."""
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE queries SET state = ?, worker = ?, units_total = ?, units_done = 0, "
                "units_shared = 0, route = ?, started_at = ?, heartbeat_at = ? "
                "WHERE id = ? AND state = ?",
                (
                    QueryState.RUNNING.value,
                    worker,
                    units_total,
                    route,
                    now,
                    now,
                    query_id,
                    QueryState.QUEUED.value,
                ),
            )
            return cursor.rowcount == 1

    def progress(self, worker: str, updates: Mapping[str, tuple[int, int]]) -> None:
        """Units done and shared of running queries, and the worker's heartbeat."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "UPDATE queries SET units_done = ?, units_shared = ?, heartbeat_at = ? "
                "WHERE id = ? AND state = ? AND worker = ?",
                [
                    (done, shared, now, query_id, QueryState.RUNNING.value, worker)
                    for query_id, (done, shared) in updates.items()
                ],
            )

    def finish(
        self,
        query_id: str,
        result_path: str,
        rows: int,
        *,
        units_done: int,
        units_shared: int,
        expiry_seconds: float,
    ) -> bool:
        """Record a result; False if the query was cancelled meanwhile."""
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE queries SET state = ?, result_path = ?, result_rows = ?, units_done = ?, "
                "units_shared = ?, finished_at = ?, expires_at = ? WHERE id = ? AND state = ?",
                (
                    QueryState.DONE.value,
                    result_path,
                    rows,
                    units_done,
                    units_shared,
                    now,
                    now + expiry_seconds,
                    query_id,
                    QueryState.RUNNING.value,
                ),
            )
            return cursor.rowcount == 1

    def fail(self, query_id: str, error: str, code: str = "failed") -> None:
        """End a queued or running query with an error."""
        with self._transaction() as db:
            db.execute(
                "UPDATE queries SET state = ?, error = ?, error_code = ?, finished_at = ? "
                "WHERE id = ? AND state IN (?, ?)",
                (
                    QueryState.FAILED.value,
                    error,
                    code,
                    time.time(),
                    query_id,
                    QueryState.QUEUED.value,
                    QueryState.RUNNING.value,
                ),
            )

    def cancel(self, query_id: str) -> QueryRecord:
        """Cancel a queued or running query (the worker drops it at its next unit); a
        finished query is left as it is. ``NotFoundError`` for an unknown id."""
        with self._transaction() as db:
            db.execute(
                "UPDATE queries SET state = ?, finished_at = ? WHERE id = ? AND state IN (?, ?)",
                (
                    QueryState.CANCELLED.value,
                    time.time(),
                    query_id,
                    QueryState.QUEUED.value,
                    QueryState.RUNNING.value,
                ),
            )
        return self.get(query_id)

    def requeue_stale(self, lease_seconds: float, worker: str | None = None) -> int:
        """Queue again the running queries whose worker went quiet for ``lease_seconds``
        (or every running query of ``worker``, at its start); returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE queries SET state = ?, worker = NULL, units_done = 0, units_shared = 0 "
                "WHERE state = ? AND (heartbeat_at < ? OR worker = ?)",
                (
                    QueryState.QUEUED.value,
                    QueryState.RUNNING.value,
                    time.time() - lease_seconds,
                    worker,
                ),
            )
            return cursor.rowcount

    def expire(self, now: float | None = None) -> list[str]:
        """Mark done queries past their expiry ``expired``; returns their result paths
        (for the caller to delete)."""
        moment = time.time() if now is None else now
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, result_path FROM queries WHERE state = ? AND expires_at < ?",
                (QueryState.DONE.value, moment),
            ).fetchall()
            db.executemany(
                "UPDATE queries SET state = ?, result_path = NULL WHERE id = ?",
                [(QueryState.EXPIRED.value, row["id"]) for row in rows],
            )
        return [row["result_path"] for row in rows if row["result_path"]]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> QueryRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
