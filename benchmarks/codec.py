"""Wire codec throughput on one core: decode with full validation, encode, and plain parsing.

Builds realistic event records (three 256-bit L1 masks with a few bits set, a
512-bit HLT mask, RAW/ESD/AOD references into a few files per message), splits
them into messages of ``--message-bytes`` (default: the configured
``codec.message_bytes``, 10 kB) and of 100 kB, and times, single-threaded:

* ``decode_records_per_s``: :func:`decode_events` over every message (best pass;
  ``_median`` the median pass; ``_cpu`` from process CPU time, which a busy
  machine disturbs less than wall time);
* ``orjson_loads_records_per_s``: ``orjson.loads`` of the same payloads and
  nothing else, the baseline of ``decode_vs_parse_ratio``;
* ``floor_records_per_s``: parse, base64-decode the masks and convert every
  number array with ``array.fromlist``: the work any decoder of this format
  must do, so the gap to it is what validation and building Arrow tables cost;
* ``encode_records_per_s`` (:func:`encode_events`, one call per message) and
  ``encode_batches_records_per_s`` (:func:`encode_message_batches`).

    python -m benchmarks.codec [--rows N] [--repeats R] [--message-bytes B]
"""

from __future__ import annotations

import argparse
import binascii
import functools
import statistics
import sys
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa

from benchmarks.common import emit, percentiles_ms
from eventindex.config import CodecSettings
from eventindex.records.codec import (
    MessageHeader,
    decode_events,
    encode_events,
    encode_message_batches,
)
from eventindex.records.schema import EVENT_SCHEMA, REFERENCE_TYPE, TRIGGER_MASK_FIELDS

LARGE_MESSAGE_BYTES = 100_000
TARGET_DECODE_RECORDS_PER_S = 1_000_000
# array typecodes of the number columns, as the decoder converts them
_TYPECODES = {pa.uint16(): "H", pa.uint32(): "I", pa.uint64(): "Q", pa.bool_(): "B"}


