"""What the broker alone moves: persistent messages through ActiveMQ over STOMP, no consumer work.

The messages are real producer messages: generated events encoded by the
project's codec (``eventindex.records.codec``), in two sizes:

* ``10kB``: ``codec.message_bytes`` messages (about 10 kB, ~150 events each);
* ``100ev``: messages of 100 events each.

For each size, with one producer connection and one consumer connection:

* ``send_receipts_msg_per_s``: persistent sends, each confirmed by a RECEIPT
  before the next (the broker writes its journal before it confirms);
* ``send_tx_msg_per_s``: persistent sends in transactions of ``--transaction``
  messages, each commit confirmed (one journal write per commit), the next
  transaction written while the broker commits one (as the producers send);
* ``receive_msg_per_s``: one consumer draining the queue, prefetch 500,
  acknowledging in batches of 200 (cumulative acks, as the consumers do);
* ``pipeline_msg_per_s`` and ``events_per_s``: producer (transactions) and
  consumer at the same time, first send to last acknowledgement: the rate the
  broker sustains end to end, which ``benchmarks.ingest`` divides its own by;
  with the CPU time per message of this process and (own broker) of the JVM.

The top-level ``events_per_s``/``messages_per_s`` are the 10 kB pipeline (the
ingest default); ``tx_vs_receipts_ratio`` compares the two ways to confirm sends
in the same run. Uses the broker of ``--broker`` (a stomp:// URL), else starts
its own on free ports (data under var/bench/broker, removed afterwards).

    python -m benchmarks.broker [--messages N] [--transaction K] [--broker URL]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from benchmarks.codec import bench_header, benchmark_tables
from benchmarks.common import BENCH_ROOT, emit
from eventindex.config import BrokerSettings, load_config
from eventindex.records.codec import encode_events, encode_message_batches
from eventindex.transport import Confirmation, Message, Transport, open_transport

PREFETCH = 500
ACK_BATCH = 200
EVENTS_PER_SMALL_MESSAGE = 100
# Receipt-confirmed sends are slow; this many are enough to measure them.
RECEIPT_SENDS_MAX = 3000


@dataclass(frozen=True)
class Payloads:
    """Encoded messages of one size, cycled to make as many as a phase needs."""

    name: str
    bodies: list[bytes]
    events: list[int]

    def take(self, count: int) -> Iterator[tuple[bytes, int]]:
        for index in range(count):
            slot = index % len(self.bodies)
            yield self.bodies[slot], self.events[slot]

    @property
    def mean_bytes(self) -> float:
        return sum(len(b) for b in self.bodies) / len(self.bodies)

    @property
    def mean_events(self) -> float:
        return sum(self.events) / len(self.events)


def build_payloads(message_bytes: int, rows: int = 60_000) -> list[Payloads]:
    header = bench_header()
    table = pa.concat_tables(benchmark_tables(rows))
    sized = [
        (body, parsed.count)
        for parsed, body in encode_message_batches(table, header, message_bytes)
    ]
    small = []
    for start in range(0, table.num_rows - EVENTS_PER_SMALL_MESSAGE + 1, EVENTS_PER_SMALL_MESSAGE):
        piece = table.slice(start, EVENTS_PER_SMALL_MESSAGE)
        small.append(
            (
                encode_events(piece, dataclasses.replace(header, count=piece.num_rows)),
                piece.num_rows,
            )
        )
    return [
        Payloads(f"{message_bytes // 1000}kB", [b for b, _ in sized], [n for _, n in sized]),
        Payloads(f"{EVENTS_PER_SMALL_MESSAGE}ev", [b for b, _ in small], [n for _, n in small]),
    ]


@contextmanager
def broker_url(requested: str | None, settings: BrokerSettings) -> Iterator[tuple[str, int | None]]:
    """The broker to measure and, if it is our own, its pid: ``requested``, else one
    started on free ports."""
    if requested:
        yield requested, None
        return
    from eventindex.cli.broker_cmd import ActiveMQProcess, free_port

    data = Path(BENCH_ROOT) / "broker"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    own = settings.model_copy(
        update={
            "url": f"stomp://127.0.0.1:{port}",
            "data_dir": str(data),
            "stomp_port": port,
            "stomp_ssl_port": free_port(),
            "openwire_port": free_port(),
        }
    )
    process = ActiveMQProcess(own)
    print(f"starting ActiveMQ on {own.url}", file=sys.stderr)
    pid = process.start()
    try:
        yield own.url, pid
    finally:
        process.stop()
        shutil.rmtree(data, ignore_errors=True)


def send_receipts(transport: Transport, queue: str, payloads: Payloads, count: int) -> float:
    started = time.perf_counter()
    for body, _ in payloads.take(count):
        transport.send(queue, body)
    return time.perf_counter() - started


def send_transactions(
    transport: Transport, queue: str, payloads: Payloads, count: int, batch: int
) -> float:
    """As the producers send: transactions of ``batch``, the next written while the broker
    commits the previous one (``Transport.send_transaction``)."""
    started = time.perf_counter()
    messages: list[tuple[bytes, dict[str, str]]] = [(body, {}) for body, _ in payloads.take(count)]
    open_one: Confirmation | None = None
    for start in range(0, count, batch):
        confirmation = transport.send_transaction(queue, messages[start : start + batch])
        if open_one is not None:
            open_one.wait()
        open_one = confirmation
    if open_one is not None:
        open_one.wait()
    return time.perf_counter() - started


def drain(transport: Transport, queue: str, count: int, timeout: float = 120.0) -> float:
    """Receive and acknowledge ``count`` messages as the consumers do (cumulative acks,
    one confirmed batch per ``ACK_BATCH``); seconds from the first call to the last ack."""
    subscription = transport.subscribe(queue, prefetch=PREFETCH, coalesce_acks=True)
    started = time.perf_counter()
    received = 0
    taken: list[Message] = []
    while received < count:
        message = transport.receive(timeout=timeout)
        if message is None:
            raise RuntimeError(f"only {received} of {count} messages arrived within {timeout} s")
        taken.append(message)
        received += 1
        if len(taken) >= ACK_BATCH or received == count:
            transport.ack_many(taken)
            taken = []
    elapsed = time.perf_counter() - started
    transport.unsubscribe(subscription)
    return elapsed


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    url: str,
    settings: BrokerSettings,
    payloads: Payloads,
    count: int,
    batch: int,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    receipts = min(count, RECEIPT_SENDS_MAX)
    with open_transport(url, settings) as producer, open_transport(url, settings) as consumer:
        queue = f"/queue/bench.broker.{tag}.receipts"
        receipts_s = send_receipts(producer, queue, payloads, receipts)
        drain(consumer, queue, receipts)

        queue = f"/queue/bench.broker.{tag}.tx"
        tx_s = send_transactions(producer, queue, payloads, count, batch)
        receive_s = drain(consumer, queue, count)

        queue = f"/queue/bench.broker.{tag}.pipeline"
        done: list[float] = []
        receiver = threading.Thread(target=lambda: done.append(drain(consumer, queue, count)))
        started = time.perf_counter()
        client_cpu, broker_cpu = time.process_time(), process_cpu_s(broker_pid)
        receiver.start()
        send_transactions(producer, queue, payloads, count, batch)
        receiver.join()
        pipeline_s = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
        broker_cpu = process_cpu_s(broker_pid) - broker_cpu
    events = sum(n for _, n in payloads.take(count))
    return {
        "messages": count,
        "mean_message_bytes": round(payloads.mean_bytes),
        "mean_events_per_message": round(payloads.mean_events, 1),
        "send_receipts_msg_per_s": round(receipts / receipts_s),
        "send_tx_msg_per_s": round(count / tx_s),
        "receive_msg_per_s": round(count / receive_s),
        "pipeline_msg_per_s": round(count / pipeline_s),
        "events_per_s": round(events / pipeline_s),
        "pipeline_mb_per_s": round(count * payloads.mean_bytes / pipeline_s / 1e6, 1),
        # CPU per message, which a crowded machine disturbs less than wall time.
        "pipeline_client_cpu_us_per_msg": round(client_cpu / count * 1e6),
        "pipeline_broker_cpu_us_per_msg": round(broker_cpu / count * 1e6) if broker_pid else None,
        "tx_vs_receipts_ratio": round(receipts_s / receipts / (tx_s / count), 2),
    }


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench broker", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per phase")
    parser.add_argument("--transaction", type=int, default=200, help="messages per commit")
    parser.add_argument("--broker", default=None, help="stomp://host:port (else own broker)")
    parser.add_argument("--journal-sync", choices=["always", "periodic", "never"], default=None)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.transaction < 1:
        parser.error("--messages and --transaction must be positive")
    config = load_config()
    settings = config.broker
    if args.journal_sync:
        settings = settings.model_copy(update={"journal_sync": args.journal_sync})
    sizes = build_payloads(config.codec.message_bytes)
    with broker_url(args.broker, settings) as (url, pid):
        figures = {
            p.name: measure(url, settings, p, args.messages, args.transaction, pid) for p in sizes
        }
    main = figures[sizes[0].name]
    return {
        "benchmark": "broker",
        "broker": f"own ActiveMQ (journal_sync={settings.journal_sync})" if pid else url,
        "transaction_messages": args.transaction,
        "messages_per_s": main["pipeline_msg_per_s"],
        "events_per_s": main["events_per_s"],
        "events_per_s_100ev": figures[sizes[1].name]["events_per_s"],
        "sizes": figures,
    }


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
