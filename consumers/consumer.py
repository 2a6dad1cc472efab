"""The consumer: validate messages, batch events per dataset, store, register, then ack.

One :class:`EventConsumer` owns one transport subscription. ``run_once`` takes
what the broker delivered for a short while and flushes when a threshold is
reached (events, message bytes, seconds since the oldest pending message, or
the prefetch window being full: the broker sends no more until we ack). A flush
writes one map-file TagFile per dataset through ``FilesetWriter`` (sorted by
run and event on the way), commits it in the catalog with the message ids it
absorbed, and only then acknowledges those messages. So:

* a crash (even SIGKILL) before the commit loses nothing: nothing was acked,
  the broker redelivers;
* a crash after the commit and before the acks makes the broker redeliver
  messages already stored: every flush first asks the catalog which of its
  message ids are already absorbed, and acknowledges those without storing them;
* after a lost connection the broker redelivers everything unacknowledged (maybe
  to another worker), so pending messages are dropped when the loss is seen; the
  files are written without a lock, then the absorbed-ids check and the commit run
  under ``flush_lock`` (a file lock shared by the workers of one machine on a
  SQLite catalog), so two workers handed the same message cannot both store it.

Acknowledgements are cumulative (``coalesce_acks``): every delivery is settled at
its flush at the latest, and the broker is told once for the run of them.

Invalid messages go to the dead-letter queue with the reason in
``HEADER_ERROR``, and are acknowledged; they are counted, never fatal.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Final

import pyarrow as pa

from catalog.base import Catalog
from catalog.fileset import FilesetWriter
from catalog.model import Dataset, TagFile
from eventindex.config import ConsumerSettings
from eventindex.creator import ensure_collection, ensure_dataset
from eventindex.errors import EventIndexError, NotFoundError, ValidationError
from eventindex.records.codec import MessageHeader, decode_events, decode_messages
from eventindex.records.schema import RecordKind
from eventindex.status import HEADER_SENT_AT, HEADER_STATUS_TYPE, BatchStored, encode_status
from eventindex.transport import (
    EVENTS_QUEUE,
    HEADER_ERROR,
    HEADER_ORIGINAL_DESTINATION,
    STATUS_TOPIC,
    Message,
    Transport,
    TransportError,
    dead_letter_queue,
)

log = logging.getLogger(__name__)
# Messages validated together when they have already arrived (see decode_messages).
DECODE_BATCH = 32

# Headers of ours that travel with a message into the dead-letter queue.
_KEPT_HEADER_PREFIX: Final = "eventindex-"
_MAX_REASON: Final = 1000


@dataclass
class ConsumerStats:
    """Counters of one consumer; ``latencies`` are send → committed, in seconds."""

    received: int = 0
    stored_messages: int = 0
    stored_events: int = 0
    duplicates: int = 0
    invalid: int = 0
    tagfiles: int = 0
    flushes: int = 0
    dropped_after_reconnect: int = 0
    failed_flushes: int = 0
    cpu_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float]:
        fields = dict(vars(self))
        fields.pop("latencies")
        return fields


@dataclass
class _Pending:
    message: Message
    header: MessageHeader
    table: pa.Table


@dataclass
class _DatasetBatch:
    items: list[_Pending] = field(default_factory=list)
    rows: int = 0


def dataset_from_header(header: MessageHeader) -> Dataset:
    """The catalog entry of a message's dataset; an ATLAS name gives format and tag."""
    parts = header.dataset.split(".")
    atlas = len(parts) >= 5 and parts[1].isdigit()
    return Dataset(
        name=header.dataset,
        collection=header.collection,
        format=parts[4] if atlas else "",
        processing_tag=".".join(parts[5:]) if atlas else "",
        project=parts[0] if atlas else "",
        stream=parts[2] if atlas else "",
        attributes={"run_number": str(int(parts[1]))} if atlas else {},
    )


