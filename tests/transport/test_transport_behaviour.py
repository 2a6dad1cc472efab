"""The transport contract: one behaviour suite that every transport must pass.

Each test runs on the in-process broker and, marked ``integration``, on the real
ActiveMQ broker over STOMP (see conftest).
"""

from __future__ import annotations

import pytest

from eventindex.transport import (
    HEADER_ERROR,
    Message,
    Transport,
    TransportError,
    dead_letter_queue,
)
from tests.transport.conftest import BrokerUnderTest

WAIT = 10.0  # seconds to wait for a message that must come
QUIET = 0.5  # seconds of silence that show a message does not come


def take(transport: Transport, count: int, *, ack: bool = True) -> list[Message]:
    """Receive exactly ``count`` messages (failing if they do not come), acknowledging each."""
    received: list[Message] = []
    for _ in range(count):
        message = transport.receive(timeout=WAIT)
        assert message is not None, f"only {len(received)} of {count} messages arrived"
        if ack:
            transport.ack(message)
        received.append(message)
    return received


def bodies(messages: list[Message]) -> list[bytes]:
    return [m.body for m in messages]


def test_send_then_receive_keeps_body_and_headers(broker: BrokerUnderTest, queue_name: str) -> None:
    producer, consumer = broker.open(), broker.open()
    assert producer.connected and consumer.connected
    consumer.subscribe(queue_name)
    body = bytes(range(256)) * 40  # 10 kB of every byte value
    producer.send(queue_name, body, {"eventindex-sequence": "42", "eventindex-dataset": "a.b"})
    (message,) = take(consumer, 1)
    assert message.body == body
    assert message.destination == queue_name
    assert message.headers["eventindex-sequence"] == "42"
    assert message.headers["eventindex-dataset"] == "a.b"
    assert message.message_id and message.ack_id and message.subscription
    assert not message.redelivered
    assert consumer.receive(timeout=QUIET) is None


