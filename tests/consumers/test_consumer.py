"""The consumer on the in-process broker: store, register, then ack; DLQ; no duplicates."""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest

from catalog import Collection, Dataset, SQLiteCatalog
from catalog.fileset import FilesetWriter
from catalog.model import TagFile
from consumers.consumer import EventConsumer
from eventindex.config import ConsumerSettings
from eventindex.records.codec import MessageHeader, encode_events, encode_message_batches
from eventindex.records.schema import RecordKind
from eventindex.status import BatchStored, decode_status
from eventindex.storage import MapFileReader
from eventindex.transport import (
    EVENTS_QUEUE,
    HEADER_ERROR,
    HEADER_ORIGINAL_DESTINATION,
    STATUS_TOPIC,
    Transport,
    dead_letter_queue,
    open_transport,
)
from eventindex.transport.memory import MemoryBroker
from tests.producers.conftest import AOD, RAW, SPEC

GUID = "0A66C3F2-56B6-E511-8B7B-02163E011F0E"
DLQ = dead_letter_queue(EVENTS_QUEUE)


@dataclass
class Chain:
    url: str
    broker: MemoryBroker
    producer: Transport
    catalog: SQLiteCatalog
    store: Path

    def consumer(self, **settings: float) -> EventConsumer:
        transport = open_transport(self.url)
        transport.connect()
        consumer = EventConsumer(
            transport,
            self.catalog,
            FilesetWriter(self.catalog, str(self.store)),
            ConsumerSettings(**{"flush_seconds": 60.0, "prefetch": 500, **settings}),
            max_message_bytes=100_000,
            name="test",
        )
        consumer.start()
        return consumer

    def send(
        self, table: pa.Table, dataset: str, prefix: str, message_bytes: int = 3000
    ) -> list[str]:
        template = MessageHeader(
            producer="p",
            message_id=prefix,
            dataset=dataset,
            collection=SPEC.collection,
            guid=GUID,
            task_id="1",
            job_id="1",
            count=0,
        )
        ids = []
        for header, payload in encode_message_batches(table, template, message_bytes):
            self.producer.send(EVENTS_QUEUE, payload)
            ids.append(header.message_id)
        return ids

    def stored_keys(self, dataset: str) -> list[tuple[int, int]]:
        keys: list[tuple[int, int]] = []
        for entry in self.catalog.list_tagfiles(dataset=dataset):
            with MapFileReader(entry.uri) as reader:
                table = reader.read(["run_number", "event_number"])
            keys.extend(
                zip(table["run_number"].to_pylist(), table["event_number"].to_pylist(), strict=True)
            )
        return keys


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    name = f"consumer-{uuid.uuid4().hex[:8]}"
    broker = MemoryBroker.named(name)
    producer = open_transport(f"memory://{name}")
    producer.connect()
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    yield Chain(f"memory://{name}", broker, producer, catalog, tmp_path / "store")
    catalog.close()
    producer.close()
    MemoryBroker.forget(name)


def _keys(table: pa.Table) -> list[tuple[int, int]]:
    return list(
        zip(table["run_number"].to_pylist(), table["event_number"].to_pylist(), strict=True)
    )


def _drain(consumer: EventConsumer) -> None:
    while consumer.run_once(timeout=0.05):
        pass
    consumer.flush()


def test_stores_registers_then_acks(chain: Chain, run_tables: dict[str, pa.Table]) -> None:
    watcher = open_transport(chain.url)
    watcher.connect()
    watcher.subscribe(STATUS_TOPIC)
    ids = chain.send(run_tables[RAW], RAW, "raw") + chain.send(run_tables[AOD], AOD, "aod")
    consumer = chain.consumer()
    _drain(consumer)
    assert chain.broker.depth(EVENTS_QUEUE) == 0  # every message acknowledged
    for dataset in (RAW, AOD):
        stored = chain.stored_keys(dataset)
        assert sorted(stored) == sorted(_keys(run_tables[dataset]))
        assert stored == sorted(stored)  # ordered by run and event
        entry = chain.catalog.get_dataset(dataset)
        assert entry.collection == SPEC.collection
    aod = chain.catalog.get_dataset(AOD)
    assert (aod.format, aod.processing_tag) == ("AOD", "r7562_p2521")
    assert chain.catalog.absorbed_message_ids(ids) == set(ids)
    statuses = []
    while (message := watcher.receive(timeout=0.1)) is not None:
        statuses.append(decode_status(message.body))
    batches = [s for s in statuses if isinstance(s, BatchStored)]
    assert {s.dataset for s in batches} == {RAW, AOD}
    assert sum(s.events for s in batches) == consumer.stats.stored_events
    assert {i for s in batches for i in s.message_ids} == set(ids)
    assert batches[0].guids == {GUID: batches[0].events}
    assert consumer.stats.latencies == []  # no sent-at header here
    watcher.close()


