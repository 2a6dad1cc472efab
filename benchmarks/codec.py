"""Wire codec throughput on one core: decode with full validation, encode, and plain parsing.

The events come from the project's generator (``eventindex.generator``): one
run, the datasets whose events carry two and three references (AOD: RAW and
AOD; DAOD_PHYS: RAW, AOD and DAOD), with realistic trigger masks (256-bit L1,
1024-bit HLT, a few dozen bits set per event). Each dataset is split, as its
producer would, into messages of ``--message-bytes`` (default: the configured
``codec.message_bytes``, 10 kB), of 15 kB and of 100 kB, in format version 2,
and into 10 kB messages of format version 1 for comparison. Timed on one
pinned core (``--cpu``, default the last core allowed), single-threaded, in
interleaved passes so that a busy moment on a shared machine hits all alike:

* ``decode_records_per_s``: :func:`decode_events` over every message (best
  pass; ``_median`` the median pass; ``_cpu`` from process CPU time, which a
  crowded machine disturbs less than wall time);
* ``decode_messages_records_per_s``: :func:`decode_messages` over runs of
  ``--batch`` messages, as a consumer that takes messages in batches;
* ``decode_records_per_s_15kB`` and ``_100kB``: the same at those sizes;
* ``decode_records_per_s_v1``: the same events in version 1 messages, decoded
  by the same decoder in the same run (``decode_v2_vs_v1_ratio``);
* ``orjson_loads_records_per_s``: ``orjson.loads`` of the version 2 payloads and
  nothing else, the baseline of ``decode_vs_parse_ratio``;
* ``floor_records_per_s``: parse, base64-decode and decompress the compressed
  block and convert every JSON number array: the work any decoder of this
  format must do, so the gap to it is what validation and Arrow assembly cost;
* ``encode_records_per_s`` (:func:`encode_events`, one call per message) and
  ``encode_batches_records_per_s`` (:func:`encode_message_batches`, which fits
  rows to the target size), with ``_v1`` the version 1 layout in the same run.

The machine is shared: run this a few times and compare figures of the same
run rather than runs with each other.

    python -m benchmarks.codec [--rows N] [--repeats R] [--message-bytes B] [--batch K] [--cpu C]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pybase64
import zstandard

from benchmarks.common import emit, percentiles_ms
from eventindex.config import CodecSettings
from eventindex.generator import GeneratorSpec, generate_run
from eventindex.records.codec import (
    FORMAT_VERSION,
    MessageHeader,
    decode_events,
    decode_messages,
    encode_events,
    encode_message_batches,
)
from eventindex.records.schema import EVENT_SCHEMA, TRIGGER_MASK_FIELDS

LARGE_MESSAGE_BYTES = 100_000
MEDIUM_MESSAGE_BYTES = 15_000
TARGET_ENCODE_RECORDS_PER_S = 300_000
TARGET_DECODE_RECORDS_PER_S = 1_000_000
# array typecodes of the number columns, for the floor
_TYPECODES = {pa.uint16(): "H", pa.uint32(): "I", pa.uint64(): "Q", pa.bool_(): "B"}
_NUMBERS = tuple(
    (f.name, _TYPECODES.get(f.type, "f"))
    for f in EVENT_SCHEMA
    if f.name not in TRIGGER_MASK_FIELDS and f.name != "references"
)


def benchmark_tables(rows: int, seed: int = 0) -> list[pa.Table]:
    """``rows`` generated events: every DAOD_PHYS event of one run, then AOD events.

    The generator keeps about 30% of a run in the derivation, so the result is
    about 30% events with three references and 70% with two.
    """
    spec = GeneratorSpec(runs=1, events_per_run=max(rows, 1), exact=True, seed=seed)
    tables = generate_run(spec, spec.first_run)
    aod = next(t for name, t in tables.items() if ".merge.AOD.r9264" in name)
    daod = next(t for name, t in tables.items() if ".DAOD_PHYS." in name)
    daod = daod.slice(0, min(daod.num_rows, rows))
    return [daod, aod.slice(0, rows - daod.num_rows)]


def bench_header(version: int = FORMAT_VERSION) -> MessageHeader:
    return MessageHeader(
        version=version,
        producer="bench.node01",
        message_id="bench.task7562.job1",
        dataset="data15_13TeV.00284484.physics_Main.merge.AOD.r9264_p3083",
        collection="data15_13TeV.physics_Main",
        guid="F2B1A5B0-1F57-E511-9E3E-02163E0133C9",
        task_id="7562",
        job_id="1",
        count=0,
        sent_at=1_716_900_000.0,
    )


@dataclasses.dataclass
class _Messages:
    """The messages of every table at one size and version, and the time to encode them."""

    rows: int
    payloads: list[bytes]
    slices: list[tuple[MessageHeader, pa.Table]]  # each message's header and rows
    encode_batches_s: float


def _encode_batches(
    tables: list[pa.Table], message_bytes: int, version: int
) -> list[list[tuple[MessageHeader, bytes]]]:
    """Every table cut into messages as its producer would, one job id per table."""
    return [
        list(
            encode_message_batches(
                table,
                dataclasses.replace(bench_header(version), message_id=f"bench.task7562.job{i}"),
                message_bytes,
            )
        )
        for i, table in enumerate(tables)
    ]


def _encode(tables: list[pa.Table], message_bytes: int, version: int) -> _Messages:
    payloads, slices = [], []
    start = time.perf_counter()
    encoded = _encode_batches(tables, message_bytes, version)
    elapsed = time.perf_counter() - start
    for table, messages in zip(tables, encoded, strict=True):
        offset = 0
        for header, payload in messages:
            payloads.append(payload)
            slices.append((header, table.slice(offset, header.count)))
            offset += header.count
    decoded = pa.concat_tables(decode_events(payload)[1] for payload in payloads)
    if not decoded.equals(pa.concat_tables(tables)):
        raise AssertionError("the decoded messages differ from the encoded tables")
    return _Messages(sum(t.num_rows for t in tables), payloads, slices, elapsed)


def _decode_all(payloads: Sequence[bytes]) -> None:
    for payload in payloads:
        decode_events(payload)


def _decode_batched(payloads: Sequence[bytes], batch: int) -> None:
    """decode_messages over consecutive runs of ``batch`` messages, as a batching consumer."""
    for start in range(0, len(payloads), batch):
        decoded = decode_messages(payloads[start : start + batch])
        if decoded.errors:
            raise AssertionError(f"benchmark messages refused: {decoded.errors[0]}")


def _parse_all(payloads: Sequence[bytes]) -> None:
    loads = orjson.loads
    for payload in payloads:
        loads(payload)


def _zstd_size(frame: bytes) -> int:
    """The content size in a zstd frame header (the encoder always writes it)."""
    descriptor = frame[4]
    size_flag, single = descriptor >> 6, (descriptor >> 5) & 1
    at = 5 + (not single) + (0, 1, 2, 4)[descriptor & 3]
    width = (1 if single else 0, 2, 4, 8)[size_flag]
    size = int.from_bytes(frame[at : at + width], "little")
    return size + 256 if width == 2 else size


def _floor_all(payloads: Sequence[bytes], zstd: zstandard.ZstdDecompressor) -> None:
    """Parse, base64-decode and decompress, convert JSON number arrays; validate nothing.

    With the decoder's own primitives (pybase64, one reused zstd context).
    """
    for payload in payloads:
        doc = orjson.loads(payload)
        columns = doc["c"]
        if "z" in doc:
            frame = pybase64.b64decode(doc["z"], validate=True)
            zstd.decompress(frame, max_output_size=_zstd_size(frame))
        for name in TRIGGER_MASK_FIELDS:
            if "b64" in columns[name]:
                pybase64.b64decode(columns[name]["b64"], validate=True)
        for name, code in _NUMBERS:
            if type(columns[name]) is list:
                array(code, columns[name])
        for slot in columns["references"]["s"]:
            for key, code in (("g", "I"), ("p", "Q")):
                if type(slot[key]) is list:
                    array(code, slot[key])


def _timed(runners: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each pass of each runner, passes interleaved; CPU seconds as "name:cpu"."""
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, runner in runners.items():
            wall, cpu = time.perf_counter(), time.process_time()
            runner()
            times.setdefault(f"{name}:cpu", []).append(time.process_time() - cpu)
            times.setdefault(name, []).append(time.perf_counter() - wall)
    return times