def test_messages_wait_in_a_queue_for_a_later_subscriber(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer = broker.open()
    for index in range(5):
        producer.send(queue_name, f"m{index}".encode())
    consumer = broker.open()
    consumer.subscribe(queue_name)
    assert bodies(take(consumer, 5)) == [f"m{i}".encode() for i in range(5)]


def test_a_queue_gives_each_message_to_one_consumer(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, first, second = broker.open(), broker.open(), broker.open()
    first.subscribe(queue_name, prefetch=1)
    second.subscribe(queue_name, prefetch=1)
    for index in range(6):
        producer.send(queue_name, f"m{index}".encode())
    # With prefetch 1, neither can hold a second message until it acknowledges the first.
    held = [take(first, 1, ack=False)[0], take(second, 1, ack=False)[0]]
    assert first.receive(timeout=QUIET) is None
    got = {held[0].body, held[1].body}
    first.ack(held[0])
    second.ack(held[1])
    for consumer in (first, second, first, second):
        message = consumer.receive(timeout=WAIT)
        assert message is not None
        consumer.ack(message)
        got.add(message.body)
    assert got == {f"m{i}".encode() for i in range(6)}
    assert first.receive(timeout=QUIET) is None and second.receive(timeout=QUIET) is None


def test_prefetch_limits_unacknowledged_deliveries(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, consumer = broker.open(), broker.open()
    consumer.subscribe(queue_name, prefetch=2)
    for index in range(5):
        producer.send(queue_name, f"m{index}".encode())
    held = take(consumer, 2, ack=False)
    assert consumer.receive(timeout=QUIET) is None
    consumer.ack(held[0])
    (third,) = take(consumer, 1, ack=False)
    assert third.body == b"m2"


def test_unacknowledged_messages_of_a_closed_transport_are_redelivered(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, crashed = broker.open(), broker.open()
    crashed.subscribe(queue_name, prefetch=10)
    for index in range(4):
        producer.send(queue_name, f"m{index}".encode())
    take(crashed, 2)  # acknowledged: gone for good
    take(crashed, 2, ack=False)  # delivered, never acknowledged
    crashed.close()
    survivor = broker.open()
    survivor.subscribe(queue_name)
    again = take(survivor, 2)
    assert sorted(bodies(again)) == [b"m2", b"m3"]
    assert all(m.redelivered for m in again)
    assert survivor.receive(timeout=QUIET) is None


def test_a_nacked_message_comes_back_marked_redelivered(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, consumer = broker.open(), broker.open()
    consumer.subscribe(queue_name)
    producer.send(queue_name, b"retry me")
    (first,) = take(consumer, 1, ack=False)
    assert not first.redelivered
    consumer.nack(first)
    (second,) = take(consumer, 1)
    assert second.body == b"retry me"
    assert second.redelivered
    assert consumer.receive(timeout=QUIET) is None


def test_a_message_nacked_too_often_goes_to_the_dead_letter_queue(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, consumer = broker.open(), broker.open()
    consumer.subscribe(queue_name)
    producer.send(queue_name, b"poison", {"eventindex-sequence": "7"})
    for _ in range(broker.max_redeliveries + 1):
        (message,) = take(consumer, 1, ack=False)
        assert message.body == b"poison"
        consumer.nack(message)
    assert consumer.receive(timeout=QUIET) is None
    consumer.subscribe(dead_letter_queue(queue_name))
    (dead,) = take(consumer, 1)
    assert dead.body == b"poison"
    assert dead.destination == dead_letter_queue(queue_name)
    assert dead.headers["eventindex-sequence"] == "7"
    assert dead.headers.get(HEADER_ERROR)


def test_a_topic_copies_each_message_to_every_current_subscriber(
    broker: BrokerUnderTest, topic_name: str
) -> None:
    producer, first, second = broker.open(), broker.open(), broker.open()
    producer.send(topic_name, b"before anyone listened", persistent=False)
    first.subscribe(topic_name)
    second.subscribe(topic_name)
    producer.send(topic_name, b"status 1", persistent=False)
    producer.send(topic_name, b"status 2", persistent=False)
    assert bodies(take(first, 2)) == [b"status 1", b"status 2"]
    assert bodies(take(second, 2)) == [b"status 1", b"status 2"]
    assert first.receive(timeout=QUIET) is None


def test_unsubscribe_stops_deliveries(broker: BrokerUnderTest, queue_name: str) -> None:
    producer, consumer = broker.open(), broker.open()
    subscription = consumer.subscribe(queue_name)
    producer.send(queue_name, b"one")
    take(consumer, 1)
    consumer.unsubscribe(subscription)
    producer.send(queue_name, b"two")
    assert consumer.receive(timeout=QUIET) is None
    other = broker.open()
    other.subscribe(queue_name)
    assert bodies(take(other, 1)) == [b"two"]


def test_transactional_sends_appear_at_commit_and_vanish_on_abort(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, consumer = broker.open(), broker.open()
    consumer.subscribe(queue_name)
    transaction = producer.begin()
    producer.send(queue_name, b"t1", transaction=transaction)
    producer.send(queue_name, b"t2", transaction=transaction)
    assert consumer.receive(timeout=QUIET) is None
    producer.commit(transaction)
    assert bodies(take(consumer, 2)) == [b"t1", b"t2"]
    aborted = producer.begin()
    producer.send(queue_name, b"never", transaction=aborted)
    producer.abort(aborted)
    assert consumer.receive(timeout=QUIET) is None


def test_transactional_acks_count_only_once_committed(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, consumer = broker.open(), broker.open()
    consumer.subscribe(queue_name, prefetch=10)
    for index in range(4):
        producer.send(queue_name, f"m{index}".encode())
    messages = take(consumer, 4, ack=False)
    committed = consumer.begin()
    for message in messages[:2]:
        consumer.ack(message, transaction=committed)
    consumer.commit(committed)
    aborted = consumer.begin()
    for message in messages[2:]:
        consumer.ack(message, transaction=aborted)
    consumer.abort(aborted)
    consumer.close()
    survivor = broker.open()
    survivor.subscribe(queue_name)
    assert sorted(bodies(take(survivor, 2))) == [b"m2", b"m3"]
    assert survivor.receive(timeout=QUIET) is None


def test_a_bad_destination_is_refused(broker: BrokerUnderTest) -> None:
    transport = broker.open()
    with pytest.raises(TransportError, match="bad destination"):
        transport.send("eventindex.events", b"x")
    with pytest.raises(TransportError, match="bad destination"):
        transport.subscribe("/queue/")


def test_an_unknown_transaction_is_refused(broker: BrokerUnderTest, queue_name: str) -> None:
    transport = broker.open()
    with pytest.raises(TransportError, match="transaction"):
        transport.commit("tx-never-begun")


def test_a_closed_transport_refuses_to_send(broker: BrokerUnderTest, queue_name: str) -> None:
    transport = broker.open()
    transport.close()
    assert not transport.connected
    with pytest.raises(TransportError, match="not connected"):
        transport.send(queue_name, b"x")


def test_a_sent_transaction_appears_once_confirmed(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, consumer = broker.open(), broker.open()
    consumer.subscribe(queue_name, prefetch=100)
    # Ids with the characters STOMP headers escape; a body with every byte value.
    messages = [
        (bytes(range(256)) * 4 + bytes([index]), {"eventindex-message-id": f"G:{index}\\x\ny"})
        for index in range(25)
    ]
    first = producer.send_transaction(queue_name, messages[:20], headers={"common": "a:b"})
    second = producer.send_transaction(queue_name, messages[20:])  # written before the first
    first.wait()
    second.wait()
    received = take(consumer, 25, ack=False)
    assert bodies(received) == [body for body, _ in messages]
    assert [m.headers["eventindex-message-id"] for m in received] == [
        own["eventindex-message-id"] for _, own in messages
    ]
    assert [m.headers.get("common") for m in received] == ["a:b"] * 20 + [None] * 5
    consumer.ack_many(received[:10])
    consumer.close()
    survivor = broker.open()
    survivor.subscribe(queue_name, prefetch=100)
    again = take(survivor, 15, ack=False)
    assert sorted(bodies(again)) == sorted(body for body, _ in messages[10:])
    survivor.ack_many(again)
    survivor.ack_many([])
    survivor.close()
    last = broker.open()
    last.subscribe(queue_name)
    assert last.receive(timeout=QUIET) is None


def test_coalesced_acks_count_once_every_older_delivery_is_settled(
    broker: BrokerUnderTest, queue_name: str
) -> None:
    producer, consumer = broker.open(), broker.open()
    for index in range(5):
        producer.send(queue_name, f"c{index}".encode())
    subscription = consumer.subscribe(queue_name, prefetch=10, coalesce_acks=True)
    first, second, third, fourth, fifth = take(consumer, 5, ack=False)
    assert {m.subscription for m in (first, fifth)} == {subscription}
    consumer.ack(third)  # out of order: may wait for the older ones
    consumer.nack(second)  # back to the queue, redelivered
    consumer.ack_many([first])
    consumer.ack(fifth)  # the fourth is never settled
    transaction = consumer.begin()
    with pytest.raises(TransportError, match="coalesces"):
        consumer.ack(fourth, transaction=transaction)
    consumer.abort(transaction)
    consumer.close()
    survivor = broker.open()
    survivor.subscribe(queue_name)
    returned = take(survivor, 2 if broker.name == "memory" else 3)
    # c1 (nacked) and c3 (never acked) come back; a broker that acknowledges
    # cumulatively brings back c4 too, delivered after the unsettled c3.
    assert {b"c1", b"c3"} <= set(bodies(returned)) <= {b"c1", b"c3", b"c4"}
    assert survivor.receive(timeout=QUIET) is None