def test_flush_thresholds(chain: Chain, run_tables: dict[str, pa.Table]) -> None:
    chain.send(run_tables[RAW], RAW, "raw")
    consumer = chain.consumer(flush_rows=400)
    _drain(consumer)
    files = chain.catalog.list_tagfiles(dataset=RAW)
    assert len(files) >= run_tables[RAW].num_rows // 500
    assert all(f.rows < 400 + 100 for f in files[:-1])
    assert sorted(chain.stored_keys(RAW)) == sorted(_keys(run_tables[RAW]))


def test_time_threshold(chain: Chain, run_tables: dict[str, pa.Table]) -> None:
    now = [0.0]
    consumer = chain.consumer()
    consumer.clock = lambda: now[0]
    chain.send(run_tables[RAW].slice(0, 50), RAW, "raw")
    consumer.run_once(timeout=0)
    consumer.run_once(timeout=0)
    assert consumer.stats.received >= 1 and consumer.stats.flushes == 0
    now[0] = 61.0
    consumer.run_once(timeout=0)
    assert sum(f.rows for f in chain.catalog.list_tagfiles(dataset=RAW)) == 50


def test_prefetch_window_forces_a_flush(chain: Chain, run_tables: dict[str, pa.Table]) -> None:
    ids = chain.send(run_tables[RAW].slice(0, 200), RAW, "raw", message_bytes=1000)
    consumer = chain.consumer(prefetch=5)
    _drain(consumer)
    assert len(chain.catalog.list_tagfiles(dataset=RAW)) >= len(ids) // 5


def test_redelivery_after_a_crash_stores_nothing_twice(
    chain: Chain, run_tables: dict[str, pa.Table]
) -> None:
    ids = chain.send(run_tables[RAW], RAW, "raw")
    first = chain.consumer()

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # dies between the catalog commit and the acks

    first.transport.ack_many = crash  # type: ignore[method-assign]
    for _ in range(len(ids)):
        message = first.transport.receive(timeout=1)
        assert message is not None
        first.handle(message)
    with pytest.raises(KeyboardInterrupt):
        first.flush()
    first.transport.close()  # unacknowledged: back to the broker
    assert chain.catalog.absorbed_message_ids(ids) == set(ids)
    second = chain.consumer()
    _drain(second)
    assert second.stats.duplicates == len(ids) and second.stats.stored_events == 0
    assert chain.broker.depth(EVENTS_QUEUE) == 0
    assert sorted(chain.stored_keys(RAW)) == sorted(_keys(run_tables[RAW]))


def test_the_same_message_twice_is_stored_once(
    chain: Chain, run_tables: dict[str, pa.Table]
) -> None:
    chain.send(run_tables[RAW], RAW, "raw")
    chain.send(run_tables[RAW], RAW, "raw")  # a producer re-run: same ids, same rows
    consumer = chain.consumer()
    _drain(consumer)
    assert sorted(chain.stored_keys(RAW)) == sorted(_keys(run_tables[RAW]))
    assert consumer.stats.duplicates == consumer.stats.stored_messages


