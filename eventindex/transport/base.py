"""What every transport offers: confirmed sends, a pull-style receive fed off the
listener thread, individual acknowledgements, and transactions.

Concrete transports: ``memory://`` (in-process broker, for the embedded chain and
unit tests) and ``stomp://host:port[,host:port...]`` (ActiveMQ over STOMP).
Producers and consumers see only this interface; ``open_transport(url)`` picks the
implementation from the URL scheme.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from eventindex.errors import EventIndexError

# Destinations. ActiveMQ's individual dead-letter strategy (conf/activemq/activemq.xml)
# names a queue's DLQ by prefixing "DLQ."; the in-process broker follows the same rule.
EVENTS_QUEUE = "/queue/eventindex.events"
STATUS_TOPIC = "/topic/eventindex.status"
DLQ_PREFIX = "DLQ."

# Headers that carry project meaning; STOMP header names are plain strings.
HEADER_ERROR = "eventindex-error"
HEADER_ORIGINAL_DESTINATION = "eventindex-original-destination"


class TransportError(EventIndexError):
    """The broker refused a frame, the connection is down, or a destination is bad."""


class ConfirmationTimeoutError(TransportError):
    """The broker did not confirm a send or a commit (no RECEIPT) in time."""


class ConnectionLostError(TransportError):
    """The connection dropped before the broker confirmed; the outcome is unknown."""


def check_destination(destination: str) -> None:
    """Raise TransportError unless ``destination`` is ``/queue/NAME`` or ``/topic/NAME``."""
    kind, _, name = destination.rpartition("/")
    if kind not in ("/queue", "/topic") or not name:
        raise TransportError(
            f"bad destination {destination!r}: expected /queue/NAME or /topic/NAME"
        )


def dead_letter_queue(destination: str) -> str:
    """The dead-letter queue of a queue: ``/queue/X`` → ``/queue/DLQ.X``."""
    kind, _, name = destination.rpartition("/")
    return f"{kind}/{DLQ_PREFIX}{name}"


@dataclass(frozen=True)
class Message:
    """One delivered message.

    ``message_id`` is the broker's id (``message-id``); ``ack_id`` is what ``ack``
    and ``nack`` need; ``redelivered`` is true when the broker has delivered it
    before (a consumer crashed or nacked). Producer-level ids, such as the
    sequence id used for idempotency, travel in ``headers``.
    """

    destination: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    message_id: str = ""
    ack_id: str = ""
    subscription: str = ""
    redelivered: bool = False


class Confirmation:
    """The broker's answer to frames already written (a transaction committed, a batch
    of acknowledgements): ``wait`` returns once it has confirmed them, or raises.

    This one is confirmed from the start: what a synchronous transport returns.
    """

    def wait(self, timeout: float | None = None) -> None:
        """Block until the broker confirmed. Raises ``ConnectionLostError`` if the
        connection ended first (the outcome is unknown: send again),
        ``ConfirmationTimeoutError`` after ``timeout`` s (the transport's receipt
        timeout if None), ``TransportError`` if the broker refused."""


CONFIRMED = Confirmation()


class Transport(ABC):
    """A connection to a broker. Thread-safe for one producer or consumer process.

    Delivery model: ``subscribe`` registers interest; the transport's listener
    puts each delivered message on an internal queue and returns at once (so
    heart-beats keep flowing however long processing takes); the caller pulls
    with ``receive`` and acknowledges each message individually.
    """

    @abstractmethod
    def connect(self) -> None:
        """Open the connection (with failover over the configured brokers)."""

    @abstractmethod
    def close(self) -> None:
        """Close; unacknowledged messages are redelivered to another consumer later."""

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether the connection is up now."""

    @abstractmethod
    def send(
        self,
        destination: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        persistent: bool = True,
        transaction: str | None = None,
    ) -> None:
        """Send one message. Outside a transaction, returns only once the broker has
        confirmed it (a STOMP receipt); inside one, ``commit`` confirms the lot."""

    @abstractmethod
    def subscribe(
        self, destination: str, *, prefetch: int = 64, coalesce_acks: bool = False
    ) -> str:
        """Subscribe with individual client acknowledgements; returns the subscription id.
        At most ``prefetch`` unacknowledged messages are delivered at a time.

        With ``coalesce_acks`` the transport may tell the broker later, in one
        cumulative acknowledgement: a message then counts as acknowledged at the broker
        once it and every message delivered before it on the subscription have been
        acknowledged or nacked. Acks still come one message at a time from the caller;
        what is never acknowledged is redelivered after the connection ends, with what
        came after it. Transactional acks are refused on such a subscription."""

    @abstractmethod
    def unsubscribe(self, subscription: str) -> None:
        """Stop deliveries of a subscription."""

    @abstractmethod
    def receive(self, timeout: float | None = None) -> Message | None:
        """The next delivered message, or ``None`` after ``timeout`` seconds."""

    @abstractmethod
    def ack(self, message: Message, *, transaction: str | None = None) -> None:
        """Acknowledge: the broker forgets the message."""

    @abstractmethod
    def nack(self, message: Message) -> None:
        """Refuse: the broker redelivers it (and moves it to the DLQ after too many tries)."""

    @abstractmethod
    def begin(self) -> str:
        """Start a transaction; returns its id."""

    @abstractmethod
    def commit(self, transaction: str) -> None:
        """Commit a transaction, confirmed by the broker."""

    @abstractmethod
    def abort(self, transaction: str) -> None:
        """Abort a transaction: its sends are dropped, its acks undone."""

    def send_transaction(
        self,
        destination: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        headers: Mapping[str, str] | None = None,
        persistent: bool = True,
    ) -> Confirmation:
        """Send ``messages`` (body, own headers), each also with ``headers``, in one
        broker transaction, and return what confirms its commit.

        A transport may return before the broker has answered, so that the next
        transaction is written while the broker commits this one; until
        ``wait`` returns, nothing is known. This default sends and commits at once.
        """
        transaction = self.begin()
        try:
            for body, own in messages:
                self.send(
                    destination,
                    body,
                    {**(headers or {}), **own},
                    persistent=persistent,
                    transaction=transaction,
                )
            self.commit(transaction)
        except BaseException:
            # If the connection is gone, the broker drops the transaction itself.
            with contextlib.suppress(TransportError):
                self.abort(transaction)
            raise
        return CONFIRMED

    def ack_many(self, messages: Sequence[Message]) -> None:
        """Acknowledge ``messages`` and return once the broker has confirmed it.

        They are acknowledged together or, if the connection fails half way, some of
        them: the rest is redelivered. This default acknowledges in one transaction.
        """
        if not messages:
            return
        transaction = self.begin()
        try:
            for message in messages:
                self.ack(message, transaction=transaction)
            self.commit(transaction)
        except BaseException:
            with contextlib.suppress(TransportError):
                self.abort(transaction)
            raise

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
