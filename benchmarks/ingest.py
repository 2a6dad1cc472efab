"""End-to-end ingest: producers → ActiveMQ (persistent, STOMP) → consumers → map-files + catalog.

The events come from the project's generator: runs of RAW, two AOD processings
and a DAOD skim, each dataset one intermediate ``.ei`` file, built once and kept
under ``var/bench/ingest/`` (extracting encodes the messages, which costs far more
than sending them, and happens on the processing nodes in production). Each
measurement then:

1. starts ``--workers`` consumer worker processes on a queue of its own, into a
   fresh store and SQLite catalog, and waits until they are subscribed;
2. starts the clock and ``--producers`` sender processes, which send every file
   (send logs reset first) in confirmed transactions of persistent messages;
3. stops the clock when the status topic has reported every event stored, i.e.
   written, committed in the catalog and acknowledged.

Figures: ``events_per_s`` (end to end), ``messages_per_s``, the consumers' CPU
(seconds, and cores busy on average), send → committed latency per message
(p50/p99, ms), and ``ratio_to_broker_only``: ``events_per_s`` over the rate at
which the broker alone moves the same messages in the same run
(``benchmarks.broker``). Uses the broker of ``--broker`` or ``broker.url`` if one
answers there, else starts one of its own on free ports (and stops it after).

    python -m benchmarks.ingest [--events N] [--workers W] [--producers P] [--broker URL]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_ROOT, emit, percentiles_ms
from eventindex.config import Settings, load_config

ROOT = Path(BENCH_ROOT) / "ingest"
EVENTS_PER_RUN = 400_000
DATASETS_PER_RUN = 3.3  # RAW, two AOD processings, a 30% DAOD skim


# -- inputs ----------------------------------------------------------------------------


def _build_run(args: tuple[int, int, int, int, str]) -> list[tuple[str, int]]:
    """Write the .ei files of one run; returns (path, events) of each."""
    from eventindex.generator import GeneratorSpec, generate_run
    from producers.eifile import EventIndexFileWriter, FileHeader

    first_run, runs, run_number, message_bytes, directory = args
    spec = GeneratorSpec(
        first_run=first_run, runs=runs, events_per_run=EVENTS_PER_RUN, seed=7, exact=True
    )
    made = []
    for index, (name, table) in enumerate(generate_run(spec, run_number).items()):
        path = Path(directory) / f"{name}.ei"
        header = FileHeader(
            producer="bench",
            collection=spec.collection,
            dataset=name,
            guid=str(uuid.UUID(int=run_number * 16 + index)).upper(),
            task_id=str(run_number),
            job_id=str(index),
        )
        with EventIndexFileWriter(path, header, message_bytes=message_bytes) as writer:
            writer.write(table)
        made.append((str(path), table.num_rows))
    return made


def ensure_inputs(events: int, message_bytes: int) -> tuple[list[Path], int]:
    """The .ei files of at least ``events`` events (built once, in two processes)."""
    directory = ROOT / f"ei-{events}-{message_bytes}"
    manifest = directory / "manifest.json"
    if manifest.exists():
        built = json.loads(manifest.read_text())
        return [Path(p) for p, _ in built], sum(n for _, n in built)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    runs = max(1, math.ceil(events / (EVENTS_PER_RUN * DATASETS_PER_RUN)))
    tasks = [(284484, runs, 284484 + i, message_bytes, str(directory)) for i in range(runs)]
    files: list[tuple[str, int]] = []
    print(f"building {runs} runs of .ei files under {directory}", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=2) as pool:
        for made in pool.map(_build_run, tasks):
            files.extend(made)
    manifest.write_text(json.dumps(files))
    return [Path(p) for p, _ in files], sum(n for _, n in files)


# -- the broker --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def broker_url(requested: str | None, settings: Settings) -> Iterator[tuple[str, int | None]]:
    """A STOMP URL that answers: the requested one, the configured one, or our own broker
    (then with its pid, to measure its CPU)."""
    from eventindex.cli.broker_cmd import ActiveMQProcess, stomp_answers
    from eventindex.transport import parse_broker_addresses

    for url in (requested, settings.broker.url):
        if url and url.startswith("stomp://"):
            host, port = parse_broker_addresses(url)[0]
            if stomp_answers(host, port):
                yield url, None
                return
            if url == requested:
                raise SystemExit(f"no STOMP broker answers at {url}")
    data = ROOT / "broker"
    if data.exists():
        shutil.rmtree(data)
    stomp_port = _free_port()
    own = settings.broker.model_copy(
        update={
            "url": f"stomp://127.0.0.1:{stomp_port}",
            "data_dir": str(data),
            "stomp_port": stomp_port,
            "stomp_ssl_port": _free_port(),
            "openwire_port": _free_port(),
        }
    )
    process = ActiveMQProcess(own)
    print(f"starting ActiveMQ on {own.url}", file=sys.stderr)
    pid = process.start()
    try:
        yield own.url, pid
    finally:
        process.stop()


# -- one measurement ---------------------------------------------------------------------


def _consumer_main(settings: Settings, url: str, workers: int, queue: str, pipe: Any) -> None:
    from consumers.daemon import consume

    report = consume(settings, url, workers=workers, destination=queue)
    pipe.send((report.stats, report.latencies))
    pipe.close()


def _producer_main(
    settings: Settings, url: str, queue: str, files: list[str], go: Any, pipe: Any
) -> None:
    from eventindex.transport import open_transport
    from producers.sender import FileSender

    sent = 0
    with open_transport(url, settings.broker) as transport:
        go.wait()
        cpu = time.process_time()
        sender = FileSender(
            transport,
            transaction_messages=settings.producer.transaction_messages,
            destination=queue,
        )
        for path in files:
            sent += sender.send(Path(path)).messages_sent
    pipe.send((sent, time.process_time() - cpu))
    pipe.close()


class _StoredCounter:
    """Collects the message ids consumers report stored (or already stored); ``done`` is
    set when ``target`` of them have been reported."""

    def __init__(self, url: str, settings: Settings, datasets: set[str]) -> None:
        from eventindex.transport import STATUS_TOPIC, open_transport

        self.events = 0
        self.message_ids: set[str] = set()
        self.datasets = datasets
        self.done = threading.Event()
        self.target = 0
        self._transport = open_transport(url, settings.broker)
        self._transport.connect()
        self._transport.subscribe(STATUS_TOPIC, prefetch=100_000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from eventindex.status import BatchStored, decode_status

        while not self._stop.is_set():
            message = self._transport.receive(timeout=0.2)
            if message is None:
                continue
            self._transport.ack(message)
            status = decode_status(message.body)
            if isinstance(status, BatchStored) and status.dataset in self.datasets:
                # Stored now, or found already stored after a redelivery: acknowledged.
                self.events += status.events
                self.message_ids.update(status.message_ids)
                if self.target and len(self.message_ids) >= self.target:
                    self.done.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._transport.close()


def _committed_rows(settings: Settings) -> int:
    from catalog import load_catalog

    catalog = load_catalog(settings.catalog)
    try:
        return sum(entry.rows for entry in catalog.list_tagfiles())
    finally:
        catalog.close()


def measure(
    url: str,
    settings: Settings,
    files: list[Path],
    total: int,
    *,
    workers: int,
    producers: int,
    timeout: float,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    from benchmarks.broker import process_cpu_s
    from producers.eifile import EventIndexFile

    run_dir = ROOT / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    settings = load_config(
        overrides={
            "store.root": str(run_dir / "store"),
            "catalog.path": str(run_dir / "catalog.sqlite"),
        }
    ).model_copy(update={"broker": settings.broker.model_copy(update={"url": url})})
    datasets = set()
    messages = 0
    for path in files:
        with EventIndexFile(path) as ei:
            ei.reset_log()
            datasets.add(ei.header.dataset)
            messages += ei.header.messages
    queue = f"/queue/eventindex.bench.{uuid.uuid4().hex[:8]}"
    # Every child is forked before this process starts a thread (the status listener's
    # transport): forking a process with threads can copy a held lock.
    context = multiprocessing.get_context("fork")
    go = context.Event()
    consumer_pipe, consumer_end = context.Pipe(duplex=False)
    consumer = context.Process(
        target=_consumer_main, args=(settings, url, workers, queue, consumer_end)
    )
    consumer.start()
    senders = []
    for index in range(producers):
        pipe, end = context.Pipe(duplex=False)
        share = [str(p) for p in files[index::producers]]
        process = context.Process(
            target=_producer_main, args=(settings, url, queue, share, go, end)
        )
        process.start()
        senders.append((process, pipe))
    counter = _StoredCounter(url, settings, datasets)
    counter.target = messages
    time.sleep(3.0)  # consumers subscribed before the clock starts
    load_before = _load_average()
    broker_cpu = process_cpu_s(broker_pid)
    started = time.perf_counter()
    go.set()
    sender_cpu = 0.0
    for process, pipe in senders:
        if pipe.poll(timeout):
            sender_cpu += pipe.recv()[1]
        process.join()
    sent_seconds = time.perf_counter() - started
    deadline = time.monotonic() + timeout
    while not counter.done.wait(1.0) and time.monotonic() < deadline:
        # Status messages are not persistent: one lost with a connection must not hang
        # the measurement, so the catalog is asked too.
        if _committed_rows(settings) >= total:
            break
    finished = counter.done.is_set() or _committed_rows(settings) >= total
    elapsed = time.perf_counter() - started
    broker_cpu = process_cpu_s(broker_pid) - broker_cpu
    load_after = _load_average()
    counter.close()
    consumer.terminate()  # SIGTERM: flush and exit
    stats, latencies = consumer_pipe.recv() if consumer_pipe.poll(60) else ({}, [])
    consumer.join(timeout=60)
    cpu = float(stats.get("cpu_seconds", 0.0))
    return {
        "events": total,
        "messages": messages,
        "finished": finished,
        "seconds": round(elapsed, 3),
        "events_per_s": round(total / elapsed),
        "messages_per_s": round(messages / elapsed),
        "send_seconds": round(sent_seconds, 3),
        "send_events_per_s": round(total / sent_seconds),
        "consumer_cpu_s": round(cpu, 2),
        "consumer_cpu_cores": round(cpu / elapsed, 2),
        "consumer_cpu_us_per_event": round(cpu / total * 1e6, 2),
        # CPU per event of every part: on one machine they share its cores.
        "sender_cpu_us_per_event": round(sender_cpu / total * 1e6, 2),
        "broker_cpu_us_per_event": round(broker_cpu / total * 1e6, 2) if broker_pid else None,
        "load_average_before_after": [load_before, load_after],
        "latency_ms": percentiles_ms(latencies) if latencies else {},
        "consumer": {k: v for k, v in stats.items() if k != "cpu_seconds"},
    }


def _load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def broker_only_rate(url: str, messages: int, transaction: int) -> dict[str, Any] | None:
    """The broker-only figures of ``benchmarks.broker`` on this broker, if it is there."""
    try:
        broker_bench = importlib.import_module("benchmarks.broker")
    except ImportError:
        return None
    argv = ["--broker", url, "--messages", str(messages), "--transaction", str(transaction)]
    result: dict[str, Any] = broker_bench.run(argv)
    return result


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench ingest", description=__doc__)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--workers", type=int, default=2, help="consumer worker processes")
    parser.add_argument("--producers", type=int, default=1, help="sender processes")
    parser.add_argument("--message-bytes", type=int, default=None)
    parser.add_argument("--broker", default=None, help="stomp://host:port (else own broker)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument(
        "--broker-messages", type=int, default=20_000, help="messages of the broker-only run"
    )
    args = parser.parse_args(argv)
    settings = load_config()
    message_bytes = args.message_bytes or settings.codec.message_bytes
    files, total = ensure_inputs(args.events, message_bytes)
    with broker_url(args.broker, settings) as (url, pid):
        figures = measure(
            url,
            settings,
            files,
            total,
            workers=args.workers,
            producers=args.producers,
            timeout=args.timeout,
            broker_pid=pid,
        )
        baseline = broker_only_rate(
            url, args.broker_messages, settings.producer.transaction_messages
        )
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "broker": "own ActiveMQ" if pid else url,
        "workers": args.workers,
        "producers": args.producers,
        "message_bytes": message_bytes,
        "flush_rows": settings.consumer.flush_rows,
        "flush_seconds": settings.consumer.flush_seconds,
        **figures,
    }
    if baseline is not None:
        rate = baseline.get("events_per_s") or baseline.get("records_per_s")
        result["broker_only"] = baseline
        if rate:
            result["ratio_to_broker_only"] = round(figures["events_per_s"] / float(rate), 3)
    return result


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
