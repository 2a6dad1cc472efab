"""What is particular to the in-process broker, and choosing a transport by URL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from eventindex.config import BrokerSettings
from eventindex.errors import ConfigError
from eventindex.transport import open_transport, parse_broker_addresses
from eventindex.transport.memory import MemoryBroker, MemoryTransport
from eventindex.transport.stomp import StompTransport

QUEUE = "/queue/eventindex.events"


@pytest.fixture
def broker_name() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    MemoryBroker.forget(name)


def test_transports_on_the_same_url_share_one_broker(broker_name: str) -> None:
    url = f"memory://{broker_name}"
    with open_transport(url) as producer, open_transport(url) as consumer:
        consumer.subscribe(QUEUE)
        producer.send(QUEUE, b"hello")
        message = consumer.receive(timeout=1)
        assert message is not None and message.body == b"hello"
        consumer.ack(message)
    assert MemoryBroker.named(broker_name).depth(QUEUE) == 0


def test_brokers_of_other_names_are_apart(broker_name: str) -> None:
    with open_transport(f"memory://{broker_name}") as producer:
        producer.send(QUEUE, b"kept")
    other = f"{broker_name}-other"
    try:
        with open_transport(f"memory://{other}") as consumer:
            consumer.subscribe(QUEUE)
            assert consumer.receive(timeout=0.2) is None
    finally:
        MemoryBroker.forget(other)
    assert MemoryBroker.named(broker_name).depth(QUEUE) == 1


def test_concurrent_consumers_take_every_message_exactly_once(broker_name: str) -> None:
    url = f"memory://{broker_name}"
    count = 3000
    taken: list[bytes] = []
    taken_lock = threading.Lock()
    ready = threading.Barrier(4)

    def consume() -> None:
        with open_transport(url) as consumer:
            consumer.subscribe(QUEUE, prefetch=16)
            ready.wait()
            while (message := consumer.receive(timeout=0.5)) is not None:
                with taken_lock:
                    taken.append(message.body)
                consumer.ack(message)

    workers = [threading.Thread(target=consume) for _ in range(3)]
    for worker in workers:
        worker.start()
    ready.wait()
    with open_transport(url) as producer:
        for index in range(count):
            producer.send(QUEUE, index.to_bytes(4, "big"))
    for worker in workers:
        worker.join(timeout=30)
    assert sorted(taken) == [index.to_bytes(4, "big") for index in range(count)]
    assert MemoryBroker.named(broker_name).depth(QUEUE) == 0


def test_open_transport_chooses_by_scheme() -> None:
    assert isinstance(open_transport("memory://"), MemoryTransport)
    stomp = open_transport("stomp://mq1:61613,mq2:61614")
    assert isinstance(stomp, StompTransport)
    assert stomp.addresses == [("mq1", 61613), ("mq2", 61614)]
    assert not stomp.connected
    secure = open_transport("stomp+ssl://mq1:61617", BrokerSettings(ssl_ca_file="/ca.pem"))
    assert isinstance(secure, StompTransport) and secure.use_ssl


@pytest.mark.parametrize("url", ["amqp://host:5672", "mq1:61613", "", "tcp://localhost:61616"])
def test_an_unknown_scheme_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="unknown scheme"):
        open_transport(url)


@pytest.mark.parametrize(
    "url", ["stomp://", "stomp://host", "stomp://host:port", "stomp://host:70000", "stomp://:1"]
)
def test_a_bad_broker_address_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="expected host:port"):
        parse_broker_addresses(url)


def test_addresses_keep_failover_order_and_ipv6() -> None:
    assert parse_broker_addresses("stomp://a:1, b:2,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]


def test_memory_settings_apply_the_redelivery_limit(broker_name: str) -> None:
    settings = BrokerSettings(max_redeliveries=0)
    with open_transport(f"memory://{broker_name}", settings) as transport:
        transport.subscribe(QUEUE)
        transport.send(QUEUE, b"x")
        message = transport.receive(timeout=1)
        assert message is not None
        transport.nack(message)
        assert transport.receive(timeout=0.2) is None
    assert MemoryBroker.named(broker_name, 0).depth("/queue/DLQ.eventindex.events") == 1
