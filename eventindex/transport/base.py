"""What every transport offers: confirmed sends, a pull-style receive fed off the
listener thread, individual acknowledgements, and transactions.

Concrete transports: ``memory://`` (in-process broker, for the embedded chain and
unit tests) and ``stomp://host:port[,host:port...]`` (ActiveMQ over STOMP).
Producers and consumers see only this interface; ``open_transport(url)`` picks the
implementation from the URL scheme.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
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
    def subscribe(self, destination: str, *, prefetch: int = 64) -> str:
        """Subscribe with individual client acknowledgements; returns the subscription id.
        At most ``prefetch`` unacknowledged messages are delivered at a time."""

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
