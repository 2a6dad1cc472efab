"""The wire codec: round trips, one test per kind of malformed message, and batching.

Malformed-message tests run against a version 1 message and against the same
plain layout labelled version 2 (plain arrays are valid version 2); the
encodings only version 2 has (constants, runs, deltas, dictionary masks and the
compressed block) have tests of their own, on messages built from a plain one.
"""

from __future__ import annotations

import binascii
import dataclasses
import itertools
import json
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventindex.errors import ValidationError
from eventindex.generator import GeneratorSpec, generate_run
from eventindex.records import codec
from eventindex.records.codec import (
    MAX_EXPANSION,
    MessageError,
    MessageHeader,
    decode_events,
    encode_events,
    encode_message_batches,
)
from eventindex.records.schema import EVENT_SCHEMA

GUIDS = (
    "0A66C3F2-56B6-E511-8B7B-02163E011F0E",
    "5d2c7a1e-0b2d-4b3a-9c4e-1f2a3b4c5d6e",
    "F2B1A5B0-1F57-E511-9E3E-02163E0133C9",
)
FORMATS = ("RAW", "ESD", "AOD", "DAOD_PHYS")
MASKS = ("l1_tbp", "l1_tap", "l1_tav", "hlt_passed")
VERSIONS = (1, 2)
needs_zstd = pytest.mark.skipif(codec.compression._ZSTD is None, reason="zstd is not available")