def _masks(rng: np.random.Generator, n: int, width: int, bits: int) -> npt.NDArray[np.uint8]:
    """``n`` masks of ``width`` bytes with up to ``bits`` random bits set in each."""
    masks = np.zeros((n, width), dtype=np.uint8)
    chosen = rng.integers(0, width * 8, size=n * bits)
    rows = np.repeat(np.arange(n), bits)
    np.bitwise_or.at(masks, (rows, chosen // 8), (1 << (chosen % 8)).astype(np.uint8))
    return masks


def _binary(masks: npt.NDArray[np.uint8]) -> pa.Array:
    n, width = masks.shape
    fixed = pa.Array.from_buffers(pa.binary(width), n, [None, pa.py_buffer(masks.tobytes())])
    return fixed.cast(pa.binary())


def _file_guids(rng: np.random.Generator, n: int, events_per_file: int) -> pa.Array:
    """One GUID per event, changing every ``events_per_file`` events (a new input file)."""
    files = (np.arange(n) + int(rng.integers(0, events_per_file))) // events_per_file
    names = [str(uuid.UUID(bytes=rng.bytes(16))).upper() for _ in range(int(files[-1]) + 1)]
    return pa.DictionaryArray.from_arrays(pa.array(files), pa.array(names)).cast(pa.string())


def realistic_events(n: int, seed: int = 1) -> pa.Table:
    """Event records of one run, as a production job emits them."""
    rng = np.random.default_rng(seed)
    index = np.arange(n)
    event_number = np.uint64(4_294_000_000) + np.cumsum(rng.integers(1, 40, n, dtype=np.uint64))
    l1_tbp = _masks(rng, n, 32, 6)
    l1_tap = l1_tbp & _masks(rng, n, 32, 40)  # after prescale: a subset of before
    l1_tav = l1_tap & _masks(rng, n, 32, 60)  # after veto: a subset again
    hlt = _masks(rng, n, 64, 4)
    events_per_file = (2000, 1000, 5000)  # RAW, ESD, AOD
    depth = len(events_per_file)
    formats = pa.array(np.tile(np.array(["RAW", "ESD", "AOD"], dtype=object), n), pa.string())
    per_format = [_file_guids(rng, n, size) for size in events_per_file]
    # slot-major (all RAW, all ESD, all AOD) to event-major order
    order = (np.arange(depth)[None, :] * n + index[:, None]).ravel()
    guids = pa.concat_arrays(per_format).take(pa.array(order))
    positions = (index[:, None] % np.array(events_per_file)).ravel().astype(np.uint64)
    references = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * depth),
        pa.StructArray.from_arrays(
            [formats, guids, pa.array(positions)], fields=list(REFERENCE_TYPE)
        ),
    )
    columns: dict[str, Any] = {
        "run_number": np.full(n, 284_484, dtype=np.uint32),
        "event_number": event_number,
        "lumi_block": (100 + index // 1500).astype(np.uint32),
        "timestamp": (1_444_700_000 + index // 1000).astype(np.uint32),
        "timestamp_ns": rng.integers(0, 1_000_000_000, n, dtype=np.uint32),
        "bcid": rng.integers(0, 3564, n, dtype=np.uint16),
        "lvl1_id": rng.integers(0, 2**32, n, dtype=np.uint32),
        "is_simulation": np.zeros(n, dtype=bool),
        "is_calibration": np.zeros(n, dtype=bool),
        "is_testbeam": np.zeros(n, dtype=bool),
        "mc_channel_number": np.zeros(n, dtype=np.uint32),
        "mc_event_weight": np.ones(n, dtype=np.float32),
        "l1_tbp": _binary(l1_tbp),
        "l1_tap": _binary(l1_tap),
        "l1_tav": _binary(l1_tav),
        "hlt_passed": _binary(hlt),
        "smk": np.full(n, 2160, dtype=np.uint32),
        "l1psk": np.full(n, 3, dtype=np.uint32),
        "hltpsk": np.full(n, 5, dtype=np.uint32),
        "references": references,
    }
    return pa.table([pa.array(columns[f.name], f.type) for f in EVENT_SCHEMA], schema=EVENT_SCHEMA)


def bench_header() -> MessageHeader:
    return MessageHeader(
        producer="bench.node01",
        message_id="bench.task7562.job1",
        dataset="data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521",
        collection="data15_13TeV.physics_Main",
        guid="F2B1A5B0-1F57-E511-9E3E-02163E0133C9",
        task_id="7562",
        job_id="1",
        count=0,
        sent_at=1_716_900_000.0,
    )


def _passes(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each of ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return walls, cpus


def _decode_all(payloads: Sequence[bytes]) -> None:
    for payload in payloads:
        decode_events(payload)


def _parse_all(payloads: Sequence[bytes]) -> None:
    loads = orjson.loads
    for payload in payloads:
        loads(payload)


def _floor_all(payloads: Sequence[bytes]) -> None:
    """Parse, base64-decode and convert numbers, validating nothing else."""
    numbers = [
        (f.name, _TYPECODES.get(f.type, "f"))
        for f in EVENT_SCHEMA
        if f.name not in TRIGGER_MASK_FIELDS and f.name != "references"
    ]
    for payload in payloads:
        columns = orjson.loads(payload)["c"]
        for name in TRIGGER_MASK_FIELDS:
            binascii.a2b_base64(columns[name]["b64"], strict_mode=True)
        for name, code in numbers:
            array(code, columns[name])
        for slot in columns["references"]["s"]:
            array("I", slot["g"])
            array("Q", slot["p"])


def _measure(table: pa.Table, message_bytes: int, repeats: int) -> dict[str, Any]:
    rows = table.num_rows
    start = time.perf_counter()
    messages = list(encode_message_batches(table, bench_header(), message_bytes))
    batches_s = time.perf_counter() - start
    payloads = [payload for _, payload in messages]
    slices = []
    offset = 0
    for header, _ in messages:
        slices.append((header, table.slice(offset, header.count)))
        offset += header.count
    encode_wall, _ = _passes(lambda: [encode_events(t, h) for h, t in slices], repeats)

    decoded = pa.concat_tables(decode_events(payload)[1] for payload in payloads)
    if not decoded.equals(table):
        raise AssertionError("the decoded messages differ from the encoded table")
    # Holding 100k decoded rows (one buffer per message) makes later passes measurably
    # slower on a small VM; a consumer writes its batches out and lets them go.
    del decoded
    # Interleaved passes, so that a noisy moment on a shared machine hits all three alike.
    runners = {"decode": _decode_all, "parse": _parse_all, "floor": _floor_all}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            wall, cpu = _passes(functools.partial(runner, payloads), 1)
            times[name][0].extend(wall)
            times[name][1].extend(cpu)
    (decode_wall, decode_cpu), (parse_wall, parse_cpu), (floor_wall, floor_cpu) = times.values()
    each = []
    for payload in payloads:
        began = time.perf_counter()
        decode_events(payload)
        each.append(time.perf_counter() - began)
    sizes = np.array([len(payload) for payload in payloads])
    return {
        "messages": len(payloads),
        "message_bytes_mean": round(float(sizes.mean()), 1),
        "message_bytes_max": int(sizes.max()),
        "records_per_message": round(rows / len(payloads), 2),
        "decode_records_per_s": round(rows / min(decode_wall)),
        "decode_records_per_s_median": round(rows / statistics.median(decode_wall)),
        "decode_records_per_s_cpu": round(rows / min(decode_cpu)),
        "decode_message_ms": percentiles_ms(each),
        "decode_mb_per_s": round(float(sizes.sum()) / min(decode_wall) / 1e6, 1),
        "orjson_loads_records_per_s": round(rows / min(parse_wall)),
        "decode_vs_parse_ratio": round(min(parse_wall) / min(decode_wall), 3),
        "floor_records_per_s": round(rows / min(floor_wall)),
        "decode_vs_floor_ratio": round(min(floor_wall) / min(decode_wall), 3),
        "decode_vs_parse_ratio_cpu": round(min(parse_cpu) / min(decode_cpu), 3),
        "decode_vs_floor_ratio_cpu": round(min(floor_cpu) / min(decode_cpu), 3),
        "encode_records_per_s": round(rows / min(encode_wall)),
        "encode_batches_records_per_s": round(rows / batches_s),
    }


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
    args = parser.parse_args(argv)
    # One core: no help from Arrow's thread pools either.
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    table = realistic_events(args.rows)
    small = _measure(table, args.message_bytes, args.repeats)
    large = _measure(table, LARGE_MESSAGE_BYTES, args.repeats)
    return {
        "benchmark": "codec",
        "rows": args.rows,
        "repeats": args.repeats,
        "message_bytes_target": args.message_bytes,
        **small,
        "decode_records_per_s_100kB": large["decode_records_per_s"],
        "large_messages": {"message_bytes_target": LARGE_MESSAGE_BYTES, **large},
        "target_decode_records_per_s": TARGET_DECODE_RECORDS_PER_S,
        "target_met": small["decode_records_per_s"] >= TARGET_DECODE_RECORDS_PER_S,
    }


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
