"""Message transport between producers and consumers (STOMP or in-process).

``open_transport(url)`` picks the implementation from the URL scheme:

* ``memory://`` or ``memory://NAME``: the in-process broker of that name;
* ``stomp://host:port[,host:port...]``: ActiveMQ over STOMP, failing over along the list;
* ``stomp+ssl://host:port[,...]``: the same over TLS (``broker.ssl_*`` settings).
"""

from __future__ import annotations

from eventindex.config import BrokerSettings
from eventindex.errors import ConfigError
from eventindex.transport.base import (
    DLQ_PREFIX,
    EVENTS_QUEUE,
    HEADER_ERROR,
    HEADER_ORIGINAL_DESTINATION,
    STATUS_TOPIC,
    Confirmation,
    ConfirmationTimeoutError,
    ConnectionLostError,
    Message,
    Transport,
    TransportError,
    check_destination,
    dead_letter_queue,
)

MEMORY_SCHEME = "memory"
STOMP_SCHEMES = ("stomp", "stomp+ssl")


def parse_broker_addresses(url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` list of a ``stomp://h1:p1,h2:p2`` URL, in failover order."""
    _, _, rest = url.partition("://")
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    addresses: list[tuple[str, int]] = []
    for item in rest.split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"broker URL {url!r}: expected host:port, got {item.strip()!r}")
        addresses.append((host, int(port)))
    return addresses


def open_transport(url: str, settings: BrokerSettings | None = None) -> Transport:
    """A transport for ``url``, not yet connected (use it in ``with``, or call ``connect``).

    ``settings`` give credentials, heart-beats, SSL files, reconnection and the
    redelivery limit; the defaults apply without them.
    """
    settings = settings or BrokerSettings(url=url)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme == MEMORY_SCHEME:
        from eventindex.transport.memory import MemoryBroker, MemoryTransport

        name = rest.strip("/")
        return MemoryTransport(MemoryBroker.named(name, settings.max_redeliveries))
    if sep and scheme in STOMP_SCHEMES:
        from eventindex.transport.stomp import StompTransport

        return StompTransport(parse_broker_addresses(url), settings, use_ssl=scheme == "stomp+ssl")
    raise ConfigError(
        f"broker URL {url!r}: unknown scheme; expected memory://[NAME], "
        "stomp://host:port[,host:port...] or stomp+ssl://host:port[,...]"
    )


__all__ = [
    "DLQ_PREFIX",
    "EVENTS_QUEUE",
    "HEADER_ERROR",
    "HEADER_ORIGINAL_DESTINATION",
    "STATUS_TOPIC",
    "Confirmation",
    "ConfirmationTimeoutError",
    "ConnectionLostError",
    "Message",
    "Transport",
    "TransportError",
    "check_destination",
    "dead_letter_queue",
    "open_transport",
    "parse_broker_addresses",
]