def make_events(
    n: int,
    *,
    seed: int = 0,
    widths: Sequence[int] = (32, 32, 32, 64),
    references: int | Sequence[int] = 3,
    run_numbers: Sequence[int] | None = None,
    event_base: int = 2**63 + 11,
) -> pa.Table:
    """``n`` events with random values; ``references`` per event (one number or one per event)."""
    rng = np.random.default_rng(seed)
    counts = [references] * n if isinstance(references, int) else list(references)
    columns: dict[str, Any] = {
        "run_number": list(run_numbers) if run_numbers is not None else [284_484] * n,
        "event_number": [event_base + 7 * i for i in range(n)],
        "lumi_block": rng.integers(0, 2**32, n).tolist(),
        "timestamp": rng.integers(0, 2**32, n).tolist(),
        "timestamp_ns": rng.integers(0, 10**9, n).tolist(),
        "bcid": rng.integers(0, 2**16, n).tolist(),
        "lvl1_id": rng.integers(0, 2**32, n).tolist(),
        "is_simulation": rng.integers(0, 2, n).astype(bool).tolist(),
        "is_calibration": rng.integers(0, 2, n).astype(bool).tolist(),
        "is_testbeam": [False] * n,
        "mc_channel_number": rng.integers(0, 2**32, n).tolist(),
        "mc_event_weight": rng.normal(1.0, 0.3, n).astype(np.float32).tolist(),
        "smk": [2160] * n,
        "l1psk": rng.integers(0, 2**32, n).tolist(),
        "hltpsk": [5] * n,
        "references": [
            [
                {
                    "format": FORMATS[k % len(FORMATS)],
                    "guid": GUIDS[(i // 4 + k) % len(GUIDS)],
                    "position": int(rng.integers(0, 2**64, dtype=np.uint64)),
                }
                for k in range(counts[i])
            ]
            for i in range(n)
        ],
    }
    for name, width in zip(MASKS, widths, strict=True):
        columns[name] = [rng.bytes(width) for _ in range(n)]
    return pa.table({f.name: columns[f.name] for f in EVENT_SCHEMA}, schema=EVENT_SCHEMA)


def replace(table: pa.Table, name: str, values: Sequence[Any]) -> pa.Table:
    """``table`` with column ``name`` replaced, keeping the schema's field (and nullability)."""
    field = EVENT_SCHEMA.field(name)
    return table.set_column(EVENT_SCHEMA.get_field_index(name), field, pa.array(values, field.type))


def make_header(count: int, **changes: Any) -> MessageHeader:
    fields: dict[str, Any] = {
        "producer": "node17.cern.ch",
        "message_id": "t7562.j42",
        "dataset": "data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521",
        "collection": "data15_13TeV.physics_Main",
        "guid": "F2B1A5B0-1F57-E511-9E3E-02163E0133C9",
        "task_id": "7562",
        "job_id": "42",
        "count": count,
        "sent_at": 1_716_900_000.25,
    }
    fields.update(changes)
    return MessageHeader(**fields)


def round_trip(table: pa.Table, header: MessageHeader | None = None, version: int = 2) -> pa.Table:
    header = header or make_header(table.num_rows, version=version)
    decoded_header, decoded = decode_events(encode_events(table, header))
    decoded.validate(full=True)
    assert decoded_header == header
    assert decoded.schema.equals(EVENT_SCHEMA, check_metadata=True)
    return decoded


def realistic_table(rows: int = 600, dataset: int = 3) -> pa.Table:
    """Rows of one generated dataset (3: the derivation, with three references an event)."""
    spec = GeneratorSpec(runs=1, events_per_run=max(rows * 4, 1000), exact=True)
    tables = list(generate_run(spec, spec.first_run).values())
    return tables[dataset].slice(0, rows)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_realistic_message(version: int) -> None:
    table = make_events(40)
    assert round_trip(table, version=version).equals(table)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_generated_events(version: int) -> None:
    table = realistic_table(300)
    assert round_trip(table, version=version).equals(table)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_keeps_event_numbers_above_2_63(version: int) -> None:
    table = make_events(3, event_base=2**64 - 15)
    decoded = round_trip(table, version=version)
    assert decoded.column("event_number").to_pylist() == [2**64 - 15, 2**64 - 8, 2**64 - 1]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("widths", [(32, 32, 32, 32), (5, 5, 5, 5), (0, 0, 0, 0), (1, 3, 7, 9)])
def test_round_trip_mask_widths(widths: tuple[int, ...], version: int) -> None:
    table = make_events(9, widths=widths)
    decoded = round_trip(table, version=version)
    assert decoded.equals(table)
    assert {len(m) for m in decoded.column("l1_tap").to_pylist()} == {widths[1]}


@pytest.mark.parametrize("version", VERSIONS)
def test_masks_of_different_widths_are_zero_padded_to_the_widest(version: int) -> None:
    table = make_events(3)
    table = replace(table, "l1_tbp", [b"\x01", b"\x02\x03\x04", b""])
    decoded = round_trip(table, version=version)
    assert decoded.column("l1_tbp").to_pylist() == [b"\x01\0\0", b"\x02\x03\x04", b"\0\0\0"]
    assert decoded.drop_columns(["l1_tbp"]).equals(table.drop_columns(["l1_tbp"]))


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_varying_and_zero_references(version: int) -> None:
    table = make_events(7, references=[0, 3, 1, 0, 4, 2, 0])
    decoded = round_trip(table, version=version)
    assert decoded.equals(table)
    assert [len(r) for r in decoded.column("references").to_pylist()] == [0, 3, 1, 0, 4, 2, 0]


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_events_without_any_reference(version: int) -> None:
    table = make_events(4, references=0)
    assert round_trip(table, version=version).equals(table)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_mixed_formats_within_a_slot(version: int) -> None:
    table = make_events(2, references=1)
    refs = [
        [{"format": "RAW", "guid": GUIDS[0], "position": 1}],
        [{"format": "AOD", "guid": GUIDS[1], "position": 2}],
    ]
    table = replace(table, "references", refs)
    payload = encode_events(table, make_header(2, version=version))
    assert orjson.loads(payload)["c"]["references"]["s"][0]["f"] == ["RAW", "AOD"]
    assert round_trip(table, version=version).equals(table)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_empty_message(version: int) -> None:
    table = make_events(0)
    decoded = round_trip(table, version=version)
    assert decoded.num_rows == 0
    assert decoded.equals(table)


def test_decodes_str_payloads_and_header_without_sent_at() -> None:
    table = make_events(5)
    header = make_header(5, sent_at=None)
    payload = encode_events(table, header)
    assert b"sent_at" not in payload
    decoded_header, decoded = decode_events(payload.decode())
    assert decoded_header == header
    assert decoded.equals(table)


def test_version_1_layout_is_plain_and_columnar() -> None:
    payload = encode_events(make_events(3, widths=(1, 1, 1, 2)), make_header(3, version=1))
    doc = orjson.loads(payload)
    assert set(doc) == {"v", "h", "c"}
    assert doc["v"] == 1
    assert set(doc["c"]) == set(EVENT_SCHEMA.names)
    assert doc["c"]["is_testbeam"] == [0, 0, 0]
    assert doc["c"]["smk"] == [2160, 2160, 2160]
    assert doc["c"]["hlt_passed"]["w"] == 2
    refs = doc["c"]["references"]
    assert refs["n"] == 3
    assert [slot["f"] for slot in refs["s"]] == ["RAW", "ESD", "AOD"]
    assert all(len(slot["g"]) == len(slot["p"]) == 3 for slot in refs["s"])
    # the GUID table holds each file once, and every file a reference names
    used = {refs["g"][i] for slot in refs["s"] for i in slot["g"]}
    assert len(refs["g"]) == len(set(refs["g"])) == len(used)
    assert len(doc["c"]["l1_tbp"]["b64"]) == 4  # 3 masks of 1 byte: one base64 quad


@needs_zstd
def test_version_2_layout_picks_an_encoding_per_array() -> None:
    n = 40
    table = make_events(n, references=2)
    table = replace(table, "lumi_block", [7] * n)  # constant
    table = replace(table, "timestamp", [1_444_700_000 + i // 15 for i in range(n)])  # 3 runs
    table = replace(table, "is_simulation", [True] * n)
    table = replace(table, "mc_event_weight", [0.5] * n)
    table = replace(table, "l1_tav", [b"\x00\x01"] * n)  # constant mask
    table = replace(table, "hlt_passed", [bytes([i % 2, 0, 0, 7]) for i in range(n)])  # 2 masks
    refs = [
        [
            {"format": "RAW", "guid": GUIDS[0], "position": 10 + i},
            {"format": "AOD", "guid": GUIDS[1 + i % 2], "position": 3 * i},
        ]
        for i in range(n)
    ]
    table = replace(table, "references", refs)
    doc = orjson.loads(encode_events(table, make_header(n)))
    columns = doc["c"]
    assert doc["v"] == 2
    assert columns["run_number"] == {"k": 284_484}
    assert columns["lumi_block"] == {"k": 7}
    # three runs: in the block, where they compress to less than {"r": [...]} and cost
    # no Python step to decode
    assert columns["timestamp"] == {"z": "zstd"}
    assert columns["is_simulation"] == {"k": 1}
    assert columns["is_calibration"] == [int(v) for v in table["is_calibration"].to_pylist()]
    assert columns["mc_event_weight"] == {"k": 0.5}
    for name in ("event_number", "timestamp_ns", "bcid", "lvl1_id"):
        assert columns[name] == {"z": "zstd"}
    assert columns["l1_tbp"] == {"w": 32, "z": "zstd"}
    assert columns["l1_tav"] == {"w": 2, "k": "AAE="}
    # two distinct masks: a dictionary would do, but repeats cost little in the block
    assert columns["hlt_passed"] == {"w": 4, "z": "zstd"}
    slots = columns["references"]["s"]
    assert slots[0]["g"] == {"k": 0}
    assert slots[1]["g"] == {"z": "zstd"}
    assert slots[0]["p"] == slots[1]["p"] == {"z": "zstd"}
    assert isinstance(doc["z"], str)
    assert round_trip(table).equals(table)


@needs_zstd
def test_tiny_messages_stay_plain_json() -> None:
    doc = orjson.loads(encode_events(make_events(2), make_header(2)))
    assert "z" not in doc
    assert isinstance(doc["c"]["bcid"], list)
    assert set(doc["c"]["l1_tbp"]) == {"w", "b64"}


def test_without_zstd_the_encoder_writes_deltas_and_plain_masks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(codec.compression, "_ZSTD", None)
    n = 30
    table = make_events(n, event_base=4_294_000_000)
    table = replace(table, "timestamp", [1_444_700_000 + i // 15 for i in range(n)])
    doc = orjson.loads(encode_events(table, make_header(n)))
    assert "z" not in doc
    assert doc["c"]["event_number"] == {"d": [4_294_000_000] + [7] * (n - 1)}
    assert doc["c"]["timestamp"] == {"r": [1_444_700_000, 15, 1_444_700_001, 15]}
    assert isinstance(doc["c"]["timestamp_ns"], list)  # random: plain is smaller
    assert set(doc["c"]["l1_tbp"]) == {"w", "b64"}
    assert round_trip(table).equals(table)


def test_without_zstd_few_distinct_masks_become_a_dictionary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(codec.compression, "_ZSTD", None)
    n = 40
    table = replace(make_events(n), "hlt_passed", [bytes([i % 2, 0, 0, 7]) for i in range(n)])
    doc = orjson.loads(encode_events(table, make_header(n)))
    assert doc["c"]["hlt_passed"] == {"w": 4, "u": "AAAABwEAAAc=", "i": [i % 2 for i in range(n)]}
    assert set(doc["c"]["l1_tbp"]) == {"w", "b64"}  # 40 random masks: no dictionary
    assert round_trip(table).equals(table)


def test_a_consumer_without_zstd_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec.compression, "_ZSTD", None)
    error = rejects(VALID_V2)
    assert (error.field, error.reason) == (
        "z",
        "compressed block: zstd is not available here",
    )


def test_the_documented_example_is_a_valid_message() -> None:
    doc = codec.__doc__ or ""
    example = doc[doc.index('{"v": 2') : doc.index("* ``v``")]
    header, table = decode_events(example)
    assert (header.count, table.num_rows) == (3, 3)
    assert table.column("event_number").to_pylist() == [4294967312, 4294967329, 4294967338]
    assert table.column("timestamp").to_pylist() == [1444700000, 1444700000, 1444700001]
    assert table.column("timestamp_ns").to_pylist() == [120000, 5000, 999000]
    assert table.column("l1_tav").to_pylist() == [b"\x04", b"\x05", b"\x04"]
    assert table.column("l1_tbp").to_pylist() == [b"\x01\x80", b"\x03\x00", b"\x01\x81"]
    refs = table.column("references").to_pylist()
    assert [ref["position"] for ref in refs[2]] == [43, 7]
    assert refs[2][1]["guid"] == "0A66C3F2-56B6-E511-8B7B-02163E011F0E"


@pytest.mark.parametrize("version", VERSIONS)
def test_ipc_assembly_matches_array_by_array_assembly(version: int) -> None:
    table = make_events(11, references=[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1], widths=(5, 0, 3, 9))
    payload = encode_events(table, make_header(11, version=version))
    _, fast = decode_events(payload)
    assert codec.assembly._ASSEMBLER.use_ipc, (
        "the Arrow IPC shortcut is off: decoding works, slower"
    )
    codec.assembly._ASSEMBLER.use_ipc = False
    try:
        _, slow = decode_events(payload)
    finally:
        codec.assembly._ASSEMBLER.use_ipc = True
    slow.validate(full=True)
    assert fast.equals(slow)
    assert fast.equals(table)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_slices_of_chunked_tables(version: int) -> None:
    table = make_events(30, references=[i % 5 for i in range(30)], widths=(3, 0, 7, 9))
    chunked = pa.concat_tables([table.slice(0, 7), table.slice(7, 9), table.slice(16)])
    for start, length in [(0, 30), (3, 10), (5, 20), (29, 1), (30, 0)]:
        piece = chunked.slice(start, length)
        assert round_trip(piece, version=version).equals(table.slice(start, length))


def test_encode_accepts_chunked_and_nullable_tables() -> None:
    table = make_events(6)
    loose = pa.concat_tables([table.slice(0, 2), table.slice(2)])
    loose = pa.table({name: loose.column(name) for name in reversed(EVENT_SCHEMA.names)})
    assert not loose.schema.equals(EVENT_SCHEMA)
    assert round_trip(loose).equals(table)


def test_negative_zero_weights_keep_their_sign() -> None:
    table = replace(make_events(4), "mc_event_weight", [-0.0] * 4)
    weights = round_trip(table).column("mc_event_weight").to_numpy()
    assert np.signbit(weights).all()
    table = replace(make_events(4), "mc_event_weight", [0.0] * 4)
    assert not np.signbit(round_trip(table).column("mc_event_weight").to_numpy()).any()


# --------------------------------------------------------------------------- malformed

VALID = encode_events(make_events(20, references=[3] * 19 + [1]), make_header(20, version=1))
VALID_UNEVEN = encode_events(
    make_events(6, references=[0, 2, 1, 3, 0, 2]), make_header(6, version=1)
)
VALID_MIXED = encode_events(
    replace(
        make_events(3, references=1),
        "references",
        [[{"format": fmt, "guid": GUIDS[0], "position": 7}] for fmt in ("RAW", "AOD", "RAW")],
    ),
    make_header(3, version=1),
)


def as_version_2(payload: bytes) -> bytes:
    """The same plain message, labelled version 2 (plain arrays are valid version 2)."""
    doc = orjson.loads(payload)
    doc["v"] = 2
    return orjson.dumps(doc)


VALID_V2 = encode_events(make_events(20, references=[3] * 19 + [1]), make_header(20))
PLAIN = {1: VALID, 2: as_version_2(VALID)}
UNEVEN = {1: VALID_UNEVEN, 2: as_version_2(VALID_UNEVEN)}


def mutated(change: Callable[[dict[str, Any]], object], base: bytes = VALID) -> bytes:
    doc = orjson.loads(base)
    change(doc)
    return json.dumps(doc).encode()  # the standard library writes integers of any size


def rejects(payload: bytes | str, **kwargs: Any) -> MessageError:
    with pytest.raises(MessageError) as caught:
        decode_events(payload, **kwargs)
    return caught.value


def setter(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set ``doc[a][b][...]`` for a path like ``c.run_number.3``."""

    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


@pytest.fixture(params=VERSIONS, ids=["v1", "v2"])
def base(request: pytest.FixtureRequest) -> bytes:
    """A valid plain message of 20 events, as version 1 and as version 2."""
    return PLAIN[request.param]


@pytest.fixture(params=VERSIONS, ids=["v1", "v2"])
def uneven(request: pytest.FixtureRequest) -> bytes:
    """A valid plain message of 6 events with 0, 2, 1, 3, 0, 2 references."""
    return UNEVEN[request.param]


def test_error_names_field_row_and_reason(base: bytes) -> None:
    error = rejects(mutated(setter("c.event_number.17", -3), base))
    assert isinstance(error, ValidationError)
    assert (error.field, error.row, error.reason) == ("event_number", 17, "negative value -3")
    assert str(error) == "field 'event_number', row 17: negative value -3"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.field, copy.row, copy.reason, str(copy)) == (
        error.field,
        error.row,
        error.reason,
        str(error),
    )


def test_rejects_text_that_is_not_json() -> None:
    error = rejects(b'{"v": 1, "h": ')
    assert error.field is None and error.row is None
    assert error.reason.startswith("not JSON")


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"text"', b"17", b"null"])
def test_rejects_json_that_is_not_an_object(payload: bytes) -> None:
    assert rejects(payload).reason.startswith("expected a JSON object")


def test_rejects_oversize_payload_before_parsing() -> None:
    error = rejects(b" " * 2000 + b"{", max_bytes=1024)
    assert error.reason == "message is 2001 bytes, over the limit of 1024"
    assert rejects(VALID.decode(), max_bytes=len(VALID) - 1).reason.startswith("message is")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda doc: doc.pop("v"), "missing format version"),
        (setter("v", 3), "unknown format version integer 3"),
        (setter("v", "1"), 'unknown format version string "1"'),
        (setter("v", True), "unknown format version boolean true"),
    ],
)
def test_rejects_unknown_or_missing_version(
    change: Callable[[Any], Any], reason: str, base: bytes
) -> None:
    error = rejects(mutated(change, base))
    assert error.field == "v"
    assert error.reason.startswith(reason)


def test_rejects_missing_and_unknown_top_level_keys(base: bytes) -> None:
    assert rejects(mutated(lambda doc: doc.pop("h"), base)).field == "h"
    error = rejects(mutated(setter("x", 1), base))
    assert (error.field, error.reason) == ("x", "unknown key")


def test_rejects_missing_header_field(base: bytes) -> None:
    error = rejects(mutated(lambda doc: doc["h"].pop("dataset"), base))
    assert (error.field, error.row, error.reason) == (
        "header.dataset",
        None,
        "missing header field",
    )


def test_rejects_extra_header_field(base: bytes) -> None:
    error = rejects(mutated(setter("h.priority", 3), base))
    assert (error.field, error.reason) == ("header.priority", "unknown header field")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("producer", "", 'expected a non-empty string, got string ""'),
        ("job_id", 42, "expected a non-empty string, got integer 42"),
        ("count", -1, "expected an event count"),
        ("count", True, "expected an event count"),
        ("sent_at", "now", "expected seconds since the epoch"),
        ("sent_at", -1.0, "expected seconds since the epoch"),
        ("message_id", ["m"], "expected a non-empty string, got array"),
    ],
)
def test_rejects_bad_header_values(field: str, value: Any, reason: str, base: bytes) -> None:
    decode_events(base)  # the header's producer and dataset are now known: the fast path
    error = rejects(mutated(setter(f"h.{field}", value), base))
    assert error.field == f"header.{field}"
    assert error.reason.startswith(reason)


def test_known_producers_get_the_same_header_checks() -> None:
    decode_events(VALID_V2)
    header, _ = decode_events(VALID_V2)
    assert header == make_header(20)
    error = rejects(mutated(setter("h.dataset", ["x"]), VALID_V2))
    assert error.field == "header.dataset"
    error = rejects(mutated(setter("v", True), VALID_V2))
    assert error.field == "v"
    header, _ = decode_events(mutated(setter("h.sent_at", None), VALID_V2))  # null: left out
    assert header.sent_at is None


@pytest.mark.parametrize(
    "guid",
    [
        "F2B1A5B0-1F57-E511-9E3E-02163E0133C",  # short
        "F2B1A5B01F57E5119E3E02163E0133C9",  # no dashes
        "G2B1A5B0-1F57-E511-9E3E-02163E0133C9",  # not hex
        "{F2B1A5B0-1F57-E511-9E3E-02163E0133C9}",  # braces
        "F2B1A5B0-1F57-E511-9E3E-02163E0133C9\n",  # trailing newline
    ],
)
def test_rejects_bad_header_guid(guid: str, base: bytes) -> None:
    error = rejects(mutated(setter("h.guid", guid), base))
    assert error.field == "header.guid"
    assert error.reason.startswith("not a canonical 8-4-4-4-12 hex GUID")


def test_header_accepts_lower_case_guid_and_checks_on_construction() -> None:
    assert make_header(0, guid=GUIDS[1].lower()).guid == GUIDS[1].lower()
    with pytest.raises(MessageError) as caught:
        make_header(0, guid="not-a-guid")
    assert caught.value.field == "header.guid"


def test_rejects_missing_column(base: bytes) -> None:
    error = rejects(mutated(lambda doc: doc["c"].pop("bcid"), base))
    assert (error.field, error.row, error.reason) == ("bcid", None, "missing column")


def test_rejects_unknown_column(base: bytes) -> None:
    error = rejects(mutated(setter("c.pileup", [0] * 20), base))
    assert (error.field, error.reason) == ("pileup", "unknown column")


@pytest.mark.parametrize(
    ("path", "value", "field", "row", "reason"),
    [
        ("c.run_number.2", "284484", "run_number", 2, 'expected an integer, got string "284484"'),
        ("c.lumi_block.5", 1.5, "lumi_block", 5, "expected an integer, got number 1.5"),
        ("c.lumi_block.6", 7.0, "lumi_block", 6, "expected an integer, got number 7.0"),
        ("c.timestamp.0", None, "timestamp", 0, "expected an integer, got null"),
        ("c.smk.19", [1], "smk", 19, "expected an integer, got array [1]"),
        ("c.lvl1_id.3", True, "lvl1_id", 3, "expected an integer, got boolean true"),
        ("c.event_number.4", False, "event_number", 4, "expected an integer, got boolean false"),
        ("c.is_simulation.1", True, "is_simulation", 1, "expected 0 or 1, got boolean true"),
        ("c.mc_event_weight.8", "1", "mc_event_weight", 8, 'expected a number, got string "1"'),
        ("c.mc_event_weight.9", True, "mc_event_weight", 9, "expected a number, got boolean true"),
    ],
)
def test_rejects_wrong_json_types(
    path: str, value: Any, field: str, row: int, reason: str, base: bytes
) -> None:
    error = rejects(mutated(setter(path, value), base))
    assert (error.field, error.row, error.reason) == (field, row, reason)


@pytest.mark.parametrize(
    ("path", "value", "field", "row", "reason"),
    [
        ("c.lumi_block.7", -1, "lumi_block", 7, "negative value -1"),
        (
            "c.timestamp.3",
            2**32,
            "timestamp",
            3,
            "value 4294967296 out of range for uint32 (max 4294967295)",
        ),
        ("c.bcid.11", 65536, "bcid", 11, "value 65536 out of range for uint16 (max 65535)"),
        ("c.is_calibration.2", 2, "is_calibration", 2, "expected 0 or 1, got integer 2"),
        ("c.is_testbeam.0", -1, "is_testbeam", 0, "expected 0 or 1, got integer -1"),
        ("c.mc_event_weight.1", 1e39, "mc_event_weight", 1, "value 1e+39 out of range for float32"),
    ],
)
def test_rejects_values_out_of_range(
    path: str, value: Any, field: str, row: int, reason: str, base: bytes
) -> None:
    error = rejects(mutated(setter(path, value), base))
    assert (error.field, error.row) == (field, row)
    assert error.reason.startswith(reason)


def test_rejects_event_number_above_2_64_minus_1(base: bytes) -> None:
    seventh = str(2**63 + 11 + 7 * 6)
    error = rejects(base.decode().replace(seventh, str(2**64), 1))
    assert (error.field, error.row) == ("event_number", 6)
    assert "out of range for uint64" in error.reason
    at_limit = base.decode().replace(seventh, str(2**64 - 1), 1)
    assert decode_events(at_limit)[1].column("event_number")[6].as_py() == 2**64 - 1


@pytest.mark.parametrize("column", ["run_number", "event_number", "is_testbeam", "mc_event_weight"])
def test_rejects_column_length_other_than_count(column: str, base: bytes) -> None:
    error = rejects(mutated(lambda doc: doc["c"][column].pop(), base))
    assert (error.field, error.row, error.reason) == (
        column,
        None,
        "has 19 values, the header count is 20",
    )


def test_rejects_column_that_is_not_an_array(base: bytes) -> None:
    error = rejects(mutated(setter("c.lvl1_id", {"0": 1}), base))
    assert error.field == "lvl1_id"
    assert error.reason.startswith("expected an array")
    assert error.reason.endswith('got object {"0":1}')


def test_version_1_refuses_the_encodings_of_version_2() -> None:
    for name, spec in [("lvl1_id", {"k": 1}), ("is_testbeam", {"k": 0}), ("bcid", {"z": "zstd"})]:
        error = rejects(mutated(setter(f"c.{name}", spec), VALID))
        assert (error.field, error.reason) == (
            name,
            f"expected an array, got {codec.wire._describe(spec)}",
        )
    error = rejects(mutated(setter("c.l1_tbp", {"w": 32, "k": "AAAA"}), VALID))
    assert (error.field, error.reason) == ("l1_tbp", "trigger mask: missing key 'b64'")
    error = rejects(mutated(setter("z", "KLUv/SAAAQAA"), VALID))
    assert (error.field, error.reason) == ("z", "unknown key")
    error = rejects(mutated(setter("c.references.s.0.p", {"k": 1}), VALID))
    assert error.reason.startswith("slot 0: position: expected an array of 20 integers, got object")


def test_rejects_count_that_disagrees_with_every_column(base: bytes) -> None:
    error = rejects(mutated(setter("h.count", 21), base))
    assert error.field == "run_number"
    assert error.reason == "has 20 values, the header count is 21"


def test_rejects_count_larger_than_the_message_could_carry() -> None:
    error = rejects(mutated(setter("h.count", 10**6), VALID_V2))
    assert error.field == "header.count"
    assert error.reason.startswith("count 1000000 is more events than a ")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("AAAA!AAA", "mask data: bad base64"),
        ("AAA", "mask data: bad base64"),
        ("AA==AA==", "mask data: bad base64"),
        ("ÄAAA", "mask data: bad base64"),
    ],
)
def test_rejects_bad_base64(text: str, reason: str, base: bytes) -> None:
    error = rejects(mutated(setter("c.l1_tav.b64", text), base))
    assert error.field == "l1_tav"
    assert error.reason.startswith(reason)


def test_rejects_mask_bytes_that_are_not_width_times_count(base: bytes) -> None:
    error = rejects(mutated(setter("c.hlt_passed.w", 63), base))
    assert error.field == "hlt_passed"
    assert error.reason == "mask data is 1280 bytes, not width 63 x 20 events = 1260"
    error = rejects(mutated(setter("c.l1_tbp.b64", "AAAA"), base))
    assert error.reason == "mask data is 3 bytes, not width 32 x 20 events = 640"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (setter("c.l1_tbp.w", -32), "mask width: expected bytes >= 0, got integer -32"),
        (setter("c.l1_tbp.w", "32"), 'mask width: expected bytes >= 0, got string "32"'),
        (setter("c.l1_tbp.b64", None), "mask data: expected base64 text, got null"),
        (lambda doc: doc["c"]["l1_tbp"].pop("w"), "trigger mask: missing key 'w'"),
        (setter("c.l1_tbp.hex", ""), "trigger mask: unknown key 'hex'"),
        (setter("c.l1_tbp", "AAAA"), 'trigger mask: expected an object, got string "AAAA"'),
    ],
)
def test_rejects_malformed_mask_objects(
    change: Callable[[Any], Any], reason: str, base: bytes
) -> None:
    error = rejects(mutated(change, base))
    assert (error.field, error.reason) == ("l1_tbp", reason)


def test_rejects_reference_guid_index_out_of_range(base: bytes) -> None:
    doc = orjson.loads(base)
    table_size = len(doc["c"]["references"]["g"])
    error = rejects(mutated(setter("c.references.s.1.g.12", table_size), base))
    assert (error.field, error.row) == ("references", 12)
    assert error.reason == (
        f"slot 1: guid index {table_size} out of range (the guid table has {table_size} entries)"
    )


def test_reference_errors_name_the_event_row_when_counts_vary(uneven: bytes) -> None:
    # counts [0, 2, 1, 3, 0, 2]: slot 1 holds the references of events 1, 3 and 5
    error = rejects(mutated(setter("c.references.s.1.p.2", -5), uneven))
    assert (error.field, error.row, error.reason) == (
        "references",
        5,
        "slot 1: position: negative value -5",
    )
    error = rejects(mutated(setter("c.references.s.2.g.0", 9), uneven))
    assert (error.field, error.row) == ("references", 3)


@pytest.mark.parametrize(
    ("guid", "reason"),
    [
        ("0A66C3F2-56B6-E511-8B7B-02163E011F0", "guid table entry 0: not a canonical GUID"),
        ("0A66C3F2_56B6_E511_8B7B_02163E011F0E", "guid table entry 0: not a canonical GUID"),
        (7, "guid table entry 0: not a canonical GUID: integer 7"),
        ([1], "guid table entry 0: not a canonical GUID: array [1]"),
    ],
)
def test_rejects_bad_reference_guid_strings(guid: Any, reason: str, base: bytes) -> None:
    error = rejects(mutated(setter("c.references.g.0", guid), base))
    assert (error.field, error.row) == ("references", None)
    assert error.reason.startswith(reason)


def test_rejects_repeated_guid_in_the_table(base: bytes) -> None:
    def repeat_first(doc: dict[str, Any]) -> None:
        doc["c"]["references"]["g"].append(doc["c"]["references"]["g"][0])

    error = rejects(mutated(repeat_first, base))
    assert error.reason.startswith("guid table entry 3 repeats entry 0")


@pytest.mark.parametrize(
    ("change", "row", "reason"),
    [
        (setter("c.references.n", 2), None, "every event has 2 references but there are 3 slots"),
        (setter("c.references.n", [3] * 19), None, "has 19 reference counts, the header"),
        (setter("c.references.n", [2] * 19 + [1]), None, "has 3 reference slots, but the most"),
        (setter("c.references.n.4", -1), 4, "reference count: negative value -1"),
        (setter("c.references.n", "3"), None, "reference count: expected an integer or an array"),
        (setter("c.references.s.0.f", "R AW"), None, 'slot 0: invalid format string "R AW"'),
        (setter("c.references.s.0.f", ["RAW"] * 19 + [""]), 19, "slot 0: invalid format"),
        (setter("c.references.s.0.f", ["RAW"] * 18 + [["AOD"], "ESD"]), 18, "slot 0: invalid"),
        (setter("c.references.s.0.f", ["RAW"] * 19), None, "slot 0: has 19 formats for 20"),
        (setter("c.references.s.2.p", [1] * 20), None, "slot 2: position: expected an array of 19"),
        (setter("c.references.s.0.p.3", 2**64), 3, "slot 0: position: value 1.84467440737"),
        (setter("c.references.s.0.g.1", 0.0), 1, "slot 0: guid index: expected an integer"),
        (setter("c.references.s.0.q", []), None, "slot 0: unknown key 'q'"),
        (setter("c.references.s.1", []), None, "slot 1: expected an object, got array []"),
        (setter("c.references.s", {}), None, "slots: expected an array, got object"),
        (setter("c.references.g", "x"), None, 'guid table: expected an array, got string "x"'),
        (lambda doc: doc["c"]["references"].pop("g"), None, "references: missing key 'g'"),
    ],
)  # fmt: skip
def test_rejects_malformed_references(
    change: Callable[[Any], Any], row: int | None, reason: str, base: bytes
) -> None:
    error = rejects(mutated(change, base))
    assert (error.field, error.row) == ("references", row)
    assert error.reason.startswith(reason), error.reason


def test_rejects_boolean_reference_count(uneven: bytes) -> None:
    # event 2 has one reference, so true (== 1) keeps every slot the right size
    error = rejects(mutated(setter("c.references.n.2", True), uneven))
    assert (error.field, error.row) == ("references", 2)
    assert error.reason == "reference count: expected an integer, got boolean true"


def test_rejects_duplicate_key_inside_a_message(base: bytes) -> None:
    doc = orjson.loads(base)
    error = rejects(mutated(setter("c.event_number.15", doc["c"]["event_number"][4]), base))
    assert (error.field, error.row) == ("event_number", 15)
    assert error.reason.endswith("first at row 4")


@pytest.mark.parametrize("version", VERSIONS)
def test_same_event_number_in_two_runs_is_not_a_duplicate(version: int) -> None:
    table = make_events(4, run_numbers=[1, 2, 2, 1], event_base=10)
    table = replace(table, "event_number", [10, 10, 11, 11])
    assert round_trip(table, version=version).equals(table)
    payload = as_version_2(encode_events(table, make_header(4, version=1)))
    error = rejects(mutated(setter("c.run_number.3", 2), payload))
    assert (error.field, error.row) == ("event_number", 3)
    assert error.reason.startswith("duplicate key (run_number=2, event_number=11)")


# --------------------------------------------------------------------------- version 2 encodings


def plain(**changes: Any) -> dict[str, Any]:
    """The plain version 2 document of VALID, with columns replaced by ``changes``."""
    doc: dict[str, Any] = orjson.loads(PLAIN[2])
    doc["c"].update(changes)
    return doc


def packed(doc: dict[str, Any], names: Sequence[str], slots: Sequence[str] = ()) -> dict[str, Any]:
    """``doc`` with columns ``names`` and reference arrays ``slots`` ("0.p") in a z block."""
    block = []
    for field in EVENT_SCHEMA:
        if field.name not in names:
            continue
        spec = doc["c"][field.name]
        if field.type == pa.binary():
            block.append(binascii.a2b_base64(spec["b64"]))
            doc["c"][field.name] = {"w": spec["w"], "z": "zstd"}
        else:
            item = {pa.uint16(): "H", pa.uint32(): "I", pa.uint64(): "Q", pa.float32(): "f"}
            block.append(struct.pack(f"<{len(spec)}{item[field.type]}", *spec))
            doc["c"][field.name] = {"z": "zstd"}
    for k, slot in enumerate(doc["c"]["references"]["s"]):
        for key, code in (("g", "I"), ("p", "Q")):
            if f"{k}.{key}" in slots:
                block.append(struct.pack(f"<{len(slot[key])}{code}", *slot[key]))
                slot[key] = {"z": "zstd"}
    assert codec.compression._ZSTD is not None
    doc["z"] = zstd_text(b"".join(block))
    return doc


def zstd_text(data: bytes) -> str:
    assert codec.compression._ZSTD is not None
    return binascii.b2a_base64(codec.compression._ZSTD.compress(data), newline=False).decode()


def decodes_like_plain(doc: dict[str, Any]) -> None:
    """``doc`` decodes, to the same events as the plain message."""
    _, expected = decode_events(PLAIN[2])
    _, table = decode_events(orjson.dumps(doc))
    table.validate(full=True)
    assert table.equals(expected)


def events_of(name: str) -> list[Any]:
    return list(orjson.loads(PLAIN[2])["c"][name])


def test_constant_columns_decode() -> None:
    doc = plain(smk={"k": 2160}, hltpsk={"k": 5}, is_testbeam={"k": 0})
    decodes_like_plain(doc)
    _, table = decode_events(orjson.dumps(plain(mc_event_weight={"k": 2}, is_testbeam={"k": 1})))
    assert table.column("mc_event_weight").to_pylist() == [2.0] * 20
    assert table.column("is_testbeam").to_pylist() == [True] * 20


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("smk", -1, "constant: negative value -1"),
        ("smk", 2**32, "constant: value 4294967296 out of range for uint32 (max 4294967295)"),
        ("smk", "2160", 'constant: expected an integer, got string "2160"'),
        ("smk", True, "constant: expected an integer, got boolean true"),
        ("smk", 2160.0, "constant: expected an integer, got number 2160.0"),
        ("bcid", 65536, "constant: value 65536 out of range for uint16 (max 65535)"),
        ("is_testbeam", 2, "constant: expected 0 or 1, got integer 2"),
        ("is_testbeam", False, "constant: expected 0 or 1, got boolean false"),
        ("mc_event_weight", 1e39, "constant: value 1e+39 out of range for float32"),
        ("mc_event_weight", None, "constant: expected a number, got null"),
        ("mc_event_weight", True, "constant: expected a number, got boolean true"),
    ],
)
def test_rejects_constant_with_a_bad_value(column: str, value: Any, reason: str) -> None:
    error = rejects(json.dumps(plain(**{column: {"k": value}})))
    assert (error.field, error.row) == (column, None)
    assert error.reason.startswith(reason), error.reason


@pytest.mark.parametrize(
    ("column", "spec", "reason"),
    [
        ("smk", {"k": 1, "d": [1]}, "expected an array or"),
        ("smk", {"x": 1}, "expected an array or"),
        ("smk", {}, "expected an array or"),
        ("is_testbeam", {"d": [0] * 20}, "expected an array or"),
        ("is_testbeam", {"z": "zstd"}, "expected an array or"),
        ("mc_event_weight", {"r": [1.0, 20]}, "expected an array or"),
    ],
)
def test_rejects_unknown_encodings(column: str, spec: Any, reason: str) -> None:
    error = rejects(json.dumps(plain(**{column: spec})))
    assert error.field == column
    assert error.reason.startswith(reason)


def test_delta_columns_decode() -> None:
    events = events_of("event_number")
    steps = [events[0]] + [b - a for a, b in itertools.pairwise(events)]
    stamps = events_of("timestamp")  # random: deltas of both signs
    doc = plain(
        event_number={"d": steps},
        timestamp={"d": [stamps[0]] + [b - a for a, b in itertools.pairwise(stamps)]},
    )
    decodes_like_plain(doc)


@pytest.mark.parametrize(
    ("column", "steps", "row", "reason"),
    [
        ("lumi_block", [5, 1, -7] + [0] * 17, 2, "negative value -1"),
        ("lumi_block", [2**32 - 2, 1, 1] + [0] * 17, 2, "value 4294967296 out of range for uint32"),
        ("lumi_block", [-1] + [0] * 19, 0, "negative value -1"),
        ("event_number", [2**64 - 1, 1] + [0] * 18, 1, "value 18446744073709551616 out of range"),
        ("event_number", [2**64 - 2, 2**62, -(2**62)] + [0] * 17, 1, "value 23058430092136939518"),
        ("bcid", [1, 65534] + [0] * 18, 1, "value 65535"),  # in range: decodes
        ("bcid", [1, 65535] + [0] * 18, 1, "value 65536 out of range for uint16"),
        ("lumi_block", [1, "2"] + [0] * 18, 1, 'delta: expected an integer, got string "2"'),
        ("lumi_block", [1, 2.5] + [0] * 18, 1, "delta: expected an integer, got number 2.5"),
        ("lumi_block", [1, None] + [0] * 18, 1, "delta: expected an integer, got null"),
        ("lumi_block", [1, True] + [0] * 18, 1, "delta: expected an integer, got boolean true"),
        ("lumi_block", [True] + [0] * 19, 0, "expected an integer, got boolean true"),
        ("lumi_block", [1.0] + [0] * 19, 0, "expected an integer, got number 1.0"),
    ],
)
def test_delta_sums_are_range_checked(column: str, steps: list[Any], row: int, reason: str) -> None:
    payload = json.dumps(plain(**{column: {"d": steps}}))
    if reason == "value 65535":
        assert decode_events(payload)[1].column("bcid")[1].as_py() == 65535
        return
    error = rejects(payload)
    assert (error.field, error.row) == (column, row)
    assert error.reason.startswith(reason), error.reason


def test_uint64_overflow_in_delta_sums_is_caught_not_wrapped() -> None:
    # 2**64 - 1 + 1 wraps to 0 in uint64 arithmetic; the decoder must refuse it
    steps = [2**64 - 1, 1, -(2**64 - 1)] + [0] * 17
    error = rejects(json.dumps(plain(event_number={"d": steps})))
    assert (error.field, error.row) == ("event_number", 1)
    assert "out of range for uint64" in error.reason


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"d": list(range(19))}, "delta: has 19 values, the header count is 20"),
        ({"d": "1,2"}, 'delta: expected an array, got string "1,2"'),
    ],
)
def test_rejects_delta_arrays_of_the_wrong_shape(spec: Any, reason: str) -> None:
    error = rejects(json.dumps(plain(lumi_block=spec)))
    assert (error.field, error.reason) == ("lumi_block", reason)


def long_message(n: int, **columns: Any) -> bytes:
    """A plain version 2 message of ``n`` events (long enough for the numpy delta sums)."""
    table = make_events(n, references=1, event_base=1000)
    doc = orjson.loads(as_version_2(encode_events(table, make_header(n, version=1))))
    doc["c"].update(columns)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("n", [codec.arrays._NUMPY_DELTAS + 1, 1000])
def test_long_delta_arrays_decode_like_short_ones(n: int) -> None:
    events = [1000 + 7 * i for i in range(n)]
    steps = [events[0]] + [7] * (n - 1)
    _, table = decode_events(long_message(n, event_number={"d": steps}))
    assert table.column("event_number").to_pylist() == events
    # deltas beyond int32 take the exact Python path
    big = [2**63] + [2**40 + 1, -(2**40)] * ((n - 1) // 2) + [1] * ((n - 1) % 2)
    _, table = decode_events(long_message(n, event_number={"d": big}))
    assert table.column("event_number").to_pylist()[:3] == [2**63, 2**63 + 2**40 + 1, 2**63 + 1]
    # sums that leave the type, in either direction, with the first bad row named
    error = rejects(long_message(n, event_number={"d": [5] + [-1] * 10 + [1] * (n - 11)}))
    assert (error.field, error.row, error.reason) == ("event_number", 6, "negative value -1")
    wrap = [2**64 - 10] + [1] * (n - 1)
    error = rejects(long_message(n, event_number={"d": wrap}))
    assert (error.field, error.row) == ("event_number", 10)
    lumi = [2**32 - 100] + [1] * (n - 1)
    error = rejects(long_message(n, lumi_block={"d": lumi}))
    assert (error.field, error.row) == ("lumi_block", 100)


def test_runs_decode() -> None:
    doc = plain(hltpsk={"r": [5, 20]}, smk={"r": [2160, 7, 2160, 13]})
    decodes_like_plain(doc)
    _, table = decode_events(orjson.dumps(plain(lumi_block={"r": [7, 3, 8, 16, 9, 1]})))
    assert table.column("lumi_block").to_pylist() == [7] * 3 + [8] * 16 + [9]
    many = [value for i in range(20) for value in (i, 1)]  # more runs than the join path takes
    _, table = decode_events(orjson.dumps(plain(lumi_block={"r": many})))
    assert table.column("lumi_block").to_pylist() == list(range(20))


@pytest.mark.parametrize(
    ("runs", "row", "reason"),
    [
        ([7, 3, 8], None, "runs: expected an array of value, count pairs, got 3 items"),
        ("7x20", None, 'runs: expected an array of value, count pairs, got string "7x20"'),
        ([7, 10, 8, 0, 9, 10], None, "runs: run 1: expected a count >= 1, got integer 0"),
        ([7, 10, 8, -1, 9, 11], None, "runs: run 1: expected a count >= 1, got integer -1"),
        ([7, 10, 8, "10"], None, 'runs: run 1: expected a count >= 1, got string "10"'),
        ([7, 10, 8, 9], None, "runs: the run counts add up to 19, the header count is 20"),
        ([7, 10, -8, 10], 10, "runs: negative value -8"),
        ([7, 10, 2**32, 10], 10, "runs: value 4294967296 out of range for uint32"),
        ([7, 10, "8", 10], 10, 'runs: expected an integer, got string "8"'),
        ([7, 10, True, 10], None, "runs: expected an integer, got boolean true"),
        ([7, 19, 8, True], None, "runs: expected an integer, got boolean true"),
    ],
)
def test_rejects_malformed_runs(runs: Any, row: int | None, reason: str) -> None:
    error = rejects(json.dumps(plain(lumi_block={"r": runs})))
    assert (error.field, error.row) == ("lumi_block", row)
    assert error.reason.startswith(reason), error.reason


@needs_zstd
def test_packed_columns_decode() -> None:
    decodes_like_plain(packed(plain(), ["event_number", "bcid", "mc_event_weight", "l1_tap"]))
    decodes_like_plain(packed(plain(), list(MASKS), slots=["0.g", "0.p", "2.p"]))
    decodes_like_plain(packed(plain(), [], slots=["1.g"]))


@needs_zstd
@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (lambda doc: doc.pop("z"), "z", "missing: the compressed block"),
        (setter("z", 17), "z", "compressed block: expected base64 text, got integer 17"),
        (setter("z", "KLUv!"), "z", "compressed block: bad base64"),
        (setter("z", "AAAAAAAAAAAA"), "z", "compressed block: not a zstd frame of 680 bytes"),
        (setter("c.bcid", {"z": "lz4"}), "bcid", 'compressed: expected "zstd", got string "lz4"'),
        (setter("c.l1_tap.z", True), "l1_tap", 'compressed: expected "zstd", got boolean true'),
        (setter("c.l1_tap.z", None), "l1_tap", 'compressed: expected "zstd", got null'),
    ],
)
def test_rejects_malformed_compressed_blocks(
    change: Callable[[Any], Any], field: str, reason: str
) -> None:
    doc = packed(plain(), ["bcid", "l1_tap"], slots=[])
    change(doc)
    error = rejects(json.dumps(doc))
    assert (error.field, error.row) == (field, None)
    assert error.reason.startswith(reason), error.reason


@needs_zstd
def test_rejects_a_block_no_array_uses() -> None:
    error = rejects(json.dumps(plain() | {"z": zstd_text(b"abc")}))
    assert (error.field, error.reason) == ("z", "compressed block, but no array is in it")


@needs_zstd
def test_rejects_a_corrupt_compressed_block() -> None:
    doc = packed(plain(), ["l1_tbp", "hlt_passed"])
    frame = bytearray(binascii.a2b_base64(doc["z"]))
    frame[len(frame) // 2] ^= 0xFF
    frame[-5] ^= 0xFF
    doc["z"] = binascii.b2a_base64(bytes(frame), newline=False).decode()
    try:
        _, table = decode_events(json.dumps(doc))
    except MessageError as error:  # a flipped byte is usually caught, never more than that
        assert (error.field, error.row) == ("z", None)
        assert error.reason.startswith("compressed block:")
    else:
        table.validate(full=True)


@needs_zstd
@pytest.mark.parametrize("extra", [-1, 1, 5000])
def test_rejects_a_block_that_decompresses_to_the_wrong_size(extra: int) -> None:
    doc = packed(plain(), ["bcid", "l1_tbp"])
    block = struct.pack("<20H", *events_of("bcid")) + binascii.a2b_base64(
        orjson.loads(PLAIN[2])["c"]["l1_tbp"]["b64"]
    )
    block = block[:extra] if extra < 0 else block + bytes(extra)
    doc["z"] = zstd_text(block)
    error = rejects(json.dumps(doc))
    assert (error.field, error.row) == ("z", None)
    assert error.reason == (
        f"compressed block: decompresses to {len(block)} bytes, not the 680 of its arrays"
    )


@needs_zstd
def test_decompression_bombs_are_refused_before_anything_is_allocated() -> None:
    # 40 MB of zeros compress to a few kB; masks of that size are over 64 x max_bytes
    doc = plain(l1_tbp={"w": 2_000_000, "z": "zstd"})
    doc["z"] = zstd_text(bytes(20 * 2_000_000))
    payload = json.dumps(doc)
    error = rejects(payload, max_bytes=len(payload) + 100)
    assert error.field == "l1_tbp"
    assert error.reason.startswith("20 masks of 2000000 bytes take the masks of this message over")
    assert f"decoding limit of {MAX_EXPANSION * (len(payload) + 100)} bytes" in error.reason
    # the same message is fine for a consumer that accepts bigger messages
    _, table = decode_events(payload, max_bytes=1_000_000)
    assert table.column("l1_tbp")[0].as_py() == bytes(2_000_000)


@needs_zstd
def test_the_whole_block_is_bounded_too() -> None:
    max_bytes = 100_000
    width = MAX_EXPANSION * max_bytes // 20  # every mask byte the limit allows
    doc = packed(plain(), ["bcid"])  # and 40 bytes more
    doc["c"]["l1_tbp"] = {"w": width, "z": "zstd"}
    for name in ("l1_tap", "l1_tav", "hlt_passed"):
        doc["c"][name] = {"w": 0, "b64": ""}
    error = rejects(json.dumps(doc), max_bytes=max_bytes)
    assert (error.field, error.reason) == (
        "z",
        f"the compressed block would decode to {20 * width + 40} bytes, "
        f"over the limit of {20 * width}",
    )


@needs_zstd
def test_rejects_packed_float_that_is_not_finite() -> None:
    for value in (float("inf"), float("nan")):
        doc = packed(plain(), ["mc_event_weight"])
        weights = [float(v) for v in events_of("mc_event_weight")]
        weights[13] = value
        doc["z"] = zstd_text(struct.pack("<20f", *weights))
        error = rejects(json.dumps(doc))
        assert (error.field, error.row) == ("mc_event_weight", 13)
        assert error.reason == f"not a finite number: {value}"


@needs_zstd
def test_rejects_packed_guid_index_out_of_range() -> None:
    doc = packed(plain(), [], slots=["1.g"])
    indices = list(orjson.loads(PLAIN[2])["c"]["references"]["s"][1]["g"])
    indices[12] = 3
    doc["z"] = zstd_text(struct.pack(f"<{len(indices)}I", *indices))
    error = rejects(json.dumps(doc))
    assert (error.field, error.row) == ("references", 12)
    assert error.reason == "slot 1: guid index 3 out of range (the guid table has 3 entries)"


@pytest.mark.parametrize(
    ("slot", "reason"),
    [
        ({"k": 3}, "slot 0: guid index 3 out of range (the guid table has 3 entries)"),
        ({"k": -1}, "slot 0: guid index: constant: negative value -1"),
        ({"k": "0"}, 'slot 0: guid index: constant: expected an integer, got string "0"'),
        ({"z": 1}, "slot 0: guid index: compressed: expected"),
    ],
)
def test_rejects_bad_encoded_guid_indices(slot: Any, reason: str) -> None:
    doc = plain()
    doc["c"]["references"]["s"][0]["g"] = slot
    error = rejects(json.dumps(doc))
    assert error.field == "references"
    assert error.reason.startswith(reason), error.reason


def test_encoded_reference_arrays_decode() -> None:
    doc = plain()
    slots = doc["c"]["references"]["s"]
    slots[1]["p"] = [1000 + 3 * i - 50 * (i % 2) for i in range(len(slots[1]["p"]))]
    expected = decode_events(json.dumps(doc))[1]
    positions = slots[1]["p"]
    slots[1]["p"] = {"d": [positions[0]] + [b - a for a, b in itertools.pairwise(positions)]}
    slots[2]["g"] = {"r": [value for g in slots[2]["g"] for value in (g, 1)]}
    assert decode_events(json.dumps(doc))[1].equals(expected)
    uneven = orjson.loads(as_version_2(VALID_UNEVEN))
    slot = uneven["c"]["references"]["s"][1]
    slot["g"] = {"r": [value for g in slot["g"] for value in (g, 1)]}
    slot["p"] = {"r": [value for p in slot["p"] for value in (p, 1)]}
    _, table = decode_events(json.dumps(uneven))
    assert table.equals(decode_events(VALID_UNEVEN)[1])


def test_dictionary_masks_decode() -> None:
    table = decode_events(PLAIN[2])[1]
    masks = table.column("l1_tav").to_pylist()
    distinct = list(dict.fromkeys(masks))
    doc = plain(
        l1_tav={
            "w": 32,
            "u": binascii.b2a_base64(b"".join(distinct), newline=False).decode(),
            "i": [distinct.index(mask) for mask in masks],
        }
    )
    decodes_like_plain(doc)
    doc["c"]["l1_tav"]["i"] = {"r": [0, 20]}
    _, short = decode_events(json.dumps(doc))
    assert short.column("l1_tav").to_pylist() == [distinct[0]] * 20


@pytest.mark.parametrize(
    ("spec", "row", "reason"),
    [
        ({"w": 2, "u": "AAECAw==", "i": [0] * 19 + [2]}, 19, "mask index: 2 out of range"),
        ({"w": 2, "u": "AAEC", "i": [0] * 20}, None, "mask dictionary is 3 bytes, not a whole"),
        ({"w": 0, "u": "", "i": [0] * 20}, None, "mask dictionary is 0 bytes, not a whole"),
        ({"w": 2, "u": "AA!=", "i": [0] * 20}, None, "mask dictionary: bad base64"),
        ({"w": 2, "u": None, "i": [0] * 20}, None, "mask dictionary: expected base64 text"),
        ({"w": 2, "u": "AAEC", "i": [0] * 20, "x": 1}, None, "trigger mask: expected the keys"),
        ({"w": 2, "u": "AAECAw==", "i": [0] * 19}, None, "mask index: has 19 values"),
        ({"w": 2, "u": "AAECAw==", "i": [0] * 19 + [-1]}, 19, "mask index: negative value -1"),
        ({"w": 2, "u": "AAECAw==", "i": "0"}, None, "mask index: expected an array, got string"),
        ({"w": 2, "k": "AAE="}, None, None),
        ({"w": 2, "k": "AAECAw=="}, None, "constant mask is 4 bytes, not width 2"),
        ({"w": 2, "k": "AA"}, None, "constant mask: bad base64"),
        ({"w": 2, "k": 0}, None, "constant mask: expected base64 text, got integer 0"),
        ({"w": 2}, None, "trigger mask: expected the keys"),
        ({"w": 2, "k": "AAE=", "z": "zstd"}, None, "trigger mask: expected the keys"),
    ],
)
def test_rejects_malformed_encoded_masks(spec: Any, row: int | None, reason: str | None) -> None:
    payload = json.dumps(plain(l1_tav=spec))
    if reason is None:
        assert decode_events(payload)[1].column("l1_tav").to_pylist() == [b"\x00\x01"] * 20
        return
    error = rejects(payload)
    assert (error.field, error.row) == ("l1_tav", row)
    assert error.reason.startswith(reason), error.reason


@needs_zstd
def test_rejects_duplicate_keys_in_encoded_event_numbers() -> None:
    events = events_of("event_number")
    events[15] = events[4]
    doc = plain(event_number=events)
    error = rejects(json.dumps(packed(doc, ["event_number"])))
    assert (error.field, error.row) == ("event_number", 15)
    assert error.reason.endswith("first at row 4")
    steps = [events[0]] + [b - a for a, b in itertools.pairwise(events)]
    error = rejects(json.dumps(plain(event_number={"d": steps})))
    assert (error.field, error.row) == ("event_number", 15)
    error = rejects(json.dumps(plain(event_number={"k": events[0]})))
    assert (error.field, error.row) == ("event_number", 1)
    # decreasing but distinct event numbers are fine
    doc = packed(plain(event_number=events_of("event_number")[::-1]), ["event_number"])
    assert decode_events(json.dumps(doc))[1].num_rows == 20


@needs_zstd
@pytest.mark.parametrize(
    "run_spec", [{"r": [1, 10, 2, 10]}, {"d": [1] + [0] * 9 + [1] + [0] * 9}, [1] * 10 + [2] * 10]
)
def test_keys_are_unique_per_run_in_every_encoding(run_spec: Any) -> None:
    events = events_of("event_number")
    events[15] = events[4]  # a different run: fine
    doc = packed(plain(run_number=run_spec, event_number=events), ["event_number"])
    assert decode_events(json.dumps(doc))[1].num_rows == 20
    events[16] = events[15]  # the same run: a duplicate
    doc = packed(plain(run_number=run_spec, event_number=events), ["event_number"])
    error = rejects(json.dumps(doc))
    assert (error.field, error.row) == ("event_number", 16)


# --------------------------------------------------------------------------- property


def mangle(data: st.DataObject, doc: Any) -> None:
    """Replace one value somewhere in ``doc`` with something else."""
    node: Any = doc
    while isinstance(node, (dict, list)) and node:
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()) or not isinstance(node[key], (dict, list)):
            node[key] = data.draw(
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=40),
                    st.sampled_from(["zstd", "AAAA", "KLUv/SAAAQAA"]),
                    st.lists(st.integers(0, 3), max_size=4),
                    st.dictionaries(st.sampled_from(["k", "d", "r", "z", "w"]), st.integers()),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                )
            )
            return
        node = node[key]


MANGLED_BASES = [VALID, VALID_UNEVEN, VALID_MIXED, VALID_V2, as_version_2(VALID_UNEVEN)]
if codec.compression._ZSTD is not None:
    MANGLED_BASES += [
        orjson.dumps(packed(plain(), ["event_number", "l1_tbp", "mc_event_weight"], ["1.g"])),
        encode_events(realistic_table(50), make_header(50)),
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mangled_message_is_rejected_with_message_error_or_decoded(data: st.DataObject) -> None:
    """Whatever a broken producer sends, decoding fails only with MessageError."""
    doc = orjson.loads(data.draw(st.sampled_from(MANGLED_BASES)))
    mangle(data, doc)
    try:
        header, table = decode_events(json.dumps(doc))
    except MessageError:
        return
    table.validate(full=True)
    assert table.num_rows == header.count


@needs_zstd
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_mangled_compressed_block_is_rejected_with_message_error_or_decoded(
    data: st.DataObject,
) -> None:
    doc = orjson.loads(VALID_V2)
    frame = bytearray(binascii.a2b_base64(doc["z"]))
    for _ in range(data.draw(st.integers(1, 3))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    frame = frame[:cut] if data.draw(st.booleans()) else frame
    doc["z"] = binascii.b2a_base64(bytes(frame), newline=False).decode()
    try:
        header, table = decode_events(orjson.dumps(doc))
    except MessageError:  # corrupt frames say "z"; frames that still decode, what is wrong
        return
    table.validate(full=True)
    assert table.num_rows == header.count


@st.composite
def event_tables(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(0, 12))
    widths = [draw(st.integers(0, 9)) for _ in MASKS]
    counts = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    runs = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n))
    events = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    table = make_events(n, seed=seed, widths=widths, references=counts, run_numbers=runs)
    table = replace(table, "event_number", events)
    extremes = draw(st.lists(st.sampled_from([0, 2**32 - 1]), min_size=n, max_size=n))
    table = replace(table, "timestamp_ns", extremes)
    if n and draw(st.booleans()):  # few distinct values and masks: constants, runs, dictionaries
        table = replace(
            table, "lumi_block", sorted(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
        )
        table = replace(table, "hlt_passed", [bytes([i % 2]) * widths[3] for i in range(n)])
    return table


@settings(max_examples=150, deadline=None)
@given(table=event_tables(), version=st.sampled_from(VERSIONS))
def test_round_trip_property(table: pa.Table, version: int) -> None:
    assert round_trip(table, version=version).equals(table)


# --------------------------------------------------------------------------- encoding


def test_encode_rejects_tables_that_do_not_fit_the_schema() -> None:
    table = make_events(3)
    with pytest.raises(ValidationError, match="missing \\['bcid'\\]"):
        encode_events(table.drop_columns(["bcid"]), make_header(3))
    with pytest.raises(ValidationError, match="header count 4 but the message has 3 rows"):
        encode_events(table, make_header(4))
    nulls = table.set_column(0, "run_number", pa.array([1, None, 3], pa.uint32()))
    with pytest.raises(ValidationError, match="null"):
        encode_events(nulls, make_header(3))
    weights = replace(table, "mc_event_weight", [1, float("nan"), 1])
    with pytest.raises(ValidationError, match="row 1: not a finite number"):
        encode_events(weights, make_header(3))
    bad_guid = [[{"format": "RAW", "guid": "nope", "position": 0}]] * 3
    refs = replace(table, "references", bad_guid)
    with pytest.raises(ValidationError, match="not a canonical GUID: 'nope'"):
        encode_events(refs, make_header(3))


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", [2_000, 10_000])
def test_message_batches_are_near_the_target_and_decode_to_the_table(
    target: int, version: int
) -> None:
    table = make_events(500, references=[i % 4 for i in range(500)])
    template = make_header(0, message_id="task7.job3", version=version)
    messages = list(encode_message_batches(table, template, target))
    sizes = [len(payload) for _, payload in messages]
    assert len(messages) > 3
    assert max(sizes) <= target
    assert min(sizes[:-1]) >= 0.85 * target
    assert [h.message_id for h, _ in messages] == [f"task7.job3:{i}" for i in range(len(messages))]
    decoded = []
    for header, payload in messages:
        decoded_header, events = decode_events(payload)
        assert decoded_header == header
        assert header.count == events.num_rows
        assert (header.dataset, header.guid, header.version) == (
            template.dataset,
            template.guid,
            version,
        )
        decoded.append(events)
    assert pa.concat_tables(decoded).equals(table)


@needs_zstd
def test_realistic_messages_carry_several_times_more_events_than_version_1() -> None:
    table = realistic_table(1500)
    header = make_header(0, message_id="t:j")
    v2 = list(encode_message_batches(table, header, 10_000))
    v1 = list(encode_message_batches(table, dataclasses.replace(header, version=1), 10_000))
    assert len(v1) > 3 * len(v2)
    assert pa.concat_tables(decode_events(p)[1] for _, p in v2).equals(table)


def test_message_batches_of_an_empty_table_announce_it_once() -> None:
    messages = list(encode_message_batches(make_events(0), make_header(0, message_id="m"), 10_000))
    assert [(h.message_id, h.count) for h, _ in messages] == [("m:0", 0)]
    assert decode_events(messages[0][1])[1].num_rows == 0


def test_message_batches_put_an_oversized_row_in_a_message_of_its_own() -> None:
    table = make_events(3, widths=(2000, 2000, 2000, 2000))
    messages = list(encode_message_batches(table, make_header(0, version=1), 4_000))
    assert [h.count for h, _ in messages] == [1, 1, 1]
