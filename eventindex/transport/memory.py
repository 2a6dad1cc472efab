"""The in-process broker behind ``memory://`` and ``memory://NAME``.

It behaves as the project's ActiveMQ configuration does, so that producers and
consumers tested against it behave the same against the real broker:

* queues deliver each message to one subscription, round robin among those with
  room under their prefetch limit, and keep it until it is acknowledged;
* topics copy each message to every subscription present when it is sent;
* a nacked message, or one left unacknowledged by a closed transport or a removed
  subscription, is delivered again with ``redelivered=True``; a message nacked
  after ``max_redeliveries`` redeliveries goes to its dead-letter queue
  (``dead_letter_queue(destination)``) with the reason in ``HEADER_ERROR``;
* sends and acknowledgements inside a transaction take effect at ``commit``.

Every transport opened on the same URL in one process shares one broker, so a
producer and consumers running in threads of one process talk to each other.
"""

from __future__ import annotations

import itertools
import queue
import threading
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from eventindex.transport.base import (
    HEADER_ERROR,
    HEADER_ORIGINAL_DESTINATION,
    Message,
    Transport,
    TransportError,
    check_destination,
    dead_letter_queue,
)

DEFAULT_MAX_REDELIVERIES = 5
QUEUE_PREFIX = "/queue/"
TOPIC_PREFIX = "/topic/"


@dataclass
class _Stored:
    """A message the broker holds, with how often it was delivered again."""

    message_id: str
    destination: str
    body: bytes
    headers: dict[str, str]
    redeliveries: int = 0
    delivered: bool = False


@dataclass(eq=False)
class _Subscription:
    subscription_id: str
    destination: str
    prefetch: int
    inbox: queue.Queue[Message]
    # Delivered and not yet acknowledged, by message id.
    inflight: dict[str, _Stored] = field(default_factory=dict)
    # Only topic subscriptions keep their own backlog; queues share theirs.
    backlog: deque[_Stored] = field(default_factory=deque)

    @property
    def has_room(self) -> bool:
        return len(self.inflight) < self.prefetch


@dataclass
class _Queue:
    backlog: deque[_Stored] = field(default_factory=deque)
    subscriptions: list[_Subscription] = field(default_factory=list)
    next_index: int = 0