def test_what_another_worker_committed_meanwhile_is_not_stored_twice(
    chain: Chain, run_tables: dict[str, pa.Table]
) -> None:
    """Two workers hold the same messages (a producer's resend); the second commits its
    file while the first is writing its own: the first writes again without them."""
    first = chain.consumer()
    only_first = chain.send(run_tables[RAW].slice(600, 300), RAW, "only-first")
    second = chain.consumer()
    shared = run_tables[RAW].slice(0, 600)
    template = MessageHeader(
        producer="p",
        message_id="shared",
        dataset=RAW,
        collection=SPEC.collection,
        guid=GUID,
        task_id="1",
        job_id="1",
        count=0,
    )
    copies = 0
    for _, payload in encode_message_batches(shared, template, 3000):
        chain.producer.send(EVENTS_QUEUE, payload)
        chain.producer.send(EVENTS_QUEUE, payload)  # round robin: one copy each
        copies += 1
    for consumer in (first, second):
        while (message := consumer.transport.receive(timeout=0.2)) is not None:
            consumer.handle(message)
    assert (first.stats.received, second.stats.received) == (len(only_first) + copies, copies)
    prepare = first.writer.prepare
    written: list[int] = []

    def racing(*args: Any, **kwargs: Any) -> TagFile:
        if not written:
            second.flush()  # commits the shared message ids first
        entry = prepare(*args, **kwargs)
        written.append(entry.rows)
        return entry

    first.writer.prepare = racing  # type: ignore[method-assign]
    first.flush()
    assert written == [900, 300], "written with the shared messages, then again without"
    assert (first.stats.stored_messages, first.stats.duplicates) == (len(only_first), copies)
    assert sorted(chain.stored_keys(RAW)) == sorted(_keys(run_tables[RAW].slice(0, 900)))
    entries = chain.catalog.list_tagfiles()
    assert len(entries) == 2
    files = sorted(p.name for p in chain.store.rglob("*.parquet"))
    assert files == sorted(f"{e.file_id}.parquet" for e in entries)
    assert chain.broker.depth(EVENTS_QUEUE) == 0


def _valid_message(table: pa.Table, message_id: str, dataset: str = RAW) -> bytes:
    header = MessageHeader(
        producer="p",
        message_id=message_id,
        dataset=dataset,
        collection=SPEC.collection,
        guid=GUID,
        task_id="1",
        job_id="1",
        count=table.num_rows,
    )
    return encode_events(table, header)