def _shape(messages: _Messages) -> dict[str, Any]:
    sizes = np.array([len(payload) for payload in messages.payloads])
    return {
        "messages": len(sizes),
        "records_per_message": round(messages.rows / len(sizes), 2),
        "message_bytes_mean": round(float(sizes.mean()), 1),
        "message_bytes_max": int(sizes.max()),
        "bytes_per_record": round(float(sizes.sum()) / messages.rows, 1),
    }


def _pin(cpu: int | None) -> list[int] | None:
    """Pin the process to ``cpu`` (default: the last core it may run on); the cores it has."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0)) if cpu is None else cpu})
    return sorted(os.sched_getaffinity(0))


def run(argv: list[str]) -> dict[str, Any]:
    """Run the benchmark with command-line arguments ``argv``; return its figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="event records to encode")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes (best and median)")
    parser.add_argument(
        "--message-bytes",
        type=int,
        default=CodecSettings.model_validate({}).message_bytes,
        help="target message size (default: the configured codec.message_bytes)",
    )
    parser.add_argument(
        "--batch", type=int, default=32, help="messages per decode_messages call (batch figures)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument(
        "--cpu", type=int, default=None, help="pin to this core (default: the last one allowed)"
    )
    args = parser.parse_args(argv)
    affinity = _pin(args.cpu)
    # One core: no help from Arrow's thread pools either.
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    tables = benchmark_tables(args.rows, args.seed)
    rows = int(sum(t.num_rows for t in tables))
    small = _encode(tables, args.message_bytes, FORMAT_VERSION)
    medium = _encode(tables, MEDIUM_MESSAGE_BYTES, FORMAT_VERSION)
    large = _encode(tables, LARGE_MESSAGE_BYTES, FORMAT_VERSION)
    v1 = _encode(tables, args.message_bytes, 1)
    encoders: dict[str, Callable[[], object]] = {
        "encode_batches": functools.partial(
            _encode_batches, tables, args.message_bytes, FORMAT_VERSION
        ),
        "encode_batches_v1": functools.partial(_encode_batches, tables, args.message_bytes, 1),
        "encode": lambda: [encode_events(t, h) for h, t in small.slices],
    }
    encode_times = _timed(encoders, max(3, args.repeats // 2))
    zstd = zstandard.ZstdDecompressor()
    runners = {
        "decode": functools.partial(_decode_all, small.payloads),
        "decode_batched": functools.partial(_decode_batched, small.payloads, args.batch),
        "decode_15kB": functools.partial(_decode_all, medium.payloads),
        "decode_100kB": functools.partial(_decode_all, large.payloads),
        "decode_v1": functools.partial(_decode_all, v1.payloads),
        "parse": functools.partial(_parse_all, small.payloads),
        "parse_v1": functools.partial(_parse_all, v1.payloads),
        "floor": functools.partial(_floor_all, small.payloads, zstd),
    }
    times = _timed(runners, args.repeats)
    each = []
    for payload in small.payloads:
        began = time.perf_counter()
        decode_events(payload)
        each.append(time.perf_counter() - began)

    def best(name: str) -> float:
        return min(times[name])

    def rate(name: str, how: Callable[[Sequence[float]], float] = min, timed: Any = times) -> int:
        return round(rows / float(how(timed[name])))

    v1_shape = _shape(v1)
    decode, decode_median = rate("decode"), rate("decode", statistics.median)
    batched, batched_median = rate("decode_batched"), rate("decode_batched", statistics.median)
    encode_batches = rate("encode_batches", timed=encode_times)
    encode_batches_median = rate("encode_batches", statistics.median, encode_times)
    return {
        "benchmark": "codec",
        "rows": rows,
        "repeats": args.repeats,
        "cpu_affinity": affinity,
        "format_version": FORMAT_VERSION,
        "message_bytes_target": args.message_bytes,
        **_shape(small),
        "decode_records_per_s": decode,
        "decode_records_per_s_median": decode_median,
        "decode_records_per_s_cpu": rate("decode:cpu"),
        "decode_messages_batch": args.batch,
        "decode_messages_records_per_s": batched,
        "decode_messages_records_per_s_median": batched_median,
        "decode_messages_records_per_s_cpu": rate("decode_batched:cpu"),
        "decode_message_ms": percentiles_ms(each),
        "decode_mb_per_s": round(sum(map(len, small.payloads)) / best("decode") / 1e6, 1),
        "orjson_loads_records_per_s": rate("parse"),
        "decode_vs_parse_ratio": round(best("parse") / best("decode"), 3),
        "floor_records_per_s": rate("floor"),
        "decode_vs_floor_ratio": round(best("floor") / best("decode"), 3),
        "decode_records_per_s_15kB": rate("decode_15kB"),
        "decode_records_per_s_15kB_median": rate("decode_15kB", statistics.median),
        "decode_records_per_s_15kB_cpu": rate("decode_15kB:cpu"),
        "records_per_message_15kB": _shape(medium)["records_per_message"],
        "decode_records_per_s_100kB": rate("decode_100kB"),
        "decode_records_per_s_100kB_median": rate("decode_100kB", statistics.median),
        "decode_records_per_s_100kB_cpu": rate("decode_100kB:cpu"),
        "decode_records_per_s_v1": rate("decode_v1"),
        "decode_records_per_s_v1_median": rate("decode_v1", statistics.median),
        "decode_records_per_s_v1_cpu": rate("decode_v1:cpu"),
        "decode_v2_vs_v1_ratio": round(best("decode_v1") / best("decode"), 2),
        "decode_messages_vs_v1_ratio": round(best("decode_v1") / best("decode_batched"), 2),
        "orjson_loads_records_per_s_v1": rate("parse_v1"),
        "records_per_message_v1": v1_shape["records_per_message"],
        "bytes_per_record_v1": v1_shape["bytes_per_record"],
        "encode_records_per_s": rate("encode", timed=encode_times),
        "encode_batches_records_per_s": encode_batches,
        "encode_batches_records_per_s_median": encode_batches_median,
        "encode_batches_records_per_s_cpu": rate("encode_batches:cpu", timed=encode_times),
        "encode_batches_records_per_s_v1": rate("encode_batches_v1", timed=encode_times),
        "encode_v2_vs_v1_ratio": round(
            min(encode_times["encode_batches_v1"]) / min(encode_times["encode_batches"]), 2
        ),
        "medium_messages": {"message_bytes_target": MEDIUM_MESSAGE_BYTES, **_shape(medium)},
        "large_messages": {"message_bytes_target": LARGE_MESSAGE_BYTES, **_shape(large)},
        "target_decode_records_per_s": TARGET_DECODE_RECORDS_PER_S,
        "target_met": decode >= TARGET_DECODE_RECORDS_PER_S,
        "target_met_median": decode_median >= TARGET_DECODE_RECORDS_PER_S,
        "target_met_decode_messages": batched >= TARGET_DECODE_RECORDS_PER_S,
        "target_met_decode_messages_median": batched_median >= TARGET_DECODE_RECORDS_PER_S,
        "target_encode_records_per_s": TARGET_ENCODE_RECORDS_PER_S,
        "target_met_encode": encode_batches >= TARGET_ENCODE_RECORDS_PER_S,
    }


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
