"""The intermediate EventIndex file (``.ei``): one SQLite file per producer output file.

A processing job extracts its events into this file, and a sender ships it to
the broker, possibly much later and more than once (after a crash). It holds:

* ``header``: what every message of the file says about itself (producer,
  collection, dataset, output file GUID, task and job ids), the event and
  message counts, the input files and when it was made;
* ``messages``: the events, already encoded as wire messages
  (``eventindex.records.codec``, columnar JSON, ~70 bytes an event: as compact
  as Arrow IPC with zstd) in sequence order, each with its unique message id;
* ``send_log``: per message, ``sent`` (handed to an open broker transaction) and
  then ``confirmed`` (the broker confirmed the commit), with the times; a
  message without a row is ``new``.

Messages are built once, when the file is made, because encoding costs far
more than sending; a re-run of the sender ships exactly the same bytes under
the same ids for whatever is not ``confirmed``, so consumers can drop what they
already stored.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import pyarrow as pa

from eventindex.errors import ValidationError
from eventindex.records.codec import MessageHeader, decode_events, encode_message_batches
from eventindex.records.schema import EVENT_SCHEMA

FILE_FORMAT: Final = "eventindex-intermediate"
FILE_VERSION: Final = 1

STATE_NEW: Final = "new"
STATE_SENT: Final = "sent"
STATE_CONFIRMED: Final = "confirmed"

_SCHEMA: Final = """
CREATE TABLE header (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    events INTEGER NOT NULL,
    payload BLOB NOT NULL
);
-- The send log apart from the payloads: updating a row rewrites all of it.
CREATE TABLE send_log (
    seq INTEGER PRIMARY KEY REFERENCES messages (seq),
    state TEXT NOT NULL,
    sent_at REAL,
    confirmed_at REAL
);
"""


class EventIndexFileError(ValidationError):
    """A ``.ei`` file is missing, not an EventIndex file, or inconsistent."""


@dataclass(frozen=True)
class FileHeader:
    """Who made the file and what it holds; the same fields as every message header."""

    producer: str
    collection: str
    dataset: str
    guid: str
    task_id: str
    job_id: str
    events: int = 0
    messages: int = 0
    message_bytes: int = 0
    created_at: float = field(default_factory=time.time)
    sources: tuple[str, ...] = ()

    def message_template(self, message_id: str) -> MessageHeader:
        """A message header for this file; raises ``MessageError`` naming a bad field."""
        return MessageHeader(
            producer=self.producer,
            message_id=message_id,
            dataset=self.dataset,
            collection=self.collection,
            guid=self.guid,
            task_id=self.task_id,
            job_id=self.job_id,
            count=0,
        )


@dataclass(frozen=True)
class StoredMessage:
    seq: int
    message_id: str
    events: int
    payload: bytes
    state: str


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # WAL + NORMAL: a crash can lose the last log update, never corrupt the file; a
    # lost "confirmed" only means the message is sent again, and consumers drop it.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class EventIndexFileWriter:
    """Builds a new ``.ei`` file under a temporary name; ``close`` renames it into place.

    Tables given to ``write`` are encoded into messages of about ``message_bytes``;
    message ids are ``GUID.PART:INDEX``, ``PART`` counting the ``write`` calls.
    """

    def __init__(self, path: Path, header: FileHeader, *, message_bytes: int) -> None:
        header.message_template("check")  # refuse a bad GUID or empty field up front
        self.path = path
        self.header = header
        self.message_bytes = message_bytes
        self._temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._temporary.unlink(missing_ok=True)
        self._conn = _connect(self._temporary)
        self._conn.executescript(_SCHEMA)
        self._parts = 0
        self._seq = 0
        self._events = 0
        self._done = False
        self.written: FileHeader | None = None

    def write(self, table: pa.Table) -> int:
        """Encode and store the rows of ``table``; returns the messages made."""
        if self._done:
            raise EventIndexFileError(f"{self.path}: writer is closed")
        if table.num_rows == 0:
            return 0
        template = self.header.message_template(f"{self.header.guid}.{self._parts}")
        self._parts += 1
        rows = []
        for message_header, payload in encode_message_batches(table, template, self.message_bytes):
            rows.append((self._seq, message_header.message_id, message_header.count, payload))
            self._seq += 1
            self._events += message_header.count
        self._conn.execute("BEGIN")
        self._conn.executemany(
            "INSERT INTO messages (seq, message_id, events, payload) VALUES (?, ?, ?, ?)", rows
        )
        self._conn.execute("COMMIT")
        return len(rows)

    def close(self) -> FileHeader:
        """Write the header and move the file into place (replacing nothing older)."""
        if self._done:
            raise EventIndexFileError(f"{self.path}: writer is closed")
        header = FileHeader(
            **{
                **asdict(self.header),
                "events": self._events,
                "messages": self._seq,
                "message_bytes": self.message_bytes,
                "sources": tuple(self.header.sources),
            }
        )
        values = {
            "format": FILE_FORMAT,
            "version": str(FILE_VERSION),
            **{k: _header_text(v) for k, v in asdict(header).items()},
        }
        self._conn.execute("BEGIN")
        self._conn.executemany("INSERT INTO header (key, value) VALUES (?, ?)", values.items())
        self._conn.execute("COMMIT")
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._done = True
        self._temporary.replace(self.path)
        self.written = header
        return header

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._conn.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self._temporary}{suffix}").unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _header_text(value: object) -> str:
    return json.dumps(list(value)) if isinstance(value, tuple | list) else str(value)


class EventIndexFile:
    """An existing ``.ei`` file: its header, its messages, and its send log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise EventIndexFileError(f"{path}: no such EventIndex file")
        try:
            self._conn = _connect(path)
            values = dict(self._conn.execute("SELECT key, value FROM header").fetchall())
        except sqlite3.DatabaseError as exc:
            raise EventIndexFileError(f"{path}: not an EventIndex file ({exc})") from None
        if values.get("format") != FILE_FORMAT:
            self._conn.close()
            raise EventIndexFileError(f"{path}: not an EventIndex file (no {FILE_FORMAT} header)")
        if values.get("version") != str(FILE_VERSION):
            self._conn.close()
            raise EventIndexFileError(
                f"{path}: file version {values.get('version')}, this reader knows {FILE_VERSION}"
            )
        self.header = FileHeader(
            producer=values["producer"],
            collection=values["collection"],
            dataset=values["dataset"],
            guid=values["guid"],
            task_id=values["task_id"],
            job_id=values["job_id"],
            events=int(values["events"]),
            messages=int(values["messages"]),
            message_bytes=int(values["message_bytes"]),
            created_at=float(values["created_at"]),
            sources=tuple(json.loads(values["sources"])),
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def messages(self, *, unconfirmed_only: bool = False) -> Iterator[StoredMessage]:
        """Stored messages in sequence order (only those not yet confirmed, if asked)."""
        query = (
            "SELECT m.seq, m.message_id, m.events, m.payload, COALESCE(l.state, ?)"
            " FROM messages m LEFT JOIN send_log l ON l.seq = m.seq"
        )
        if unconfirmed_only:
            query += " WHERE l.state IS NULL OR l.state != ?"
        parameters = (STATE_NEW, STATE_CONFIRMED) if unconfirmed_only else (STATE_NEW,)
        cursor = self._conn.execute(query + " ORDER BY m.seq", parameters)
        while rows := cursor.fetchmany(512):
            for seq, message_id, events, payload, state in rows:
                yield StoredMessage(seq, message_id, events, bytes(payload), state)

    def state_counts(self) -> dict[str, tuple[int, int]]:
        """State → (messages, events)."""
        return {
            state: (messages, events)
            for state, messages, events in self._conn.execute(
                "SELECT COALESCE(l.state, ?), COUNT(*), COALESCE(SUM(m.events), 0)"
                " FROM messages m LEFT JOIN send_log l ON l.seq = m.seq"
                " GROUP BY COALESCE(l.state, ?)",
                (STATE_NEW, STATE_NEW),
            )
        }

    def mark_sent(self, seqs: Iterable[int]) -> None:
        """Record messages handed to an open broker transaction."""
        now = time.time()
        self._conn.execute("BEGIN")
        self._conn.executemany(
            "INSERT OR REPLACE INTO send_log (seq, state, sent_at) VALUES (?, ?, ?)",
            [(seq, STATE_SENT, now) for seq in seqs],
        )
        self._conn.execute("COMMIT")

    def mark_confirmed(self, seqs: Iterable[int]) -> None:
        """Record messages whose transaction the broker confirmed."""
        now = time.time()
        self._conn.execute("BEGIN")
        self._conn.executemany(
            "UPDATE send_log SET state = ?, confirmed_at = ? WHERE seq = ?",
            [(STATE_CONFIRMED, now, seq) for seq in seqs],
        )
        self._conn.execute("COMMIT")

    def reset_log(self) -> None:
        """Forget the send log, so that everything is sent again (same ids)."""
        self._conn.execute("DELETE FROM send_log")

    def read_table(self) -> pa.Table:
        """Every event of the file, decoded (and so validated) from its messages."""
        tables = [
            decode_events(m.payload, max_bytes=max(len(m.payload), 1024))[1]
            for m in self.messages()
        ]
        if not tables:
            return EVENT_SCHEMA.empty_table()
        return pa.concat_tables(tables)