def malformed_messages(table: pa.Table) -> list[tuple[bytes, str]]:
    """Bad messages of many kinds, each with a word its reason must contain."""
    good = orjson.loads(_valid_message(table.slice(0, 4), "bad:x"))

    def variant(change: object, reason: str) -> tuple[bytes, str]:
        doc = orjson.loads(orjson.dumps(good))
        change(doc)  # type: ignore[operator]
        return orjson.dumps(doc), reason

    def set_header(key: str, value: object) -> object:
        return lambda doc: doc["h"].__setitem__(key, value)

    def set_column(key: str, value: object) -> object:
        return lambda doc: doc["c"].__setitem__(key, value)

    cases = [
        (b"this is not json", "not JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b"", "not JSON"),
        (bytes(range(256)), ""),
        (b'{"v": 2}', "missing"),
        variant(lambda d: d.__setitem__("v", 99), "version"),
        variant(lambda d: d.__setitem__("v", "2"), "version"),
        variant(lambda d: d.pop("h"), "missing"),
        variant(lambda d: d["h"].pop("dataset"), "dataset"),
        variant(set_header("guid", "not-a-guid"), "GUID"),
        variant(set_header("guid", 12), "guid"),
        variant(set_header("count", -1), "count"),
        variant(set_header("count", 5), ""),
        variant(set_header("count", "4"), "count"),
        variant(set_header("producer", ""), "producer"),
        variant(lambda d: d["c"].pop("bcid"), "bcid"),
        variant(set_column("bcid", [1, 2, 3]), "bcid"),
        variant(set_column("bcid", [1, 2, "3", 4]), "bcid"),
        variant(set_column("bcid", [1, 2, -3, 4]), "bcid"),
        variant(set_column("run_number", {"k": 2**40}), "run_number"),
        variant(set_column("mc_event_weight", ["a", 1, 1, 1]), "mc_event_weight"),
        variant(set_column("is_simulation", [0, 1, 2, 0]), "is_simulation"),
        variant(set_column("l1_tbp", {"w": 2, "b64": "!!!"}), "l1_tbp"),
        variant(set_column("l1_tbp", {"w": 3, "b64": base64.b64encode(b"ab").decode()}), "l1_tbp"),
        variant(set_column("references", {"n": 1, "g": ["bad-guid"], "s": []}), "references"),
        variant(set_column("unknown_column", [1, 2, 3, 4]), "unknown"),
        (b'{"v":2,"h":' + b" " * 200_000 + b"}", "over the limit"),
        # A valid message for a dataset of another collection.
        (_wrong_collection(table), "collection"),
    ]
    return cases


def _wrong_collection(table: pa.Table) -> bytes:
    header = MessageHeader(
        producer="p",
        message_id="bad:collection",
        dataset=RAW,
        collection="other_13TeV.physics_X",
        guid=GUID,
        task_id="1",
        job_id="1",
        count=4,
    )
    return encode_events(table.slice(0, 4), header)


def test_malformed_messages_go_to_the_dlq_with_reasons(
    chain: Chain, run_tables: dict[str, pa.Table]
) -> None:
    table = run_tables[RAW]
    chain.catalog.create_collection(Collection(name=SPEC.collection, kind=RecordKind.EVENTS))
    chain.catalog.create_dataset(Dataset(name=RAW, collection=SPEC.collection))
    bad = malformed_messages(table)
    rng = np.random.default_rng(1)
    valid_ids = []
    for index in range(0, table.num_rows, 50):
        chain.producer.send(EVENTS_QUEUE, _valid_message(table.slice(index, 50), f"ok:{index}"))
        valid_ids.append(f"ok:{index}")
        payload, _ = bad[int(rng.integers(len(bad)))]
        chain.producer.send(EVENTS_QUEUE, payload, {"eventindex-case": "random"})
    for payload, _ in bad:
        chain.producer.send(EVENTS_QUEUE, payload)
    consumer = chain.consumer()
    _drain(consumer)
    sent_bad = len(valid_ids) + len(bad)
    assert consumer.stats.invalid == sent_bad
    assert sorted(chain.stored_keys(RAW)) == sorted(_keys(table))
    dlq = open_transport(chain.url)
    dlq.connect()
    dlq.subscribe(DLQ, prefetch=10_000)
    letters = []
    while (message := dlq.receive(timeout=0.1)) is not None:
        letters.append(message)
    assert len(letters) == sent_bad
    assert all(
        m.headers[HEADER_ERROR] and m.headers[HEADER_ORIGINAL_DESTINATION] == EVENTS_QUEUE
        for m in letters
    )
    tail = letters[-len(bad) :]
    for message, (payload, reason) in zip(tail, bad, strict=True):
        assert message.body == payload
        assert reason in message.headers[HEADER_ERROR], (reason, message.headers[HEADER_ERROR])
    assert letters[0].headers["eventindex-case"] == "random"  # our headers travel along
    dlq.close()


def test_run_flushes_on_stop(chain: Chain, run_tables: dict[str, pa.Table]) -> None:
    ids = chain.send(run_tables[RAW], RAW, "raw")
    consumer = chain.consumer()
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,))
    thread.start()
    while consumer.stats.received < 3:
        threading.Event().wait(0.001)
    stop.set()
    thread.join(timeout=10)
    consumer.close()
    assert not thread.is_alive()
    # What it took is stored and acknowledged; the rest is still with the broker.
    assert consumer.stats.stored_messages >= 3
    assert consumer.stats.stored_messages + chain.broker.depth(EVENTS_QUEUE) == len(ids)
    assert len(chain.stored_keys(RAW)) == consumer.stats.stored_events


def test_once_drains_and_returns(chain: Chain, run_tables: dict[str, pa.Table]) -> None:
    chain.send(run_tables[AOD], AOD, "aod")
    consumer = chain.consumer()
    consumer.run(threading.Event(), once=True, idle_seconds=0.2)
    assert sorted(chain.stored_keys(AOD)) == sorted(_keys(run_tables[AOD]))
    assert chain.broker.depth(EVENTS_QUEUE) == 0
    assert consumer.stats.invalid == 0
