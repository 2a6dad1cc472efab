"""Faults against the real ActiveMQ broker: killed consumers, a restarted broker, and
malformed messages. The store must end with exactly the produced key set.

The SIGKILL test ingests ~200,000 events in CI; set ``EVENTINDEX_FAULT_EVENTS=1000000``
to run it at the size of the issue.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog import SQLiteCatalog
from catalog.model import FileState
from consumers.daemon import consume
from eventindex.config import Settings, load_config
from eventindex.generator import GeneratorSpec, generate_run
from eventindex.storage import MapFileReader
from eventindex.transport import HEADER_ERROR, dead_letter_queue, open_transport
from producers.eifile import EventIndexFileWriter, FileHeader
from producers.sender import FileSender
from tests.activemq import RunningBroker, activemq, activemq_url
from tests.consumers.test_consumer import malformed_messages

__all__ = ["activemq", "activemq_url"]

pytestmark = pytest.mark.integration

FAULT_EVENTS = int(os.environ.get("EVENTINDEX_FAULT_EVENTS", "200000"))


def _make_files(directory: Path, events: int, seed: int) -> tuple[list[Path], np.ndarray]:
    """.ei files of about ``events`` events; returns them and every produced key, sorted."""
    spec = GeneratorSpec(runs=1, events_per_run=max(events * 10 // 33, 1000), seed=seed)
    files = []
    keys = []
    for index, (name, table) in enumerate(generate_run(spec, spec.first_run).items()):
        header = FileHeader(
            producer="fault-test",
            collection=spec.collection,
            dataset=name,
            guid=str(uuid.UUID(int=seed * 100 + index)).upper(),
            task_id=str(seed),
            job_id=str(index),
        )
        path = directory / f"{name}.ei"
        with EventIndexFileWriter(path, header, message_bytes=10_000) as writer:
            writer.write(table)
        files.append(path)
        keys.append(_encoded(table, index))
    return files, np.sort(np.concatenate(keys))


def _encoded(table: pa.Table, dataset_index: int) -> np.ndarray:
    """(dataset, run, event) as one sortable integer: a key set across datasets."""
    run = table["run_number"].to_numpy().astype(np.uint64) - np.uint64(284_000)
    event = table["event_number"].to_numpy().astype(np.uint64)
    encoded: np.ndarray = (
        (np.uint64(dataset_index) << np.uint64(60)) | (run << np.uint64(40)) | event
    )
    return encoded


def _stored_keys(catalog_path: Path, files: list[Path]) -> np.ndarray:
    index_of = {path.name.removesuffix(".ei"): i for i, path in enumerate(files)}
    keys = []
    with SQLiteCatalog(str(catalog_path)) as catalog:
        for entry in catalog.list_tagfiles(states=[FileState.COMMITTED]):
            with MapFileReader(entry.uri) as reader:
                table = reader.read(["run_number", "event_number"])
            keys.append(_encoded(table, index_of[entry.dataset]))
    return np.sort(np.concatenate(keys)) if keys else np.array([], dtype=np.uint64)


def _stored_rows(catalog_path: Path) -> int:
    if not catalog_path.exists():
        return 0
    with SQLiteCatalog(str(catalog_path)) as catalog:
        return sum(f.rows for f in catalog.list_tagfiles(states=[FileState.COMMITTED]))


def _consumer(tmp_path: Path, url: str, queue: str, *extra: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-c", "from eventindex.cli import main; main()",
        "--store", str(tmp_path / "store"), "--catalog", str(tmp_path / "catalog.sqlite"),
        "--set", "consumer.flush_rows=30000", "--set", "consumer.flush_seconds=0.5",
        "consume", "--broker", url, "--queue", queue, *extra,
    ]  # fmt: skip
    log = (tmp_path / "consumer.log").open("ab")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _send_in_background(
    url: str, queue: str, files: list[Path], settings: Settings
) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def send() -> None:
        try:
            with open_transport(url, settings.broker) as transport:
                sender = FileSender(
                    transport, transaction_messages=100, destination=queue, retry_seconds=180
                )
                for path in files:
                    sender.send(path)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    return thread, errors


def _wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def queue() -> Iterator[str]:
    yield f"/queue/eventindex.test.{uuid.uuid4().hex[:8]}"


@pytest.mark.slow
def test_sigkilled_consumers_lose_and_duplicate_nothing(
    tmp_path: Path, activemq: RunningBroker, queue: str
) -> None:
    files, produced = _make_files(tmp_path, FAULT_EVENTS, seed=21)
    catalog_path = tmp_path / "catalog.sqlite"
    sender, errors = _send_in_background(activemq.url, queue, files, load_config())
    rng = random.Random(5)
    kills = 0
    for _ in range(3):
        before = _stored_rows(catalog_path)
        process = _consumer(tmp_path, activemq.url, queue)
        # Kill it mid-flight: once it has stored something, at a random moment after.
        _wait_for(lambda b=before: _stored_rows(catalog_path) > b, 60)
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kills += process.returncode == -signal.SIGKILL
    sender.join(timeout=600)
    assert not errors, errors
    final = _consumer(tmp_path, activemq.url, queue, "--once")
    assert final.wait(timeout=600) == 0
    assert kills == 3
    stored = _stored_keys(catalog_path, files)
    assert len(stored) == len(produced)
    assert np.array_equal(stored, produced)  # none lost, none twice


@pytest.mark.slow
def test_broker_restart_during_ingest(tmp_path: Path, activemq: RunningBroker, queue: str) -> None:
    files, produced = _make_files(tmp_path, 120_000, seed=22)
    catalog_path = tmp_path / "catalog.sqlite"
    process = _consumer(tmp_path, activemq.url, queue)
    try:
        sender, errors = _send_in_background(activemq.url, queue, files, load_config())
        assert _wait_for(lambda: _stored_rows(catalog_path) > 0, 120)
        activemq.restart()
        sender.join(timeout=600)
        assert not errors, errors
        assert _wait_for(lambda: _stored_rows(catalog_path) >= len(produced), 300)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0  # flushed and exited cleanly
    stored = _stored_keys(catalog_path, files)
    assert np.array_equal(stored, produced)


def test_malformed_messages_among_valid_traffic(
    tmp_path: Path, activemq_url: str, queue: str
) -> None:
    files, produced = _make_files(tmp_path, 20_000, seed=23)
    table = generate_run(GeneratorSpec(runs=1, events_per_run=200, seed=1), 284484)
    kinds = malformed_messages(next(iter(table.values())))
    settings = load_config(
        overrides={
            "store.root": str(tmp_path / "store"),
            "catalog.path": str(tmp_path / "catalog.sqlite"),
            "codec.max_message_bytes": 100_000,
            "consumer.flush_seconds": 0.5,
        }
    )
    with open_transport(activemq_url, settings.broker) as transport:
        sender = FileSender(transport, transaction_messages=50, destination=queue)
        for index in range(1000):  # interleaved with the valid messages
            payload, _ = kinds[index % len(kinds)]
            transport.send(queue, payload, {"eventindex-case": str(index)})
            if index % 250 == 0:
                sender.send(files[index // 250])
    report = consume(settings, activemq_url, once=True, destination=queue)
    assert report.stats["invalid"] == 1000
    assert np.array_equal(_stored_keys(tmp_path / "catalog.sqlite", files), produced)
    reasons: dict[str, str] = {}
    with open_transport(activemq_url, settings.broker) as transport:
        transport.subscribe(dead_letter_queue(queue), prefetch=2000)
        while (message := transport.receive(timeout=3)) is not None:
            transport.ack(message)
            reasons[message.headers["eventindex-case"]] = message.headers[HEADER_ERROR]
    assert len(reasons) == 1000
    for case, reason in reasons.items():
        expected = kinds[int(case) % len(kinds)][1]
        assert reason and expected in reason, (case, expected, reason)
