"""``produce send``: ship an intermediate file's messages to the broker, resumably.

Messages go out persistent, in broker transactions of ``transaction_messages``,
each confirmed by the broker (a receipt for its commit). Up to ``in_flight``
transactions are written before the oldest is confirmed, so the broker commits
one while the next arrives. The file's send log is updated around every
transaction (``sent`` before it is written, ``confirmed`` once the broker has
confirmed it), so a re-run after a crash sends exactly what was not confirmed,
with the same message ids; consumers drop what they already stored. A
transaction the broker did not confirm (a lost connection, a refusal, no answer
in time) is sent again once the transport has reconnected, for ``retry_seconds``.

With ``wait_seconds`` the sender also listens on the status topic and returns
once consumers have reported every message it sent as stored, or the time is
up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from eventindex.errors import EventIndexError
from eventindex.status import (
    HEADER_SENT_AT,
    HEADER_STATUS_TYPE,
    BatchStored,
    FileSent,
    decode_status,
    encode_status,
)
from eventindex.transport import (
    EVENTS_QUEUE,
    STATUS_TOPIC,
    Confirmation,
    Transport,
    TransportError,
)
from producers.eifile import EventIndexFile, StoredMessage

log = logging.getLogger(__name__)

HEADER_MESSAGE_ID = "eventindex-message-id"
HEADER_DATASET = "eventindex-dataset"
# Transactions written and not yet confirmed, at most: two keep the broker busy.
IN_FLIGHT = 2


@dataclass
class SendReport:
    """What one ``send`` did; ``stored`` is None when it did not wait."""

    path: str
    dataset: str
    guid: str
    events: int
    messages: int
    messages_sent: int = 0
    events_sent: int = 0
    messages_already_confirmed: int = 0
    bytes_sent: int = 0
    retries: int = 0
    seconds: float = 0.0
    stored: bool | None = None
    messages_not_stored: int = 0
    sent_ids: set[str] = field(default_factory=set, repr=False)

    def as_dict(self) -> dict[str, object]:
        fields = dict(vars(self))
        fields.pop("sent_ids")
        return fields


@dataclass
class _InFlight:
    """A transaction written to the broker: its confirmation, or why it was not written."""

    batch: list[StoredMessage]
    confirmation: Confirmation | None
    failure: TransportError | None = None


class FileSender:
    """Sends ``.ei`` files over one transport."""

    def __init__(
        self,
        transport: Transport,
        *,
        transaction_messages: int = 1000,
        retry_seconds: float = 120.0,
        destination: str = EVENTS_QUEUE,
        in_flight: int = IN_FLIGHT,
    ) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self.transport = transport
        self.in_flight = in_flight
        self.transaction_messages = transaction_messages
        self.retry_seconds = retry_seconds
        self.destination = destination
        self._status_subscription: str | None = None
        self._stored: set[str] = set()  # message ids consumers reported stored

    def listen(self) -> None:
        """Subscribe to the status topic, before sending, to ``wait_stored`` afterwards."""
        if self._status_subscription is None:
            self._status_subscription = self.transport.subscribe(STATUS_TOPIC, prefetch=100_000)

    def send(
        self,
        path: Path,
        *,
        wait_seconds: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SendReport:
        """Send what of ``path`` is not confirmed yet; ``progress`` gets events sent.

        With ``wait_seconds``, then wait that long at most for the consumers to report
        every message sent now as stored (``report.stored``).
        """
        if wait_seconds is not None:
            self.listen()
        started = time.perf_counter()
        with EventIndexFile(path) as ei:
            header = ei.header
            report = SendReport(
                path=str(path),
                dataset=header.dataset,
                guid=header.guid,
                events=header.events,
                messages=header.messages,
            )
            confirmed = ei.state_counts().get("confirmed", (0, 0))
            report.messages_already_confirmed = confirmed[0]
            if progress is not None and confirmed[1]:
                progress(confirmed[1])
            window: deque[_InFlight] = deque()
            batch: list[StoredMessage] = []
            for message in ei.messages(unconfirmed_only=True):
                batch.append(message)
                if len(batch) >= self.transaction_messages:
                    self._write(ei, batch, window, report, progress)
                    batch = []
                    if self._status_subscription is not None:
                        self._drain_status(timeout=0)
            if batch:
                self._write(ei, batch, window, report, progress)
            while window:
                self._settle_oldest(ei, window, report, progress)
            report.seconds = time.perf_counter() - started
            self._publish_statistics(report, header.producer, header.collection)
        if wait_seconds is not None:
            self.wait_stored([report], wait_seconds)
            report.seconds = time.perf_counter() - started
        return report

    def wait_stored(self, reports: list[SendReport], wait_seconds: float) -> bool:
        """Wait until consumers reported every message these sends sent as stored, for
        ``wait_seconds`` at most; sets ``stored`` and ``messages_not_stored`` of each."""
        if self._status_subscription is None:
            raise TransportError("wait_stored needs listen() before the sends")
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if all(not (r.sent_ids - self._stored) for r in reports):
                break
            self._drain_status(timeout=min(0.5, max(deadline - time.monotonic(), 0)))
        for report in reports:
            missing = report.sent_ids - self._stored
            report.stored = not missing
            report.messages_not_stored = len(missing)
        return all(report.stored for report in reports)

    def _write(
        self,
        ei: EventIndexFile,
        batch: list[StoredMessage],
        window: deque[_InFlight],
        report: SendReport,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Log ``batch`` as sent and write it as a transaction, after confirming the
        oldest ones while ``in_flight`` are open."""
        while len(window) >= self.in_flight:
            self._settle_oldest(ei, window, report, progress)
        ei.mark_sent(m.seq for m in batch)
        window.append(self._transmit(batch))

    def _transmit(self, batch: list[StoredMessage]) -> _InFlight:
        try:
            if not self.transport.connected:
                self.transport.connect()
            confirmation = self.transport.send_transaction(
                self.destination,
                [(m.payload, {HEADER_MESSAGE_ID: m.message_id}) for m in batch],
                headers={HEADER_SENT_AT: f"{time.time():.6f}"},
                persistent=True,
            )
        except TransportError as exc:
            return _InFlight(batch, None, exc)
        return _InFlight(batch, confirmation)

    def _settle_oldest(
        self,
        ei: EventIndexFile,
        window: deque[_InFlight],
        report: SendReport,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Wait for the oldest open transaction; one the broker did not confirm is
        written again (reconnecting as needed) until it is, for ``retry_seconds``."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        oldest = window[0]
        while True:
            try:
                if oldest.confirmation is None:
                    raise oldest.failure or TransportError("transaction not written")
                oldest.confirmation.wait()
                break
            except TransportError as exc:
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"giving up after {self.retry_seconds:.0f} s of broker failures: {exc}"
                    ) from exc
                report.retries += 1
                log.warning("transaction not confirmed (%s); again in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                oldest = window[0] = self._transmit(oldest.batch)
        window.popleft()
        batch = oldest.batch
        ei.mark_confirmed(m.seq for m in batch)
        report.sent_ids.update(m.message_id for m in batch)
        events = sum(m.events for m in batch)
        report.messages_sent += len(batch)
        report.events_sent += events
        report.bytes_sent += sum(len(m.payload) for m in batch)
        if progress is not None:
            progress(events)

    def _retrying(self, action: Callable[[], None], report: SendReport) -> None:
        """Run ``action``; on a transport failure reconnect and run it again, for a while."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while True:
            try:
                if not self.transport.connected:
                    self.transport.connect()
                action()
                return
            except TransportError as exc:
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"giving up after {self.retry_seconds:.0f} s of broker failures: {exc}"
                    ) from exc
                report.retries += 1
                log.warning("send failed (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _publish_statistics(self, report: SendReport, producer: str, collection: str) -> None:
        status = FileSent(
            producer=producer,
            collection=collection,
            dataset=report.dataset,
            guid=report.guid,
            events=report.events,
            messages=report.messages,
            bytes=report.bytes_sent,
            seconds=round(report.seconds, 6),
            messages_sent_now=report.messages_sent,
        )
        body = encode_status(status)
        self._retrying(
            lambda: self.transport.send(
                STATUS_TOPIC, body, {HEADER_STATUS_TYPE: status.type}, persistent=False
            ),
            report,
        )

    def _drain_status(self, timeout: float) -> None:
        """Take the status messages that arrive within ``timeout`` s."""
        message = self.transport.receive(timeout=timeout)
        while message is not None:
            # A topic message: losing its acknowledgement costs nothing.
            with contextlib.suppress(TransportError):
                self.transport.ack(message)
            try:
                status = decode_status(message.body)
            except EventIndexError as exc:
                log.warning("ignoring a bad status message: %s", exc)
            else:
                if isinstance(status, BatchStored):
                    self._stored.update(status.message_ids)
            message = self.transport.receive(timeout=0)

    def close(self) -> None:
        """Stop listening to the status topic."""
        if self._status_subscription is not None:
            with contextlib.suppress(TransportError):
                self.transport.unsubscribe(self._status_subscription)
            self._status_subscription = None


__all__ = ["HEADER_MESSAGE_ID", "FileSender", "SendReport"]
