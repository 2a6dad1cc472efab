"""JSON lines: round trips of generated events, and one test per kind of bad line."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from eventindex.errors import ValidationError
from eventindex.generator import GeneratorSpec, generate_run
from eventindex.records.jsonl import JsonlError, read_jsonl, write_jsonl
from eventindex.records.schema import EVENT_SCHEMA

SPEC = GeneratorSpec(runs=1, events_per_run=1500, seed=4, large_event_numbers=True)


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    return generate_run(SPEC, SPEC.first_run)


@pytest.fixture(scope="module")
def daod(tables: dict[str, pa.Table]) -> pa.Table:
    """The dataset with the deepest references."""
    return list(tables.values())[-1]


def lines_of(table: pa.Table) -> list[dict[str, Any]]:
    buffer = io.BytesIO()
    write_jsonl(table, buffer)
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def encode(records: list[dict[str, Any]]) -> bytes:
    # The standard library writes integers of any size, so out-of-range values get through.
    return "".join(json.dumps(record) + "\n" for record in records).encode()


# -- round trips -------------------------------------------------------------


def test_every_generated_dataset_round_trips_through_a_file(tables, tmp_path: Path):
    for name, table in tables.items():
        path = tmp_path / f"{name}.jsonl"
        assert write_jsonl(table, path) == table.num_rows
        assert len(path.read_bytes().splitlines()) == table.num_rows
        back = read_jsonl(path)
        assert back.schema.equals(EVENT_SCHEMA)
        assert back.equals(table), name


def test_round_trip_through_binary_and_text_streams(daod):
    binary = io.BytesIO()
    write_jsonl(daod, binary)
    binary.seek(0)
    assert read_jsonl(binary).equals(daod)
    text = io.StringIO()
    write_jsonl(daod, text)
    assert text.getvalue().encode() == binary.getvalue()
    text.seek(0)
    assert read_jsonl(text).equals(daod)


def test_paths_may_be_strings(daod, tmp_path: Path):
    path = str(tmp_path / "events.jsonl")
    write_jsonl(daod, path)
    assert read_jsonl(path).equals(daod)


def test_sliced_and_chunked_tables_write_their_own_rows(daod):
    part = pa.concat_tables([daod.slice(3, 5), daod.slice(100, 7)])
    assert [line["event_number"] for line in lines_of(part)] == (
        part.column("event_number").to_pylist()
    )
    buffer = io.BytesIO()
    write_jsonl(part, buffer)
    buffer.seek(0)
    assert read_jsonl(buffer).equals(part.combine_chunks())


def test_one_object_per_event_with_hex_masks_and_reference_objects(daod):
    line = lines_of(daod.slice(0, 1))[0]
    record = daod.slice(0, 1).to_pylist()[0]
    assert list(line) == EVENT_SCHEMA.names
    for mask in ("l1_tbp", "l1_tap", "l1_tav", "hlt_passed"):
        assert line[mask] == record[mask].hex()
        assert line[mask] == line[mask].lower()
    assert line["event_number"] == record["event_number"]
    assert line["references"] == record["references"]
    assert [ref["format"] for ref in line["references"]] == ["RAW", "AOD", "DAOD_PHYS"]


def test_event_numbers_above_two_to_the_32_survive(tables):
    raw = next(iter(tables.values()))
    numbers = [line["event_number"] for line in lines_of(raw)]
    assert max(numbers) > 2**32
    assert numbers == raw.column("event_number").to_pylist()


def test_empty_table_and_empty_file(tmp_path: Path):
    path = tmp_path / "empty.jsonl"
    assert write_jsonl(EVENT_SCHEMA.empty_table(), path) == 0
    assert path.read_bytes() == b""
    assert read_jsonl(path).equals(EVENT_SCHEMA.empty_table())


def test_blank_lines_are_skipped_and_uppercase_hex_is_read(daod):
    records = lines_of(daod.slice(0, 2))
    records[1]["l1_tbp"] = records[1]["l1_tbp"].upper()
    data = b"\n" + orjson.dumps(records[0]) + b"\n\n  \n" + orjson.dumps(records[1]) + b"\n"
    back = read_jsonl(io.BytesIO(data))
    assert back.equals(daod.slice(0, 2))


def test_write_rejects_tables_that_are_not_event_records(daod):
    with pytest.raises(ValueError, match="missing columns"):
        write_jsonl(daod.drop_columns(["bcid"]), io.BytesIO())
    with pytest.raises(ValueError, match="unknown columns"):
        write_jsonl(daod.append_column("extra", pa.array([1] * daod.num_rows)), io.BytesIO())


# -- errors ------------------------------------------------------------------


def good_records(daod: pa.Table, count: int = 3) -> list[dict[str, Any]]:
    return lines_of(daod.slice(0, count))


def read_error(records: list[Any] | bytes) -> JsonlError:
    data = records if isinstance(records, bytes) else encode(records)
    with pytest.raises(JsonlError) as caught:
        read_jsonl(io.BytesIO(data))
    assert isinstance(caught.value, ValidationError)
    return caught.value


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("l1_tbp", "zz" * 32, "not a hex string"),
        ("l1_tav", "0 1", "not a hex string"),
        ("hlt_passed", "abc", "odd length"),
        ("l1_tap", 1234, "expected a hex string, got int"),
        ("run_number", -1, "must not be negative"),
        ("run_number", 2**32, "at most 4294967295"),
        ("event_number", 2**64, "at most 18446744073709551615"),
        ("lvl1_id", -(2**64), "must not be negative"),
        ("event_number", "12", "expected an integer, got str"),
        ("lumi_block", 1.5, "expected an integer, got float"),
        ("bcid", 3564, "at most 3563"),
        ("timestamp_ns", 1_000_000_000, "at most 999999999"),
        ("smk", True, "expected an integer, got bool"),
        ("is_simulation", 0, "expected true or false, got int"),
        ("mc_event_weight", "1", "expected a number, got str"),
        ("mc_event_weight", 1e39, "does not fit a 32-bit float"),
        ("references", {}, "expected a list, got dict"),
    ],
)
def test_bad_values_name_line_field_and_reason(daod, field, value, reason):
    records = good_records(daod)
    records[1][field] = value
    error = read_error(records)
    assert (error.line, error.field) == (2, field)
    assert reason in error.reason
    assert str(error).startswith(f"line 2: field {field!r}: ")


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"guid": "not-a-guid"}, "references[1].guid", "not a GUID"),
        ({"position": -1}, "references[1].position", "unsigned integer"),
        ({"format": ""}, "references[1].format", "non-empty string"),
        ({"extra": 1}, "references[1]", "unknown fields"),
    ],
)
def test_bad_references_name_the_reference(daod, change, field, reason):
    records = good_records(daod)
    records[2]["references"][1].update(change)
    error = read_error(records)
    assert (error.line, error.field) == (3, field)
    assert reason in error.reason


def test_missing_and_unknown_fields(daod):
    records = good_records(daod)
    del records[0]["lumi_block"]
    error = read_error(records)
    assert (error.line, error.field, error.reason) == (1, "lumi_block", "missing field")
    records = good_records(daod)
    records[2]["colour"] = "red"
    error = read_error(records)
    assert (error.line, error.field, error.reason) == (3, "colour", "unknown field")


def test_bad_json_and_non_object_lines_name_the_line(daod):
    good = encode(good_records(daod, 2))
    error = read_error(good + b'{"run_number": 1,\n')
    assert error.line == 3
    assert error.field is None
    assert "invalid JSON" in str(error)
    error = read_error(good + b"\n[1, 2]\n")
    assert (error.line, error.field) == (4, None)
    assert "expected a JSON object" in error.reason


def test_line_numbers_count_blank_lines(daod):
    records = good_records(daod, 2)
    records[1]["bcid"] = -5
    data = b"\n\n" + encode(records)
    error = read_error(data)
    assert error.line == 4
