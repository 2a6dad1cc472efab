"""ActiveMQ over STOMP 1.2, through stomp.py.

* Failover: stomp.py tries the brokers of the URL in order, with the configured
  waits between rounds; after a lost connection a reconnector thread opens a new
  one and subscribes again to everything this transport was subscribed to.
* Heart-beats in both directions. stomp.py's receiver thread only puts frames on
  an internal queue; the caller's ``receive`` does the rest, so heart-beats keep
  flowing however long a consumer works on a message.
* Confirmed sends: a send outside a transaction carries a receipt request and
  returns once the RECEIPT arrives. A send whose connection dropped before its
  receipt is sent again after reconnection (at least once: consumers deduplicate
  by the producer's sequence id), and waiting is bounded: ``ConfirmationTimeoutError``.
* Bulk paths, for the rates the producers and consumers need: ``send_transaction``
  writes BEGIN, every SEND and a COMMIT asking for a receipt as ready-made frames,
  many to a system call, and returns without waiting, so the next transaction goes
  out while the broker commits this one; ``ack_many`` writes the ACK frames, then
  an empty transaction whose receipt confirms them (a receipt on an ACK makes
  ActiveMQ sync its journal once per message the ACK covers). They skip stomp.py's
  per-frame header handling, never its socket lock (heart-beats go between whole
  frames). An ERROR frame that names no receipt (a failed transacted SEND says
  nothing more) fails every transaction awaiting its commit receipt: it is sent
  again, never half kept.
* Acknowledgements are ``client-individual`` with ``activemq.prefetchSize`` as the
  prefetch. ``ack_many`` does not use a transaction: ActiveMQ's STOMP commit
  compares every acknowledged message with every unacknowledged one (quadratic in
  the prefetch window), while plain ACKs cost the same one by one. A subscription
  made with ``coalesce_acks`` is a ``client`` one instead: the transport keeps its
  deliveries in order and sends one cumulative ACK for the longest run of settled
  ones, which costs the broker a third of one ACK a message. A message
  delivered on an earlier connection cannot be acknowledged on a new one: the
  broker has already put it back for redelivery, so such an ack or nack is dropped
  (and logged), and a transaction begun on a lost connection fails.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import stomp
import stomp.protocol
from stomp.exception import ConnectFailedException, StompException

from eventindex.config import BrokerSettings
from eventindex.transport.base import (
    HEADER_ERROR,
    HEADER_ORIGINAL_DESTINATION,
    Confirmation,
    ConfirmationTimeoutError,
    ConnectionLostError,
    Message,
    Transport,
    TransportError,
    check_destination,
)

log = logging.getLogger(__name__)

PREFETCH_HEADER = "activemq.prefetchSize"
# ActiveMQ's names for why and whence a message went to a dead-letter queue.
ACTIVEMQ_DLQ_CAUSE = "dlqDeliveryFailureCause"
ACTIVEMQ_ORIGINAL_DESTINATION = "original-destination"
HEARTBEAT_RECEIVE_SCALE = 2.5
DLQ_REASON = "moved to the dead-letter queue by the broker: delivery failed too many times"
# How long close() waits for the broker to confirm DISCONNECT.
DISCONNECT_WAIT_S = 5.0
# Ready-made frames are written in pieces of about this size: one system call each,
# and whole frames only, so that a heart-beat never lands inside one.
WRITE_CHUNK_BYTES = 1 << 20
# STOMP 1.2 header escapes, as stomp.py applies them.
_HEADER_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c"})


@dataclass
class _Pending:
    """A frame waiting for its RECEIPT; ``error`` set by an ERROR frame or a lost connection.
    ``stray_errors``: an ERROR frame naming no receipt fails it too (transacted sends)."""

    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    lost: bool = False
    stray_errors: bool = False


@dataclass(frozen=True)
class _Subscribed:
    destination: str
    prefetch: int
    coalesce: bool = False


@dataclass
class _AckOrder:
    """The deliveries of a subscription whose acks are coalesced, oldest first, on one
    connection (``generation``): what the broker's cumulative ACK walks."""

    generation: int
    unsettled: deque[str] = field(default_factory=deque)
    # Acked (True) or nacked (False) while an older delivery is still unsettled.
    outcome: dict[str, bool] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self, ack: str) -> None:
        with self.lock:
            self.unsettled.append(ack)

    def settle(self, acks: Iterable[str], *, acked: bool) -> str | None:
        """Record acks (or nacks); returns the newest acked delivery that now has every
        older one settled, for one cumulative ACK (None: nothing new to send)."""
        with self.lock:
            for ack in acks:
                self.outcome[ack] = acked
            newest = None
            while self.unsettled and self.unsettled[0] in self.outcome:
                ack = self.unsettled.popleft()
                if self.outcome.pop(ack):
                    newest = ack
            return newest


