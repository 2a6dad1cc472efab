"""The wire codec: round trips, one test per kind of malformed message, and batching."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventindex.errors import ValidationError
from eventindex.records import codec
from eventindex.records.codec import (
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


def round_trip(table: pa.Table, header: MessageHeader | None = None) -> pa.Table:
    header = header or make_header(table.num_rows)
    decoded_header, decoded = decode_events(encode_events(table, header))
    decoded.validate(full=True)
    assert decoded_header == header
    assert decoded.schema.equals(EVENT_SCHEMA, check_metadata=True)
    return decoded


# --------------------------------------------------------------------------- round trips


def test_round_trip_realistic_message() -> None:
    table = make_events(40)
    assert round_trip(table).equals(table)


def test_round_trip_keeps_event_numbers_above_2_63() -> None:
    table = make_events(3, event_base=2**64 - 15)
    decoded = round_trip(table)
    assert decoded.column("event_number").to_pylist() == [2**64 - 15, 2**64 - 8, 2**64 - 1]


@pytest.mark.parametrize("widths", [(32, 32, 32, 32), (5, 5, 5, 5), (0, 0, 0, 0), (1, 3, 7, 9)])
def test_round_trip_mask_widths(widths: tuple[int, ...]) -> None:
    table = make_events(9, widths=widths)
    decoded = round_trip(table)
    assert decoded.equals(table)
    assert {len(m) for m in decoded.column("l1_tap").to_pylist()} == {widths[1]}


def test_masks_of_different_widths_are_zero_padded_to_the_widest() -> None:
    table = make_events(3)
    table = replace(table, "l1_tbp", [b"\x01", b"\x02\x03\x04", b""])
    decoded = round_trip(table)
    assert decoded.column("l1_tbp").to_pylist() == [b"\x01\0\0", b"\x02\x03\x04", b"\0\0\0"]
    assert decoded.drop_columns(["l1_tbp"]).equals(table.drop_columns(["l1_tbp"]))


def test_round_trip_varying_and_zero_references() -> None:
    table = make_events(7, references=[0, 3, 1, 0, 4, 2, 0])
    decoded = round_trip(table)
    assert decoded.equals(table)
    assert [len(r) for r in decoded.column("references").to_pylist()] == [0, 3, 1, 0, 4, 2, 0]


def test_round_trip_events_without_any_reference() -> None:
    table = make_events(4, references=0)
    assert round_trip(table).equals(table)


def test_round_trip_mixed_formats_within_a_slot() -> None:
    table = make_events(2, references=1)
    refs = [
        [{"format": "RAW", "guid": GUIDS[0], "position": 1}],
        [{"format": "AOD", "guid": GUIDS[1], "position": 2}],
    ]
    table = replace(table, "references", refs)
    payload = encode_events(table, make_header(2))
    assert orjson.loads(payload)["c"]["references"]["s"][0]["f"] == ["RAW", "AOD"]
    assert round_trip(table).equals(table)


def test_round_trip_empty_message() -> None:
    table = make_events(0)
    decoded = round_trip(table)
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


def test_wire_layout_is_columnar() -> None:
    payload = encode_events(make_events(3, widths=(1, 1, 1, 2)), make_header(3))
    doc = orjson.loads(payload)
    assert set(doc) == {"v", "h", "c"}
    assert doc["v"] == 1
    assert set(doc["c"]) == set(EVENT_SCHEMA.names)
    assert doc["c"]["is_testbeam"] == [0, 0, 0]
    assert doc["c"]["hlt_passed"]["w"] == 2
    refs = doc["c"]["references"]
    assert refs["n"] == 3
    assert [slot["f"] for slot in refs["s"]] == ["RAW", "ESD", "AOD"]
    assert all(len(slot["g"]) == len(slot["p"]) == 3 for slot in refs["s"])
    # the GUID table holds each file once, and every file a reference names
    used = {refs["g"][i] for slot in refs["s"] for i in slot["g"]}
    assert len(refs["g"]) == len(set(refs["g"])) == len(used)
    assert len(doc["c"]["l1_tbp"]["b64"]) == 4  # 3 masks of 1 byte: one base64 quad


def test_the_documented_example_is_a_valid_message() -> None:
    doc = codec.__doc__ or ""
    example = doc[doc.index('{"v": 1') : doc.index("* ``v``")]
    header, table = decode_events(example)
    assert (header.count, table.num_rows) == (2, 2)
    assert table.column("event_number").to_pylist() == [4294967312, 10045]
    assert [len(refs) for refs in table.column("references").to_pylist()] == [2, 2]


def test_ipc_assembly_matches_array_by_array_assembly() -> None:
    table = make_events(11, references=[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1], widths=(5, 0, 3, 9))
    payload = encode_events(table, make_header(11))
    _, fast = decode_events(payload)
    assert codec._ASSEMBLER.use_ipc, "the Arrow IPC shortcut is off: decoding works, slower"
    codec._ASSEMBLER.use_ipc = False
    try:
        _, slow = decode_events(payload)
    finally:
        codec._ASSEMBLER.use_ipc = True
    slow.validate(full=True)
    assert fast.equals(slow)
    assert fast.equals(table)


def test_round_trip_slices_of_chunked_tables() -> None:
    table = make_events(30, references=[i % 5 for i in range(30)], widths=(3, 0, 7, 9))
    chunked = pa.concat_tables([table.slice(0, 7), table.slice(7, 9), table.slice(16)])
    for start, length in [(0, 30), (3, 10), (5, 20), (29, 1), (30, 0)]:
        piece = chunked.slice(start, length)
        assert round_trip(piece).equals(table.slice(start, length))


def test_encode_accepts_chunked_and_nullable_tables() -> None:
    table = make_events(6)
    loose = pa.concat_tables([table.slice(0, 2), table.slice(2)])
    loose = pa.table({name: loose.column(name) for name in reversed(EVENT_SCHEMA.names)})
    assert not loose.schema.equals(EVENT_SCHEMA)
    assert round_trip(loose).equals(table)


# --------------------------------------------------------------------------- malformed

VALID = encode_events(make_events(20, references=[3] * 19 + [1]), make_header(20))
VALID_UNEVEN = encode_events(make_events(6, references=[0, 2, 1, 3, 0, 2]), make_header(6))
VALID_MIXED = encode_events(
    replace(
        make_events(3, references=1),
        "references",
        [[{"format": fmt, "guid": GUIDS[0], "position": 7}] for fmt in ("RAW", "AOD", "RAW")],
    ),
    make_header(3),
)


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


def test_error_names_field_row_and_reason() -> None:
    error = rejects(mutated(setter("c.event_number.17", -3)))
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
        (setter("v", 2), "unknown format version integer 2"),
        (setter("v", "1"), 'unknown format version string "1"'),
        (setter("v", True), "unknown format version boolean true"),
    ],
)
def test_rejects_unknown_or_missing_version(change: Callable[[Any], Any], reason: str) -> None:
    error = rejects(mutated(change))
    assert error.field == "v"
    assert error.reason.startswith(reason)


def test_rejects_missing_and_unknown_top_level_keys() -> None:
    assert rejects(mutated(lambda doc: doc.pop("h"))).field == "h"
    error = rejects(mutated(setter("x", 1)))
    assert (error.field, error.reason) == ("x", "unknown key")


def test_rejects_missing_header_field() -> None:
    error = rejects(mutated(lambda doc: doc["h"].pop("dataset")))
    assert (error.field, error.row, error.reason) == (
        "header.dataset",
        None,
        "missing header field",
    )


def test_rejects_extra_header_field() -> None:
    error = rejects(mutated(setter("h.priority", 3)))
    assert (error.field, error.reason) == ("header.priority", "unknown header field")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("producer", "", 'expected a non-empty string, got string ""'),
        ("job_id", 42, "expected a non-empty string, got integer 42"),
        ("count", -1, "expected an event count"),
        ("count", True, "expected an event count"),
        ("sent_at", "now", "expected seconds since the epoch"),
    ],
)
def test_rejects_bad_header_values(field: str, value: Any, reason: str) -> None:
    error = rejects(mutated(setter(f"h.{field}", value)))
    assert error.field == f"header.{field}"
    assert error.reason.startswith(reason)


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
def test_rejects_bad_header_guid(guid: str) -> None:
    error = rejects(mutated(setter("h.guid", guid)))
    assert error.field == "header.guid"
    assert error.reason.startswith("not a canonical 8-4-4-4-12 hex GUID")


def test_header_accepts_lower_case_guid_and_checks_on_construction() -> None:
    assert make_header(0, guid=GUIDS[1].lower()).guid == GUIDS[1].lower()
    with pytest.raises(MessageError) as caught:
        make_header(0, guid="not-a-guid")
    assert caught.value.field == "header.guid"


def test_rejects_missing_column() -> None:
    error = rejects(mutated(lambda doc: doc["c"].pop("bcid")))
    assert (error.field, error.row, error.reason) == ("bcid", None, "missing column")


def test_rejects_unknown_column() -> None:
    error = rejects(mutated(setter("c.pileup", [0] * 20)))
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
def test_rejects_wrong_json_types(path: str, value: Any, field: str, row: int, reason: str) -> None:
    error = rejects(mutated(setter(path, value)))
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
    path: str, value: Any, field: str, row: int, reason: str
) -> None:
    error = rejects(mutated(setter(path, value)))
    assert (error.field, error.row) == (field, row)
    assert error.reason.startswith(reason)


def test_rejects_event_number_above_2_64_minus_1() -> None:
    text = VALID.decode().replace(str(2**63 + 11 + 7 * 6), str(2**64), 1)  # the 7th event number
    error = rejects(text)
    assert (error.field, error.row) == ("event_number", 6)
    assert "out of range for uint64" in error.reason
    at_limit = VALID.decode().replace(str(2**63 + 11 + 7 * 6), str(2**64 - 1), 1)
    assert decode_events(at_limit)[1].column("event_number")[6].as_py() == 2**64 - 1


@pytest.mark.parametrize("column", ["run_number", "event_number", "is_testbeam", "mc_event_weight"])
def test_rejects_column_length_other_than_count(column: str) -> None:
    error = rejects(mutated(lambda doc: doc["c"][column].pop()))
    assert (error.field, error.row, error.reason) == (
        column,
        None,
        "has 19 values, the header count is 20",
    )


def test_rejects_column_that_is_not_an_array() -> None:
    error = rejects(mutated(setter("c.lvl1_id", {"0": 1})))
    assert (error.field, error.reason) == ("lvl1_id", 'expected an array, got object {"0":1}')


def test_rejects_count_that_disagrees_with_every_column() -> None:
    error = rejects(mutated(setter("h.count", 21)))
    assert error.field == "run_number"
    assert error.reason == "has 20 values, the header count is 21"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("AAAA!AAA", "mask data: bad base64"),
        ("AAA", "mask data: bad base64"),
        ("AA==AA==", "mask data: bad base64"),
        ("ÄAAA", "mask data: bad base64"),
    ],
)
def test_rejects_bad_base64(text: str, reason: str) -> None:
    error = rejects(mutated(setter("c.l1_tav.b64", text)))
    assert error.field == "l1_tav"
    assert error.reason.startswith(reason)


def test_rejects_mask_bytes_that_are_not_width_times_count() -> None:
    error = rejects(mutated(setter("c.hlt_passed.w", 63)))
    assert error.field == "hlt_passed"
    assert error.reason == "mask data is 1280 bytes, not width 63 x 20 events = 1260"
    error = rejects(mutated(setter("c.l1_tbp.b64", "AAAA")))
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
def test_rejects_malformed_mask_objects(change: Callable[[Any], Any], reason: str) -> None:
    error = rejects(mutated(change))
    assert (error.field, error.reason) == ("l1_tbp", reason)


def test_rejects_reference_guid_index_out_of_range() -> None:
    doc = orjson.loads(VALID)
    table_size = len(doc["c"]["references"]["g"])
    error = rejects(mutated(setter("c.references.s.1.g.12", table_size)))
    assert (error.field, error.row) == ("references", 12)
    assert error.reason == (
        f"slot 1: guid index {table_size} out of range (the guid table has {table_size} entries)"
    )


def test_reference_errors_name_the_event_row_when_counts_vary() -> None:
    # counts [0, 2, 1, 3, 0, 2]: slot 1 holds the references of events 1, 3 and 5
    error = rejects(mutated(setter("c.references.s.1.p.2", -5), VALID_UNEVEN))
    assert (error.field, error.row, error.reason) == (
        "references",
        5,
        "slot 1: position: negative value -5",
    )
    error = rejects(mutated(setter("c.references.s.2.g.0", 9), VALID_UNEVEN))
    assert (error.field, error.row) == ("references", 3)


@pytest.mark.parametrize(
    ("guid", "reason"),
    [
        ("0A66C3F2-56B6-E511-8B7B-02163E011F0", "guid table entry 0: not a canonical GUID"),
        ("0A66C3F2_56B6_E511_8B7B_02163E011F0E", "guid table entry 0: not a canonical GUID"),
        (7, "guid table entry 0: not a canonical GUID: integer 7"),
    ],
)
def test_rejects_bad_reference_guid_strings(guid: Any, reason: str) -> None:
    error = rejects(mutated(setter("c.references.g.0", guid)))
    assert (error.field, error.row) == ("references", None)
    assert error.reason.startswith(reason)


def test_rejects_repeated_guid_in_the_table() -> None:
    def repeat_first(doc: dict[str, Any]) -> None:
        doc["c"]["references"]["g"].append(doc["c"]["references"]["g"][0])

    error = rejects(mutated(repeat_first))
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
        (lambda doc: doc["c"]["references"].pop("g"), None, "references: missing key 'g'"),
    ],
)  # fmt: skip
def test_rejects_malformed_references(
    change: Callable[[Any], Any], row: int | None, reason: str
) -> None:
    error = rejects(mutated(change))
    assert (error.field, error.row) == ("references", row)
    assert error.reason.startswith(reason), error.reason


def test_rejects_boolean_reference_count() -> None:
    # event 2 has one reference, so true (== 1) keeps every slot the right size
    error = rejects(mutated(setter("c.references.n.2", True), VALID_UNEVEN))
    assert (error.field, error.row) == ("references", 2)
    assert error.reason == "reference count: expected an integer, got boolean"


def test_rejects_duplicate_key_inside_a_message() -> None:
    doc = orjson.loads(VALID)
    error = rejects(mutated(setter("c.event_number.15", doc["c"]["event_number"][4])))
    assert (error.field, error.row) == ("event_number", 15)
    assert error.reason.endswith("first at row 4")


def test_same_event_number_in_two_runs_is_not_a_duplicate() -> None:
    table = make_events(4, run_numbers=[1, 2, 2, 1], event_base=10)
    table = replace(table, "event_number", [10, 10, 11, 11])
    assert round_trip(table).equals(table)
    payload = encode_events(table, make_header(4))
    error = rejects(mutated(setter("c.run_number.3", 2), payload))
    assert (error.field, error.row) == ("event_number", 3)
    assert error.reason.startswith("duplicate key (run_number=2, event_number=11)")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mangled_message_is_rejected_with_message_error_or_decoded(data: st.DataObject) -> None:
    """Whatever a broken producer sends, decoding fails only with MessageError."""
    doc = orjson.loads(data.draw(st.sampled_from([VALID, VALID_UNEVEN, VALID_MIXED])))
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
                    st.lists(st.integers(0, 3), max_size=4),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                )
            )
            break
        node = node[key]
    try:
        header, table = decode_events(json.dumps(doc))
    except MessageError:
        return
    table.validate(full=True)
    assert table.num_rows == header.count


# --------------------------------------------------------------------------- property


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
    return replace(table, "timestamp_ns", extremes)


@settings(max_examples=120, deadline=None)
@given(table=event_tables())
def test_round_trip_property(table: pa.Table) -> None:
    assert round_trip(table).equals(table)


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


@pytest.mark.parametrize("target", [2_000, 10_000])
def test_message_batches_are_near_the_target_and_decode_to_the_table(target: int) -> None:
    table = make_events(500, references=[i % 4 for i in range(500)])
    template = make_header(0, message_id="task7.job3")
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
        assert (header.dataset, header.guid) == (template.dataset, template.guid)
        decoded.append(events)
    assert pa.concat_tables(decoded).equals(table)


def test_message_batches_of_an_empty_table_announce_it_once() -> None:
    messages = list(encode_message_batches(make_events(0), make_header(0, message_id="m"), 10_000))
    assert [(h.message_id, h.count) for h, _ in messages] == [("m:0", 0)]
    assert decode_events(messages[0][1])[1].num_rows == 0


def test_message_batches_put_an_oversized_row_in_a_message_of_its_own() -> None:
    table = make_events(3, widths=(2000, 2000, 2000, 2000))
    messages = list(encode_message_batches(table, make_header(0), 4_000))
    assert [h.count for h, _ in messages] == [1, 1, 1]