class MemoryBroker:
    """A broker living in this process; ``MemoryBroker.named(name)`` shares one per name."""

    _registry: ClassVar[dict[str, MemoryBroker]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str = "", max_redeliveries: int = DEFAULT_MAX_REDELIVERIES) -> None:
        if max_redeliveries < 0:
            raise ValueError(f"max_redeliveries must be >= 0, got {max_redeliveries}")
        self.name = name
        self.max_redeliveries = max_redeliveries
        self._lock = threading.RLock()
        self._queues: dict[str, _Queue] = {}
        self._topics: dict[str, list[_Subscription]] = {}
        self._ids = itertools.count(1)
        self._prefix = f"ID:memory-{name or 'default'}-{uuid.uuid4().hex[:8]}"

    @classmethod
    def named(cls, name: str, max_redeliveries: int = DEFAULT_MAX_REDELIVERIES) -> MemoryBroker:
        """The process-wide broker of that name, created on first use.

        ``max_redeliveries`` applies when the broker is created, and updates an existing
        one, so the latest configuration wins as it would on a restarted broker.
        """
        with cls._registry_lock:
            broker = cls._registry.get(name)
            if broker is None:
                broker = cls._registry[name] = cls(name, max_redeliveries)
            else:
                broker.max_redeliveries = max_redeliveries
            return broker

    @classmethod
    def forget(cls, name: str) -> None:
        """Drop a named broker and everything it holds (tests start afresh with it)."""
        with cls._registry_lock:
            cls._registry.pop(name, None)

    def depth(self, destination: str) -> int:
        """Messages of a queue not yet acknowledged (waiting or delivered)."""
        with self._lock:
            state = self._queues.get(destination)
            if state is None:
                return 0
            inflight = sum(len(s.inflight) for s in state.subscriptions)
            return len(state.backlog) + inflight

    # The operations below are what MemoryTransport calls.

    def publish(self, destination: str, body: bytes, headers: Mapping[str, str]) -> str:
        check_destination(destination)
        with self._lock:
            message_id = f"{self._prefix}:{next(self._ids)}"
            stored = _Stored(message_id, destination, bytes(body), dict(headers))
            if destination.startswith(TOPIC_PREFIX):
                for subscription in self._topics.get(destination, []):
                    copy = _Stored(message_id, destination, stored.body, dict(stored.headers))
                    subscription.backlog.append(copy)
                    self._dispatch_topic(subscription)
            else:
                state = self._queues.setdefault(destination, _Queue())
                state.backlog.append(stored)
                self._dispatch_queue(state)
            return message_id

    def subscribe(
        self, destination: str, prefetch: int, inbox: queue.Queue[Message]
    ) -> _Subscription:
        check_destination(destination)
        if prefetch < 1:
            raise TransportError(f"prefetch must be at least 1, got {prefetch}")
        subscription = _Subscription(f"sub-{uuid.uuid4().hex[:12]}", destination, prefetch, inbox)
        with self._lock:
            if destination.startswith(TOPIC_PREFIX):
                self._topics.setdefault(destination, []).append(subscription)
            else:
                state = self._queues.setdefault(destination, _Queue())
                state.subscriptions.append(subscription)
                self._dispatch_queue(state)
        return subscription

    def unsubscribe(self, subscription: _Subscription) -> None:
        """Remove a subscription; what it had not acknowledged goes to others again."""
        with self._lock:
            unacked = list(subscription.inflight.values())
            subscription.inflight.clear()
            if subscription.destination.startswith(TOPIC_PREFIX):
                subscribers = self._topics.get(subscription.destination, [])
                if subscription in subscribers:
                    subscribers.remove(subscription)
                return
            state = self._queues.get(subscription.destination)
            if state is None or subscription not in state.subscriptions:
                return
            state.subscriptions.remove(subscription)
            # Back at the head, oldest first, as ActiveMQ redelivers them.
            for stored in reversed(unacked):
                stored.redeliveries += 1
                state.backlog.appendleft(stored)
            self._dispatch_queue(state)

    def ack(self, subscription: _Subscription, message_id: str) -> None:
        with self._lock:
            if subscription.inflight.pop(message_id, None) is None:
                raise TransportError(
                    f"cannot acknowledge {message_id}: not delivered to subscription "
                    f"{subscription.subscription_id} or already acknowledged"
                )
            self._refill(subscription)

    def commit(
        self,
        acks: list[tuple[_Subscription, str]],
        sends: list[tuple[str, bytes, dict[str, str]]],
    ) -> None:
        """Apply a transaction's acks and sends at once, or none if an ack is invalid."""
        with self._lock:
            for subscription, message_id in acks:
                if message_id not in subscription.inflight:
                    raise TransportError(
                        f"cannot commit: {message_id} is not delivered to subscription "
                        f"{subscription.subscription_id} or already acknowledged"
                    )
            for subscription, message_id in acks:
                self.ack(subscription, message_id)
            for destination, body, headers in sends:
                self.publish(destination, body, headers)

    def nack(self, subscription: _Subscription, message_id: str) -> None:
        with self._lock:
            stored = subscription.inflight.pop(message_id, None)
            if stored is None:
                raise TransportError(
                    f"cannot nack {message_id}: not delivered to subscription "
                    f"{subscription.subscription_id} or already acknowledged"
                )
            if stored.redeliveries >= self.max_redeliveries:
                self._dead_letter(stored)
            else:
                stored.redeliveries += 1
                if subscription.destination.startswith(TOPIC_PREFIX):
                    subscription.backlog.appendleft(stored)
                else:
                    self._queues[subscription.destination].backlog.appendleft(stored)
            self._refill(subscription)

    def _dead_letter(self, stored: _Stored) -> None:
        reason = (
            f"delivery failed: refused after {stored.redeliveries} redeliveries "
            f"(max_redeliveries={self.max_redeliveries})"
        )
        headers = {
            **stored.headers,
            HEADER_ERROR: reason,
            HEADER_ORIGINAL_DESTINATION: stored.destination,
        }
        target = dead_letter_queue(stored.destination)
        if target.startswith(TOPIC_PREFIX):
            # ActiveMQ's dead-letter destinations are queues, for topics too.
            target = QUEUE_PREFIX + target.removeprefix(TOPIC_PREFIX)
        state = self._queues.setdefault(target, _Queue())
        state.backlog.append(_Stored(stored.message_id, target, stored.body, headers))
        self._dispatch_queue(state)

    def _refill(self, subscription: _Subscription) -> None:
        if subscription.destination.startswith(TOPIC_PREFIX):
            self._dispatch_topic(subscription)
        else:
            state = self._queues.get(subscription.destination)
            if state is not None:
                self._dispatch_queue(state)

    def _dispatch_queue(self, state: _Queue) -> None:
        subscriptions = state.subscriptions
        while state.backlog and subscriptions:
            # Round robin: the next subscription with room, starting after the last one served.
            for step in range(len(subscriptions)):
                index = (state.next_index + step) % len(subscriptions)
                if subscriptions[index].has_room:
                    state.next_index = index + 1
                    self._deliver(subscriptions[index], state.backlog.popleft())
                    break
            else:
                return

    def _dispatch_topic(self, subscription: _Subscription) -> None:
        while subscription.backlog and subscription.has_room:
            self._deliver(subscription, subscription.backlog.popleft())

    @staticmethod
    def _deliver(subscription: _Subscription, stored: _Stored) -> None:
        subscription.inflight[stored.message_id] = stored
        subscription.inbox.put(
            Message(
                destination=stored.destination,
                body=stored.body,
                headers=dict(stored.headers),
                message_id=stored.message_id,
                ack_id=stored.message_id,
                subscription=subscription.subscription_id,
                redelivered=stored.redeliveries > 0,
            )
        )


