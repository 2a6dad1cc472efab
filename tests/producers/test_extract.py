"""produce extract: JSON lines, CSV and ROOT inputs → .ei files that hold exactly the input."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from eventindex.errors import MissingExtraError, ValidationError
from eventindex.records.jsonl import write_jsonl
from eventindex.records.schema import EVENT_SCHEMA, TRIGGER_MASK_FIELDS
from producers.eifile import EventIndexFile, EventIndexFileError
from producers.extract import ExtractOptions, collection_of, extract
from producers.readers import read_csv, write_csv
from tests.producers.conftest import AOD, RAW, SPEC

GUID = "0A66C3F2-56B6-E511-8B7B-02163E011F0E"


def _extract(inputs: list[Path], output: Path, **options: Any) -> EventIndexFile:
    extract(inputs, output, ExtractOptions(**options), message_bytes=4000)
    return EventIndexFile(output)


def test_jsonl_round_trip_and_header(tmp_path: Path, run_tables: dict[str, pa.Table]) -> None:
    table = run_tables[AOD]
    source = tmp_path / f"{AOD}.jsonl"
    write_jsonl(table, source)
    with _extract([source], tmp_path / "out.ei", task_id="7562", job_id="42") as ei:
        header = ei.header
        assert (header.dataset, header.collection) == (AOD, SPEC.collection)
        assert (header.task_id, header.job_id, header.events) == ("7562", "42", table.num_rows)
        assert header.messages > 1 and header.message_bytes == 4000
        assert header.sources == (str(source),)
        messages = list(ei.messages())
        assert all(len(m.payload) <= 4000 for m in messages)
        assert len({m.message_id for m in messages}) == len(messages)
        assert ei.read_table().equals(table)
        assert ei.state_counts() == {"new": (header.messages, header.events)}


def test_csv_round_trip(tmp_path: Path, run_tables: dict[str, pa.Table]) -> None:
    table = run_tables[RAW]
    source = tmp_path / "events.csv"
    write_csv(table, source)
    assert read_csv(source).equals(table)
    with _extract([source], tmp_path / "out.ei", dataset=RAW, guid=GUID.lower()) as ei:
        assert ei.header.guid == GUID
        assert ei.read_table().equals(table)


def test_several_inputs_make_one_file(tmp_path: Path, run_tables: dict[str, pa.Table]) -> None:
    table = run_tables[RAW]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.csv"
    write_jsonl(table.slice(0, 500), first)
    write_csv(table.slice(500), second)
    with _extract([first, second], tmp_path / "out.ei", dataset=RAW) as ei:
        assert ei.read_table().equals(table)


def _bad_csv(tmp_path: Path, table: pa.Table, column: str, value: str) -> Path:
    path = tmp_path / "bad.csv"
    write_csv(table.slice(0, 3), path)
    lines = path.read_text().splitlines()
    names = [name.strip('"') for name in lines[0].split(",")]
    index = names.index(column)
    import csv
    import io

    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    rows[2][index] = value
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    path.write_text(out.getvalue())
    return path


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("run_number", "-1", "run_number"),
        ("bcid", "abc", "bcid"),
        ("l1_tbp", "0g", "row 1: field 'l1_tbp'"),
        ("l1_tav", "012", "row 1: field 'l1_tav'"),
        ("references", "RAW:not-a-guid:3", "bad guid"),
        ("references", "RAW:" + GUID, "FORMAT:GUID:POSITION"),
        ("references", f"RAW:{GUID}:x", "bad position"),
    ],
)
def test_bad_csv_names_the_problem(
    tmp_path: Path, run_tables: dict[str, pa.Table], column: str, value: str, expected: str
) -> None:
    path = _bad_csv(tmp_path, run_tables[RAW], column, value)
    with pytest.raises(ValidationError, match=expected):
        read_csv(path)


def test_csv_missing_column(tmp_path: Path, run_tables: dict[str, pa.Table]) -> None:
    path = tmp_path / "bad.csv"
    write_csv(run_tables[RAW].slice(0, 2), path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(",".join(line.split(",")[1:]) for line in lines) + "\n")
    with pytest.raises(ValidationError, match="missing column 'run_number'"):
        read_csv(path)


def test_refusals(tmp_path: Path, run_tables: dict[str, pa.Table]) -> None:
    source = tmp_path / f"{RAW}.jsonl"
    write_jsonl(run_tables[RAW].slice(0, 10), source)
    output = tmp_path / "out.ei"
    extract([source], output, ExtractOptions(), message_bytes=4000)
    with pytest.raises(ValidationError, match="exists"):
        extract([source], output, ExtractOptions(), message_bytes=4000)
    extract([source], output, ExtractOptions(), message_bytes=4000, overwrite=True)
    with pytest.raises(ValidationError, match="GUID"):
        extract([source], tmp_path / "x.ei", ExtractOptions(guid="nope"), message_bytes=4000)
    odd = tmp_path / "events.txt"
    odd.write_text("")
    with pytest.raises(ValidationError, match="suffix"):
        extract([odd], tmp_path / "y.ei", ExtractOptions(dataset=RAW), message_bytes=4000)
    plain = tmp_path / "events.jsonl"
    plain.write_bytes(source.read_bytes())
    with pytest.raises(ValidationError, match="give --dataset"):
        extract([plain], tmp_path / "z.ei", ExtractOptions(), message_bytes=4000)
    with pytest.raises(ValidationError, match="give --collection"):
        collection_of("mydataset")
    assert not (tmp_path / "x.ei").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # aborted writes leave nothing behind


def test_not_an_eventindex_file(tmp_path: Path) -> None:
    path = tmp_path / "bogus.ei"
    path.write_text("hello")
    with pytest.raises(EventIndexFileError, match="not an EventIndex file"):
        EventIndexFile(path)
    with pytest.raises(EventIndexFileError, match="no such"):
        EventIndexFile(tmp_path / "missing.ei")


def _write_root(path: Path, table: pa.Table) -> None:
    import awkward as ak
    import uproot

    branches: dict[str, object] = {}
    for field in EVENT_SCHEMA:
        if field.name == "references":
            continue
        column = table.column(field.name)
        if field.name in TRIGGER_MASK_FIELDS:
            masks = [np.frombuffer(v, dtype=np.uint8) for v in column.to_pylist()]
            branches[field.name] = ak.Array([m.tolist() for m in masks])
        else:
            values = column.to_numpy()
            branches[field.name] = values.astype(np.uint8) if values.dtype == bool else values
    with uproot.recreate(path) as handle:
        handle["EventIndex"] = branches


def test_root_input(tmp_path: Path, run_tables: dict[str, pa.Table]) -> None:
    pytest.importorskip("uproot")
    table = run_tables[AOD].slice(0, 200)
    source = tmp_path / "AOD.pool.root"
    _write_root(source, table)
    options = {"dataset": AOD, "root_format": "AOD", "root_guid": GUID}
    with _extract([source], tmp_path / "out.ei", **options) as ei:
        events = ei.read_table()
    expected = table.drop_columns(["references"])
    assert events.drop_columns(["references"]).equals(expected)
    references = events.column("references").to_pylist()
    assert references[17] == [{"format": "AOD", "guid": GUID, "position": 17}]
    with pytest.raises(ValidationError, match="--input-guid"):
        extract([source], tmp_path / "x.ei", ExtractOptions(dataset=AOD), message_bytes=4000)


def test_root_without_the_extra(
    tmp_path: Path, run_tables: dict[str, pa.Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uproot", None)
    source = tmp_path / "x.root"
    source.write_bytes(b"root")
    options = ExtractOptions(dataset=AOD, root_format="AOD", root_guid=GUID)
    with pytest.raises(MissingExtraError, match=r"eventindex\[root\]"):
        extract([source], tmp_path / "x.ei", options, message_bytes=4000)