class _Listener(stomp.ConnectionListener):  # type: ignore[misc]
    """Runs on stomp.py's receiver thread: records what arrived and returns at once."""

    def __init__(self, owner: StompTransport, generation: int) -> None:
        self.owner = owner
        self.generation = generation
        self.connected = threading.Event()
        self.refusal: str | None = None

    def on_connected(self, frame: Any) -> None:
        self.connected.set()

    def on_message(self, frame: Any) -> None:
        if self.owner._ack_orders:
            self.owner._delivered(self.generation, frame.headers)
        self.owner._inbox.put((self.generation, frame.headers, frame.body))

    def on_receipt(self, frame: Any) -> None:
        self.owner._confirm(frame.headers.get("receipt-id", ""), None)

    def on_error(self, frame: Any) -> None:
        message = frame.headers.get("message", "") or _text(frame.body)
        receipt = frame.headers.get("receipt-id")
        if not self.connected.is_set():
            self.refusal = message or "the broker refused the connection"
            self.connected.set()
        elif receipt:
            self.owner._confirm(receipt, message or "ERROR frame without a message")
        else:
            log.warning("broker error: %s", message)
            self.owner._stray_error(message or "ERROR frame without a message")

    def on_disconnected(self) -> None:
        self.owner._lost(self.generation)

    def on_heartbeat_timeout(self) -> None:
        log.warning("no heart-beat from the broker: the connection is considered lost")


class _ReceiptConfirmation(Confirmation):
    """Waits for the RECEIPT of one frame; registered before the frame is written."""

    def __init__(self, owner: StompTransport, receipt: str, *, stray_errors: bool = False) -> None:
        self.owner = owner
        self.receipt = receipt
        self.pending = owner._pending[receipt] = _Pending(stray_errors=stray_errors)
        self.outcome: TransportError | None = None
        self.settled = False

    def forget(self) -> None:
        self.owner._pending.pop(self.receipt, None)

    def wait(self, timeout: float | None = None) -> None:
        if not self.settled:
            self.outcome = self._outcome(timeout)
            self.settled = True
            self.forget()
        if self.outcome is not None:
            raise self.outcome

    def _outcome(self, timeout: float | None) -> TransportError | None:
        where = self.owner.description
        timeout = self.owner.settings.receipt_timeout_s if timeout is None else timeout
        if not self.pending.done.wait(timeout):
            return ConfirmationTimeoutError(f"{where} did not confirm within {timeout:g} s")
        if self.pending.error is not None:
            return TransportError(f"{where} refused: {self.pending.error}")
        if self.pending.lost:
            return ConnectionLostError(f"connection to {where} lost before the receipt")
        return None


def _header_lines(headers: Mapping[str, str]) -> str:
    """Header lines of a frame, escaped as STOMP 1.2 asks."""
    return "".join(
        f"{key.translate(_HEADER_ESCAPES)}:{value.translate(_HEADER_ESCAPES)}\n"
        for key, value in headers.items()
    )


def _text(body: Any) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace").strip()
    return str(body or "").strip()


