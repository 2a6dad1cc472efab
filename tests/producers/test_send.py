"""produce send over the in-process broker: confirmed, resumable, statistics, --wait."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from eventindex.records.codec import decode_events
from eventindex.status import HEADER_SENT_AT, FileSent, decode_status
from eventindex.transport import (
    EVENTS_QUEUE,
    STATUS_TOPIC,
    Confirmation,
    Transport,
    TransportError,
    open_transport,
)
from eventindex.transport.memory import MemoryBroker
from producers.eifile import EventIndexFile, EventIndexFileWriter, FileHeader
from producers.sender import HEADER_MESSAGE_ID, FileSender
from tests.producers.conftest import AOD, SPEC

GUID = "5D2C7A1E-0B2D-4B3A-9C4E-1F2A3B4C5D6E"


@pytest.fixture
def broker_url() -> Iterator[str]:
    name = f"send-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    MemoryBroker.forget(name)


@pytest.fixture
def ei_file(tmp_path: Path, run_tables: dict[str, pa.Table]) -> Path:
    header = FileHeader(
        producer="test",
        collection=SPEC.collection,
        dataset=AOD,
        guid=GUID,
        task_id="1",
        job_id="2",
    )
    path = tmp_path / "aod.ei"
    with EventIndexFileWriter(path, header, message_bytes=2000) as writer:
        writer.write(run_tables[AOD])
    return path


def _drain(transport: Transport, destination: str) -> list[tuple[dict[str, str], bytes]]:
    transport.subscribe(destination, prefetch=100_000)
    taken = []
    while (message := transport.receive(timeout=0.05)) is not None:
        transport.ack(message)
        taken.append((dict(message.headers), message.body))
    return taken


def test_send_ships_every_message_once(broker_url: str, ei_file: Path) -> None:
    with open_transport(broker_url) as transport, open_transport(broker_url) as watcher:
        watcher.subscribe(STATUS_TOPIC)
        events: list[int] = []
        report = FileSender(transport, transaction_messages=7).send(ei_file, progress=events.append)
        with EventIndexFile(ei_file) as ei:
            expected = [(m.message_id, m.payload) for m in ei.messages()]
            assert ei.state_counts() == {"confirmed": (ei.header.messages, ei.header.events)}
        assert report.messages_sent == len(expected) == report.messages
        assert sum(events) == report.events_sent == report.events
        delivered = _drain(transport, EVENTS_QUEUE)
        assert [(h[HEADER_MESSAGE_ID], body) for h, body in delivered] == expected
        assert all(float(h[HEADER_SENT_AT]) > 0 for h, _ in delivered)
        header, _ = decode_events(delivered[0][1])
        assert (header.guid, header.dataset, header.task_id) == (GUID, AOD, "1")
        status = watcher.receive(timeout=1)
        assert status is not None
        statistics = decode_status(status.body)
        assert isinstance(statistics, FileSent)
        assert (statistics.guid, statistics.events) == (GUID, report.events)
        # A second run has nothing left to send.
        again = FileSender(transport).send(ei_file)
        assert again.messages_sent == 0 and again.messages_already_confirmed == report.messages


class _FailingTransport:
    """Wraps a transport; transactions number ``fail_from`` to ``fail_until`` (excluded)
    fail to commit, as with a lost connection."""

    def __init__(self, inner: Transport, fail_from: int, fail_until: int = 10**9) -> None:
        self.inner = inner
        self.fail_from = fail_from
        self.fail_until = fail_until
        self.commits = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def send_transaction(
        self,
        destination: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        **options: Any,
    ) -> Confirmation:
        self.commits += 1
        if self.fail_from <= self.commits < self.fail_until:
            raise TransportError("connection lost")
        return self.inner.send_transaction(destination, messages, **options)


def test_a_rerun_after_a_crash_sends_only_the_rest(broker_url: str, ei_file: Path) -> None:
    with open_transport(broker_url) as transport:
        failing = _FailingTransport(transport, fail_from=3)
        sender = FileSender(failing, transaction_messages=5, retry_seconds=0, in_flight=2)  # type: ignore[arg-type]
        with pytest.raises(TransportError, match="giving up"):
            sender.send(ei_file)
        with EventIndexFile(ei_file) as ei:
            counts = ei.state_counts()
            total = ei.header.messages
            assert counts["confirmed"][0] == 10
            # The two open transactions, both failed: sent again.
            assert counts["sent"][0] == 10
        report = FileSender(transport, transaction_messages=5).send(ei_file)
        assert report.messages_already_confirmed == 10
        assert report.messages_sent == total - 10
        ids = [h[HEADER_MESSAGE_ID] for h, _ in _drain(transport, EVENTS_QUEUE)]
        with EventIndexFile(ei_file) as ei:
            assert ids == [m.message_id for m in ei.messages()]  # each once, same ids


def test_a_broker_failure_is_retried(broker_url: str, ei_file: Path) -> None:
    with open_transport(broker_url) as transport:
        failing = _FailingTransport(transport, fail_from=2, fail_until=3)
        report = FileSender(failing, transaction_messages=5).send(ei_file)  # type: ignore[arg-type]
        assert report.retries == 1
        ids = [h[HEADER_MESSAGE_ID] for h, _ in _drain(transport, EVENTS_QUEUE)]
        assert len(ids) == len(set(ids)) == report.messages


def test_wait_reports_stored_or_not(broker_url: str, ei_file: Path) -> None:
    with open_transport(broker_url) as transport:
        # Nobody consumes: the wait ends at its timeout, with everything missing.
        report = FileSender(transport).send(ei_file, wait_seconds=0.3)
        assert report.stored is False and report.messages_not_stored == report.messages


def test_wait_hears_the_consumers(broker_url: str, ei_file: Path) -> None:
    from eventindex.status import BatchStored, encode_status

    stop = threading.Event()

    def fake_consumer() -> None:  # acknowledges and reports, as a consumer does
        with open_transport(broker_url) as consumer:
            consumer.subscribe(EVENTS_QUEUE, prefetch=1000)
            while not stop.is_set():
                message = consumer.receive(timeout=0.05)
                if message is None:
                    continue
                consumer.ack(message)
                header = orjson.loads(message.body)["h"]
                status = BatchStored(
                    consumer="c",
                    collection=header["collection"],
                    dataset=header["dataset"],
                    file_id="f",
                    events=header["count"],
                    message_ids=[header["message_id"]],
                )
                consumer.send(STATUS_TOPIC, encode_status(status), persistent=False)

    thread = threading.Thread(target=fake_consumer)
    thread.start()
    try:
        with open_transport(broker_url) as transport:
            report = FileSender(transport).send(ei_file, wait_seconds=10)
        assert report.stored is True and report.messages_not_stored == 0
    finally:
        stop.set()
        thread.join()