@dataclass
class _Transaction:
    sends: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    acks: list[Message] = field(default_factory=list)


class MemoryTransport(Transport):
    """A connection to a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._subscriptions: dict[str, _Subscription] = {}
        self._coalescing: set[str] = set()
        self._transactions: dict[str, _Transaction] = {}
        self._lock = threading.Lock()
        self._connected = False

    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions.values())
            self._subscriptions.clear()
            self._transactions.clear()
            self._connected = False
        for subscription in subscriptions:
            self.broker.unsubscribe(subscription)
        # What was delivered and not taken is back with the broker.
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break

    @property
    def connected(self) -> bool:
        return self._connected

    def _require_connected(self) -> None:
        if not self._connected:
            raise TransportError(f"not connected to memory://{self.broker.name}")

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
        frame_headers = dict(headers or {})
        if transaction is not None:
            self._transaction(transaction).sends.append((destination, bytes(body), frame_headers))
            return
        self.broker.publish(destination, body, frame_headers)

    def subscribe(
        self, destination: str, *, prefetch: int = 64, coalesce_acks: bool = False
    ) -> str:
        # Acks cost nothing here: each is applied at once, which coalescing allows.
        self._require_connected()
        subscription = self.broker.subscribe(destination, prefetch, self._inbox)
        with self._lock:
            self._subscriptions[subscription.subscription_id] = subscription
            if coalesce_acks:
                self._coalescing.add(subscription.subscription_id)
        return subscription.subscription_id

    def unsubscribe(self, subscription: str) -> None:
        with self._lock:
            removed = self._subscriptions.pop(subscription, None)
        if removed is None:
            raise TransportError(f"no subscription {subscription!r} on this transport")
        self.broker.unsubscribe(removed)

    def receive(self, timeout: float | None = None) -> Message | None:
        self._require_connected()
        while True:
            try:
                message = self._inbox.get(timeout=timeout)
            except queue.Empty:
                return None
            # Deliveries of a subscription removed since are the broker's again: skip them.
            if message.subscription in self._subscriptions:
                return message

    def _subscription_of(self, message: Message) -> _Subscription:
        subscription = self._subscriptions.get(message.subscription)
        if subscription is None:
            raise TransportError(
                f"message {message.message_id} came through subscription "
                f"{message.subscription!r}, which this transport no longer has"
            )
        return subscription

    def ack(self, message: Message, *, transaction: str | None = None) -> None:
        self._require_connected()
        subscription = self._subscription_of(message)
        if transaction is not None:
            if message.subscription in self._coalescing:
                raise TransportError(
                    f"subscription {message.subscription} coalesces its acks: "
                    "they cannot be part of a transaction"
                )
            self._transaction(transaction).acks.append(message)
            return
        self.broker.ack(subscription, message.ack_id)

    def ack_many(self, messages: Sequence[Message]) -> None:
        # Each ack is applied at once and cannot fail half way for a lost connection.
        for message in messages:
            self.ack(message)

    def nack(self, message: Message) -> None:
        self._require_connected()
        self.broker.nack(self._subscription_of(message), message.ack_id)

    def begin(self) -> str:
        self._require_connected()
        transaction = f"tx-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._transactions[transaction] = _Transaction()
        return transaction

    def _transaction(self, transaction: str) -> _Transaction:
        found = self._transactions.get(transaction)
        if found is None:
            raise TransportError(f"no open transaction {transaction!r}")
        return found

    def commit(self, transaction: str) -> None:
        self._require_connected()
        with self._lock:
            work = self._transactions.pop(transaction, None)
        if work is None:
            raise TransportError(f"no open transaction {transaction!r}")
        acks = [(self._subscription_of(message), message.ack_id) for message in work.acks]
        self.broker.commit(acks, work.sends)

    def abort(self, transaction: str) -> None:
        self._require_connected()
        with self._lock:
            work = self._transactions.pop(transaction, None)
        if work is None:
            raise TransportError(f"no open transaction {transaction!r}")
        # Sends are dropped; messages acknowledged inside stay delivered and unacknowledged.