class EventConsumer:
    """Consumes ``EVENTS_QUEUE`` into map-files; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        catalog: Catalog,
        writer: FilesetWriter,
        settings: ConsumerSettings,
        *,
        max_message_bytes: int,
        name: str = "",
        destination: str = EVENTS_QUEUE,
        clock: Callable[[], float] = time.monotonic,
        flush_lock: AbstractContextManager[object] | None = None,
    ) -> None:
        self.transport = transport
        self.catalog = catalog
        self.writer = writer
        self.settings = settings
        self.max_message_bytes = max_message_bytes
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.destination = destination
        self.clock = clock
        # Held from the absorbed-ids check to the commit, so that two workers given the
        # same redelivered message (after a lost connection) cannot both store it.
        self.flush_lock = flush_lock or nullcontext()
        self.stats = ConsumerStats()
        self._pending: dict[str, _DatasetBatch] = {}
        self._pending_ids: dict[str, _Pending] = {}
        self._repeats: list[Message] = []  # deliveries of an id already pending
        self._pending_messages = 0
        self._pending_rows = 0
        self._pending_bytes = 0
        self._oldest: float | None = None
        self._datasets: dict[str, Dataset] = {}
        self._subscription: str | None = None
        self._last_received = 0.0

    # -- connection -------------------------------------------------------------------

    def start(self) -> None:
        """Connect (if needed) and subscribe."""
        if not self.transport.connected:
            self.transport.connect()
        # Every delivery is settled (stored, dropped as stored, dead-lettered or nacked)
        # at its flush at the latest: cumulative acks then cost the broker far less.
        self._subscription = self.transport.subscribe(
            self.destination, prefetch=self.settings.prefetch, coalesce_acks=True
        )

    def _connection_lost(self) -> None:
        """The broker puts back what this connection held unacknowledged (the transport
        reconnects and subscribes again by itself): forget it, it comes again."""
        dropped = self._pending_messages + len(self._repeats)
        if dropped:
            log.warning("connection lost: dropping %d pending messages", dropped)
        self.stats.dropped_after_reconnect += dropped
        self._clear_pending()

    # -- the daemon loop -----------------------------------------------------------------

    def run_once(self, timeout: float = 0.5) -> int:
        """Handle what arrives within ``timeout`` s (at most a prefetch window), flushing
        when a threshold is reached; returns the messages handled."""
        if self._subscription is None:
            self.start()
        if not self.transport.connected:
            self._connection_lost()
            time.sleep(min(timeout, 0.5))
            return 0
        try:
            handled = 0
            idle = self.settings.flush_idle_seconds
            deadline = self.clock() + timeout
            while handled < self.settings.prefetch:
                remaining = deadline - self.clock()
                if remaining <= 0 and handled:
                    break
                message = self.transport.receive(timeout=max(min(remaining, idle), 0.0))
                if message is None:
                    # A quiet queue, or a broker that pages in no more until we ack.
                    if self._pending_messages and self.clock() - self._last_received >= idle:
                        self.flush()
                    if remaining <= 0:
                        break
                    continue
                self._last_received = self.clock()
                # What has already arrived is validated together: one Arrow assembly for
                # the lot costs a fraction of one per message.
                messages = [message]
                room = min(DECODE_BATCH, self.settings.prefetch - handled)
                while len(messages) < room:
                    more = self.transport.receive(timeout=0.0)
                    if more is None:
                        break
                    messages.append(more)
                self.handle_many(messages)
                handled += len(messages)
                if self._flush_due():
                    self.flush()
            if self._flush_due():
                self.flush()
            return handled
        except TransportError as exc:
            log.warning("transport failure: %s", exc)
            self._connection_lost()
            return 0

    def run(self, stop: threading.Event, *, once: bool = False, idle_seconds: float = 2.0) -> None:
        """Loop ``run_once`` until ``stop`` is set (or, ``once``, until the queue has been
        idle for ``idle_seconds``); then flush what is pending and unsubscribe."""
        idle_since = self.clock()
        while not stop.is_set():
            handled = self.run_once(timeout=min(0.5, self.settings.flush_seconds))
            if handled:
                idle_since = self.clock()
            elif once and self._pending_messages == 0 and self.clock() - idle_since > idle_seconds:
                break
            elif once and self.clock() - idle_since > idle_seconds:
                self.flush()
        try:
            self.flush()
        except TransportError as exc:
            log.warning("could not acknowledge the last batch (%s): it will be redelivered", exc)

    # -- messages ----------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Validate one message and add it to its dataset's batch, or dead-letter it."""
        self.stats.received += 1
        try:
            header, table = decode_events(message.body, max_bytes=self.max_message_bytes)
            self._check_dataset(header)
        except ValidationError as exc:
            self._dead_letter(message, exc)
            return
        except (ValueError, TypeError, ArithmeticError, RecursionError, MemoryError) as exc:
            # The decoder should have named this; a bad message must still never stop us.
            log.exception("decoder failed on message %s", message.message_id)
            self._dead_letter(message, ValidationError(f"undecodable: {type(exc).__name__}: {exc}"))
            return
        self._add(message, header, table)

    def handle_many(self, messages: list[Message]) -> None:
        """Validate several messages at once (each accepted or refused on its own, as
        :meth:`handle` would) and add each to its dataset's batch, or dead-letter it."""
        try:
            decoded = decode_messages([m.body for m in messages], max_bytes=self.max_message_bytes)
        except (ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
            # The batch decoder should have named the culprit; one by one finds it.
            log.exception("batch decode failed: validating %d messages one by one", len(messages))
            for message in messages:
                self.handle(message)
            return
        self.stats.received += len(messages)
        for index, error in decoded.errors:
            self._dead_letter(messages[index], error)
        offset = 0
        for header, index in zip(decoded.headers, decoded.accepted, strict=True):
            table = decoded.table.slice(offset, header.count)
            offset += header.count
            try:
                self._check_dataset(header)
            except ValidationError as exc:
                self._dead_letter(messages[index], exc)
                continue
            self._add(messages[index], header, table)
            if self._flush_due():  # thresholds hold per message, not per decoded batch
                self.flush()

    def _add(self, message: Message, header: MessageHeader, table: pa.Table) -> None:
        """Add a valid message to its dataset's batch (a repeat waits to be acked)."""
        if header.message_id in self._pending_ids:
            self._repeats.append(message)
            return
        pending = _Pending(message, header, table)
        self._pending_ids[header.message_id] = pending
        batch = self._pending.setdefault(header.dataset, _DatasetBatch())
        batch.items.append(pending)
        batch.rows += table.num_rows
        self._pending_messages += 1
        self._pending_rows += table.num_rows
        self._pending_bytes += len(message.body)
        if self._oldest is None:
            self._oldest = self.clock()

    def _check_dataset(self, header: MessageHeader) -> None:
        """The dataset must be new or belong to the message's collection of events."""
        known = self._datasets.get(header.dataset)
        if known is None:
            try:
                existing = self.catalog.get_dataset(header.dataset)
            except NotFoundError:
                existing = None
            if existing is None:
                try:
                    collection = self.catalog.get_collection(header.collection)
                except NotFoundError:
                    collection = None
                if collection is not None and collection.kind is not RecordKind.EVENTS:
                    raise ValidationError(
                        f"header.collection: {header.collection!r} holds "
                        f"{collection.kind.value}, not events"
                    )
                known = dataset_from_header(header)
            else:
                known = existing
            self._datasets[header.dataset] = known
        if known.collection != header.collection:
            raise ValidationError(
                f"header.collection: dataset {header.dataset!r} belongs to collection "
                f"{known.collection!r}, not {header.collection!r}"
            )

    def _dead_letter(self, message: Message, error: Exception) -> None:
        reason = " ".join(str(error).split())[:_MAX_REASON] or type(error).__name__
        headers = {k: v for k, v in message.headers.items() if k.startswith(_KEPT_HEADER_PREFIX)}
        headers[HEADER_ERROR] = reason
        headers[HEADER_ORIGINAL_DESTINATION] = message.destination or self.destination
        self.transport.send(
            dead_letter_queue(self.destination), message.body, headers, persistent=True
        )
        self.transport.ack(message)
        self.stats.invalid += 1
        log.info("dead-lettered message %s: %s", message.message_id, reason)

    # -- flushing ----------------------------------------------------------------------

    def _flush_due(self) -> bool:
        if not self._pending_messages:
            return bool(self._repeats) and len(self._repeats) >= self.settings.prefetch // 2
        settings = self.settings
        return (
            self._pending_rows >= settings.flush_rows
            or self._pending_bytes >= settings.flush_bytes
            or self._pending_messages + len(self._repeats) >= settings.prefetch
            or (self._oldest is not None and self.clock() - self._oldest >= settings.flush_seconds)
        )

    def _clear_pending(self) -> None:
        # New containers: flush still walks the ones it took.
        self._pending = {}
        self._pending_ids = {}
        self._repeats = []
        self._pending_messages = self._pending_rows = self._pending_bytes = 0
        self._oldest = None

    def flush(self) -> int:
        """Store every pending batch, then acknowledge; returns the events stored."""
        if not self._pending_messages and not self._repeats:
            return 0
        batches, repeats = self._pending, self._repeats
        self._clear_pending()
        self.stats.flushes += 1
        stored = self._store_batches(batches)
        self.stats.duplicates += len(repeats)
        self._ack_all(repeats)
        return stored

    def _ack_all(self, messages: list[Message]) -> None:
        """Acknowledge together, confirmed once by the broker (see ``Transport.ack_many``):
        a failure half way leaves the rest to be redelivered, and dropped as stored."""
        self.transport.ack_many(messages)

    def _store_batches(self, batches: dict[str, _DatasetBatch]) -> int:
        """Write a file per dataset, commit those whose messages no other file absorbed
        meanwhile, then acknowledge. Only the check and the commit hold ``flush_lock``:
        the workers write their files at the same time."""
        ids = [p.header.message_id for b in batches.values() for p in b.items]
        with self.flush_lock:
            absorbed = self.catalog.absorbed_message_ids(ids)
        prepared: list[tuple[str, list[_Pending], TagFile]] = []
        done: dict[str, list[_Pending]] = {}
        for name, batch in batches.items():
            fresh = [p for p in batch.items if p.header.message_id not in absorbed]
            done[name] = [p for p in batch.items if p.header.message_id in absorbed]
            if fresh:
                entry = self._prepare(name, fresh)
                if entry is not None:
                    prepared.append((name, fresh, entry))
        committed: list[tuple[str, list[_Pending], TagFile]] = []
        with self.flush_lock:
            # Another worker may have been handed the same messages (a producer's resend,
            # a redelivery after a lost connection) and committed them since the check.
            late = self.catalog.absorbed_message_ids(
                p.header.message_id for _, items, _ in prepared for p in items
            )
            for name, written, written_entry in prepared:
                items, entry = written, written_entry
                if late & set(entry.message_ids):
                    # Rare: write again, under the lock, without what is now stored.
                    self.writer.discard(entry)
                    done[name].extend(p for p in written if p.header.message_id in late)
                    items = [p for p in written if p.header.message_id not in late]
                    retry = self._prepare(name, items) if items else None
                    if retry is None:
                        continue
                    entry = retry
                try:
                    committed.append((name, items, self.writer.commit(entry)))
                except EventIndexError as exc:
                    self._refuse(name, items, exc)
        stored = sum(self._stored(name, items, entry) for name, items, entry in committed)
        for name, items in done.items():
            if items:
                self.stats.duplicates += len(items)
                self._ack_all([p.message for p in items])
                self._publish(
                    BatchStored(
                        consumer=self.name,
                        collection=items[0].header.collection,
                        dataset=name,
                        file_id="",
                        events=0,
                        message_ids=[p.header.message_id for p in items],
                        committed_at=time.time(),
                    )
                )
        return stored

    def _prepare(self, name: str, items: list[_Pending]) -> TagFile | None:
        """Write the file of ``items`` (not yet committed); None if that failed, and then
        the messages are refused."""
        dataset = self._datasets[name]
        header = items[0].header
        table = pa.concat_tables([p.table for p in items]) if len(items) > 1 else items[0].table
        try:
            ensure_collection(self.catalog, header.collection, RecordKind.EVENTS)
            ensure_dataset(self.catalog, dataset)
            return self.writer.prepare(
                table, dataset, message_ids=[p.header.message_id for p in items]
            )
        except TransportError:
            raise  # the connection, not the data: run_once starts afresh
        except EventIndexError as exc:
            self._refuse(name, items, exc)
            return None

    def _refuse(self, name: str, items: list[_Pending], error: EventIndexError) -> None:
        """Storing failed: nack, so the broker redelivers (and dead-letters after its limit)."""
        log.error("storing %d messages of %s failed: %s", len(items), name, error)
        self.stats.failed_flushes += 1
        for pending in items:
            self.transport.nack(pending.message)

    def _stored(self, name: str, items: list[_Pending], entry: TagFile) -> int:
        """After the commit: acknowledge, count, and announce the batch."""
        committed = entry.committed_at or time.time()
        self._ack_all([p.message for p in items])
        for pending in items:
            sent_at = pending.message.headers.get(HEADER_SENT_AT)
            if sent_at:
                with suppress(ValueError):
                    self.stats.latencies.append(committed - float(sent_at))
        guids: dict[str, int] = {}
        for pending in items:
            guids[pending.header.guid] = guids.get(pending.header.guid, 0) + pending.header.count
        self.stats.tagfiles += 1
        self.stats.stored_messages += len(items)
        self.stats.stored_events += entry.rows
        self._publish(
            BatchStored(
                consumer=self.name,
                collection=items[0].header.collection,
                dataset=name,
                file_id=entry.file_id,
                events=entry.rows,
                guids=guids,
                message_ids=list(entry.message_ids),
                committed_at=committed,
            )
        )
        return entry.rows

    def _publish(self, status: BatchStored) -> None:
        try:
            self.transport.send(
                STATUS_TOPIC,
                encode_status(status),
                {HEADER_STATUS_TYPE: status.type},
                persistent=False,
            )
        except TransportError as exc:  # status is informative; storage already happened
            log.warning("could not publish status: %s", exc)

    def close(self) -> None:
        """Unsubscribe: anything not acknowledged goes back to the broker."""
        if self._subscription is not None and self.transport.connected:
            with suppress(TransportError):
                self.transport.unsubscribe(self._subscription)
        self._subscription = None


__all__ = ["ConsumerStats", "EventConsumer", "dataset_from_header"]