class StompTransport(Transport):
    """A STOMP connection to one of ``addresses`` (tried in order)."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        settings: BrokerSettings | None = None,
        *,
        use_ssl: bool = False,
    ) -> None:
        if not addresses:
            raise TransportError("no broker address to connect to")
        self.addresses = addresses
        self.settings = settings or BrokerSettings()
        self.use_ssl = use_ssl
        self._lock = threading.RLock()
        self._connection: stomp.Connection12 | None = None
        self._generation = 0
        self._up = threading.Event()
        self._reconnect_needed = threading.Event()
        self._closing = False
        self._opened = False
        self._reconnector: threading.Thread | None = None
        self._subscriptions: dict[str, _Subscribed] = {}
        self._ack_orders: dict[str, _AckOrder] = {}
        self._subscription_ids = itertools.count(1)
        self._transactions: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._inbox: queue.Queue[tuple[int, dict[str, str], Any]] = queue.Queue()

    @property
    def description(self) -> str:
        scheme = "stomp+ssl" if self.use_ssl else "stomp"
        return f"{scheme}://" + ",".join(f"{host}:{port}" for host, port in self.addresses)

    # Connection life cycle.

    def connect(self) -> None:
        if self._up.is_set():
            return
        with self._lock:
            self._closing = False
            self._reconnect_needed.clear()
        self._open()
        self._opened = True
        if self._reconnector is None or not self._reconnector.is_alive():
            self._reconnector = threading.Thread(
                target=self._reconnect_loop, name="stomp-reconnector", daemon=True
            )
            self._reconnector.start()

    def _open(self) -> None:
        """Open a new connection and subscribe again; raises TransportError if none answers."""
        settings = self.settings
        connection = stomp.Connection12(
            host_and_ports=self.addresses,
            prefer_localhost=False,
            try_loopback_connect=False,
            reconnect_sleep_initial=settings.reconnect_delay_s,
            reconnect_sleep_increase=0.5,
            reconnect_sleep_max=settings.reconnect_delay_max_s,
            reconnect_attempts_max=settings.reconnect_attempts,
            timeout=settings.receipt_timeout_s,
            heartbeats=(settings.heartbeat_ms, settings.heartbeat_ms),
            # ActiveMQ sends its heart-beat up to two periods apart: allow for that.
            heart_beat_receive_scale=HEARTBEAT_RECEIVE_SCALE,
            auto_decode=False,
        )
        if self.use_ssl:
            connection.set_ssl(
                for_hosts=self.addresses,
                key_file=settings.ssl_key_file or None,
                cert_file=settings.ssl_cert_file or None,
                ca_certs=settings.ssl_ca_file or None,
            )
        with self._lock:
            self._generation += 1
            listener = _Listener(self, self._generation)
        connection.set_listener("eventindex", listener)
        try:
            connection.connect(
                settings.user or None,
                settings.password or None,
                wait=False,
                with_connect_command=True,
            )
        except (ConnectFailedException, OSError, StompException) as exc:
            raise TransportError(
                f"cannot connect to {self.description} after "
                f"{settings.reconnect_attempts} attempts: {exc or type(exc).__name__}"
            ) from exc
        if not listener.connected.wait(settings.receipt_timeout_s) or listener.refusal:
            _drop(connection)
            reason = listener.refusal or "no CONNECTED frame in time"
            raise TransportError(f"{self.description} refused the connection: {reason}")
        with self._lock:
            if self._closing:
                _drop(connection)
                raise TransportError(f"transport to {self.description} closed while connecting")
            self._connection = connection
            self._up.set()
            subscriptions = list(self._subscriptions.items())
        for subscription, subscribed in subscriptions:
            self._subscribe_frame(connection, subscription, subscribed)
        log.info("connected to %s:%s", *connection.transport.current_host_and_port)

    def _lost(self, generation: int) -> None:
        """Called on the receiver thread when a connection ends."""
        with self._lock:
            if generation != self._generation:
                return
            self._up.clear()
            for pending in self._pending.values():
                pending.lost = True
                pending.done.set()
            if not self._closing:
                log.warning("connection to %s lost; reconnecting", self.description)
                self._reconnect_needed.set()

    def _reconnect_loop(self) -> None:
        # Connecting can take many tries: the lock is not held meanwhile, so acks,
        # receives and close() never wait behind it.
        while True:
            self._reconnect_needed.wait()
            with self._lock:
                if self._closing:
                    return
                self._reconnect_needed.clear()
                stale, self._connection = self._connection, None
                # Retire its generation first: closing it must not ask for yet another reconnection.
                self._generation += 1
            if stale is not None:
                _drop(stale)
            try:
                self._open()
            except TransportError as exc:
                if self._closing:
                    return
                log.warning("%s; trying again", exc)
                self._reconnect_needed.set()
                time.sleep(self.settings.reconnect_delay_max_s)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._opened = False
            connection, self._connection = self._connection, None
            self._up.clear()
            self._subscriptions.clear()
            self._ack_orders.clear()
            self._transactions.clear()
            self._reconnect_needed.set()
        if connection is not None and connection.is_connected():
            try:
                self._request(connection, lambda receipt: _send_disconnect(connection, receipt))
            except TransportError as exc:
                log.debug("disconnect not confirmed: %s", exc)
        if connection is not None:
            _drop(connection)
        if self._reconnector is not None and self._reconnector is not threading.current_thread():
            self._reconnector.join(timeout=DISCONNECT_WAIT_S)
        self._reconnector = None
        self._clear_inbox()

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def _clear_inbox(self) -> None:
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                return

    # Frames that wait for a RECEIPT.

    def _confirm(self, receipt: str, error: str | None) -> None:
        pending = self._pending.get(receipt)
        if pending is not None:
            pending.error = error
            pending.done.set()

    def _stray_error(self, message: str) -> None:
        """An ERROR frame that names no receipt: fail what it may concern."""
        for pending in list(self._pending.values()):
            if pending.stray_errors:
                pending.error = f"{message} (while a transaction awaited its commit)"
                pending.done.set()

    def _request(
        self,
        connection: stomp.Connection12,
        transmit: Callable[[str], None],
        timeout: float | None = None,
    ) -> None:
        """Transmit one frame asking for a receipt and wait for it.

        Raises ConnectionLostError if the connection ends first, TransportError on an
        ERROR frame, ConfirmationTimeoutError if nothing comes in time.
        """
        receipt = uuid.uuid4().hex
        awaited = _ReceiptConfirmation(self, receipt)
        try:
            transmit(receipt)
        except (StompException, OSError) as exc:
            awaited.forget()
            raise ConnectionLostError(f"connection to {self.description} lost: {exc}") from exc
        awaited.wait(timeout)

    def _write_frames(
        self,
        connection: stomp.Connection12,
        frames: Sequence[Sequence[bytes]],
        awaited: _ReceiptConfirmation,
    ) -> None:
        """Write ready-made frames (each given as its pieces) on the connection, whole
        frames per system call, about ``WRITE_CHUNK_BYTES`` a call."""
        transport = connection.transport
        chunk: list[bytes] = []
        size = 0
        try:
            for frame in frames:
                chunk.extend(frame)
                size += sum(map(len, frame))
                if size >= WRITE_CHUNK_BYTES:
                    transport.send(b"".join(chunk))
                    chunk, size = [], 0
            if chunk:
                transport.send(b"".join(chunk))
        except (StompException, OSError) as exc:
            awaited.forget()
            raise ConnectionLostError(f"connection to {self.description} lost: {exc}") from exc

    def _live_connection(self, deadline: float) -> tuple[stomp.Connection12, int]:
        """The current connection, waiting for a reconnection until ``deadline``."""
        while True:
            remaining = deadline - time.monotonic()
            if self._closing:
                raise TransportError(f"not connected to {self.description}")
            if not self._up.wait(max(remaining, 0)):
                raise ConfirmationTimeoutError(f"no connection to {self.description} in time")
            with self._lock:
                if self._connection is not None and self._up.is_set():
                    return self._connection, self._generation

    def _require_connected(self) -> None:
        # Between a lost connection and the next one, calls wait or are dropped as
        # documented; only a transport never connected, or closed, refuses.
        if self._closing or not self._opened:
            raise TransportError(f"not connected to {self.description}")

    def _reconnect_wait_s(self) -> float:
        settings = self.settings
        return settings.receipt_timeout_s + settings.reconnect_attempts * min(
            settings.reconnect_delay_max_s, 1.0
        ) * len(self.addresses)

    # Messaging.

    def send(
        self,
        destination: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        persistent: bool = True,
        transaction: str | None = None,
    ) -> None:
        self._require_connected()
        check_destination(destination)
        frame_headers = {**(headers or {}), "persistent": "true" if persistent else "false"}
        if transaction is not None:
            connection = self._transaction_connection(transaction)
            frame_headers["transaction"] = transaction
            _transmit(connection, lambda: connection.send(destination, body, headers=frame_headers))
            return
        deadline = time.monotonic() + self._reconnect_wait_s()
        while True:
            connection, _ = self._live_connection(deadline)
            try:
                self._request(connection, _sender(connection, destination, body, frame_headers))
                return
            except ConnectionLostError:
                log.info(
                    "send to %s not confirmed before the connection dropped; resending", destination
                )

    def send_transaction(
        self,
        destination: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        headers: Mapping[str, str] | None = None,
        persistent: bool = True,
    ) -> Confirmation:
        self._require_connected()
        check_destination(destination)
        deadline = time.monotonic() + self._reconnect_wait_s()
        connection, _ = self._live_connection(deadline)
        transaction = f"tx-{uuid.uuid4().hex}"
        common = _header_lines(
            {
                **(headers or {}),
                "destination": destination,
                "persistent": "true" if persistent else "false",
                "transaction": transaction,
            }
        )
        receipt = uuid.uuid4().hex
        frames: list[Sequence[bytes]] = [(f"BEGIN\ntransaction:{transaction}\n\n\0".encode(),)]
        for body, own in messages:
            head = f"SEND\n{common}{_header_lines(own)}content-length:{len(body)}\n\n"
            frames.append((head.encode(), body, b"\0"))
        frames.append((f"COMMIT\ntransaction:{transaction}\nreceipt:{receipt}\n\n\0".encode(),))
        awaited = _ReceiptConfirmation(self, receipt, stray_errors=True)
        self._write_frames(connection, frames, awaited)
        return awaited

    def subscribe(
        self, destination: str, *, prefetch: int = 64, coalesce_acks: bool = False
    ) -> str:
        self._require_connected()
        check_destination(destination)
        if prefetch < 1:
            raise TransportError(f"prefetch must be at least 1, got {prefetch}")
        subscription = f"sub-{next(self._subscription_ids)}"
        subscribed = _Subscribed(destination, prefetch, coalesce_acks)
        with self._lock:
            self._subscriptions[subscription] = subscribed
            connection = self._connection
        if connection is not None and self._up.is_set():
            # On a lost connection, the reconnection subscribes again.
            with contextlib.suppress(ConnectionLostError):
                self._subscribe_frame(connection, subscription, subscribed)
        return subscription

    def _subscribe_frame(
        self, connection: stomp.Connection12, subscription: str, subscribed: _Subscribed
    ) -> None:
        if subscribed.coalesce:
            # Deliveries are recorded from the first one on; "client" acks are cumulative.
            with self._lock:
                self._ack_orders[subscription] = _AckOrder(self._generation)
        self._request(
            connection,
            lambda receipt: connection.subscribe(
                subscribed.destination,
                subscription,
                ack="client" if subscribed.coalesce else "client-individual",
                headers={PREFETCH_HEADER: str(subscribed.prefetch), "receipt": receipt},
            ),
        )

    def unsubscribe(self, subscription: str) -> None:
        with self._lock:
            removed = self._subscriptions.pop(subscription, None)
            self._ack_orders.pop(subscription, None)
            connection = self._connection
        if removed is None:
            raise TransportError(f"no subscription {subscription!r} on this transport")
        if connection is not None and self._up.is_set():
            # On a lost connection, the subscription is gone with it anyway.
            with contextlib.suppress(ConnectionLostError):
                self._request(
                    connection,
                    lambda receipt: connection.unsubscribe(
                        subscription, headers={"receipt": receipt}
                    ),
                )

    def receive(self, timeout: float | None = None) -> Message | None:
        self._require_connected()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                generation, headers, body = self._inbox.get(timeout=remaining)
            except queue.Empty:
                return None
            subscription = headers.get("subscription", "")
            # Deliveries of an older connection are back with the broker; skip them.
            if generation == self._generation and subscription in self._subscriptions:
                return _message(generation, headers, body)

    def _ack_target(self, message: Message, verb: str) -> tuple[stomp.Connection12, str] | None:
        generation, _, ack = message.ack_id.partition(":")
        with self._lock:
            connection = self._connection
            current = generation == str(self._generation) and self._up.is_set()
        if connection is None or not current:
            log.info(
                "%s of %s dropped: delivered on a connection since lost, the broker redelivers it",
                verb,
                message.message_id,
            )
            return None
        return connection, ack

    def _delivered(self, generation: int, headers: Mapping[str, str]) -> None:
        """On the receiver thread: note a delivery of a subscription that coalesces acks."""
        order = self._ack_orders.get(headers.get("subscription", ""))
        if order is not None and order.generation == generation:
            order.delivered(headers.get("ack", ""))

    def _coalesced(
        self, subscription: str, generation: str, acks: list[str], *, acked: bool
    ) -> str | None:
        """For a subscription that coalesces acks: the cumulative ACK to send now, if any."""
        order = self._ack_orders.get(subscription)
        if order is None or str(order.generation) != generation:
            return None
        return order.settle(acks, acked=acked)

    def ack(self, message: Message, *, transaction: str | None = None) -> None:
        self._require_connected()
        coalesced = message.subscription in self._ack_orders
        if transaction is not None:
            if coalesced:
                raise TransportError(
                    f"subscription {message.subscription} coalesces its acks: "
                    "they cannot be part of a transaction"
                )
            self._transaction_connection(transaction)
        target = self._ack_target(message, "ack")
        if target is None:
            return
        connection, ack = target
        if coalesced:
            generation = message.ack_id.partition(":")[0]
            cumulative = self._coalesced(message.subscription, generation, [ack], acked=True)
            if cumulative is None:
                return
            ack = cumulative
        _transmit(connection, lambda: connection.ack(ack, transaction=transaction))

    def ack_many(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        self._require_connected()
        with self._lock:
            connection = self._connection
            generation = str(self._generation)
            up = self._up.is_set()
        live = connection is not None and up
        current = [m for m in messages if live and m.ack_id.partition(":")[0] == generation]
        if len(current) < len(messages):
            log.info(
                "ack of %d of %d messages dropped: delivered on a connection since lost, "
                "the broker redelivers them",
                len(messages) - len(current),
                len(messages),
            )
        if connection is None or not current:
            return
        ids: list[str] = []
        coalesced: dict[str, list[str]] = {}
        for message in current:
            ack = message.ack_id.partition(":")[2]
            if message.subscription in self._ack_orders:
                coalesced.setdefault(message.subscription, []).append(ack)
            else:
                ids.append(ack)
        for subscription, acks in coalesced.items():
            cumulative = self._coalesced(subscription, generation, acks, acked=True)
            if cumulative is not None:
                ids.append(cumulative)
        if not ids:
            return  # an older delivery is still unsettled: a later ACK covers these
        frames: list[Sequence[bytes]] = [
            (f"ACK\nid:{ack.translate(_HEADER_ESCAPES)}\n\n\0".encode(),) for ack in ids
        ]
        # The broker handles a connection's frames in order, so the receipt of an empty
        # transaction written after the ACKs confirms them. A receipt on an ACK itself
        # makes ActiveMQ sync its journal for every message that ACK covers.
        receipt = uuid.uuid4().hex
        marker = f"tx-{uuid.uuid4().hex}"
        frames.append(
            (
                f"BEGIN\ntransaction:{marker}\n\n\0"
                f"ABORT\ntransaction:{marker}\nreceipt:{receipt}\n\n\0".encode(),
            )
        )
        awaited = _ReceiptConfirmation(self, receipt)
        self._write_frames(connection, frames, awaited)
        awaited.wait()

    def nack(self, message: Message) -> None:
        self._require_connected()
        target = self._ack_target(message, "nack")
        if target is not None:
            connection, ack = target
            _transmit(connection, lambda: connection.nack(ack))
            generation = message.ack_id.partition(":")[0]
            cumulative = self._coalesced(message.subscription, generation, [ack], acked=False)
            if cumulative is not None:
                _transmit(connection, lambda: connection.ack(cumulative))

    # Transactions.

    def _transaction_connection(self, transaction: str) -> stomp.Connection12:
        with self._lock:
            generation = self._transactions.get(transaction)
            if generation is None:
                raise TransportError(f"no open transaction {transaction!r}")
            if generation != self._generation or self._connection is None:
                self._transactions.pop(transaction, None)
                raise ConnectionLostError(
                    f"transaction {transaction} was lost with the connection to {self.description}"
                )
            return self._connection

    def begin(self) -> str:
        self._require_connected()
        deadline = time.monotonic() + self._reconnect_wait_s()
        connection, generation = self._live_connection(deadline)
        transaction = f"tx-{uuid.uuid4().hex}"
        with self._lock:
            self._transactions[transaction] = generation
        _transmit(connection, lambda: connection.begin(transaction))
        return transaction

    def commit(self, transaction: str) -> None:
        self._require_connected()
        connection = self._transaction_connection(transaction)
        try:
            self._request(
                connection,
                lambda receipt: connection.commit(transaction, headers={"receipt": receipt}),
            )
        finally:
            with self._lock:
                self._transactions.pop(transaction, None)

    def abort(self, transaction: str) -> None:
        self._require_connected()
        try:
            connection = self._transaction_connection(transaction)
        except ConnectionLostError:
            return  # the broker dropped it with the connection
        try:
            self._request(
                connection,
                lambda receipt: connection.abort(transaction, headers={"receipt": receipt}),
            )
        except ConnectionLostError:
            pass
        finally:
            with self._lock:
                self._transactions.pop(transaction, None)


def _sender(
    connection: stomp.Connection12, destination: str, body: bytes, headers: dict[str, str]
) -> Callable[[str], None]:
    def send(receipt: str) -> None:
        connection.send(destination, body, headers={**headers, "receipt": receipt})

    return send


def _send_disconnect(connection: stomp.Connection12, receipt: str) -> None:
    # The protocol's DISCONNECT only: the connection's own disconnect() then waits,
    # unbounded, for the receiver thread to end.
    stomp.protocol.Protocol12.disconnect(connection, receipt=receipt)


def _transmit(connection: stomp.Connection12, transmit: Callable[[], None]) -> None:
    try:
        transmit()
    except (StompException, OSError) as exc:
        raise ConnectionLostError(f"connection lost while sending a frame: {exc}") from exc


def _drop(connection: stomp.Connection12) -> None:
    """Close a connection's socket and stop its threads, whatever state it is in."""
    transport = connection.transport
    transport.running = False
    tls_socket = getattr(transport, "socket", None)
    if isinstance(tls_socket, ssl.SSLSocket):
        # stomp.py would wait, unbounded, for the peer's TLS close_notify: a broker that
        # is gone never sends it. The DISCONNECT receipt already ended the session.
        with contextlib.suppress(OSError):
            tls_socket.shutdown(socket.SHUT_RDWR)
    try:
        transport.disconnect_socket()
    except (OSError, StompException) as exc:
        log.debug("closing the socket: %s", exc)


def _message(generation: int, headers: Mapping[str, str], body: Any) -> Message:
    frame_headers = dict(headers)
    # ActiveMQ's own dead-letter headers, under the names the project uses.
    if ACTIVEMQ_DLQ_CAUSE in frame_headers:
        frame_headers.setdefault(HEADER_ERROR, frame_headers[ACTIVEMQ_DLQ_CAUSE])
    if ACTIVEMQ_ORIGINAL_DESTINATION in frame_headers:
        frame_headers.setdefault(
            HEADER_ORIGINAL_DESTINATION, frame_headers[ACTIVEMQ_ORIGINAL_DESTINATION]
        )
        # ActiveMQ's redelivery plugin dead-letters without saying why.
        frame_headers.setdefault(HEADER_ERROR, DLQ_REASON)
    return Message(
        destination=frame_headers.get("destination", ""),
        body=body if isinstance(body, bytes) else str(body).encode(),
        headers=frame_headers,
        message_id=frame_headers.get("message-id", ""),
        ack_id=f"{generation}:{frame_headers.get('ack', '')}",
        subscription=frame_headers.get("subscription", ""),
        redelivered=frame_headers.get("redelivered") == "true",
    )
