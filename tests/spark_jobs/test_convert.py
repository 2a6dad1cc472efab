"""The Convertor: CSV and JSON-lines record files into a map-file dataset, and out to Parquet."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from catalog import Collection, Dataset, FileKind, FileState, SQLiteCatalog
from catalog.verify import verify_catalog
from eventindex.errors import ValidationError
from eventindex.generator import GeneratorSpec, generate_run
from eventindex.records.jsonl import write_jsonl
from eventindex.records.schema import EVENT_KEY, RecordKind
from producers.readers import read_events, write_csv
from spark_jobs.convert import export_dataset, plan_conversion, run_conversion
from tests.spark_jobs.test_compact import OPTIONS, live_rows

SPEC = GeneratorSpec(runs=1, events_per_run=1200)
DATASET = "data15_13TeV.00284484.physics_Main.merge.AOD.converted"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[SQLiteCatalog]:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    catalog.create_collection(Collection(SPEC.collection, RecordKind.EVENTS))
    catalog.create_dataset(Dataset(DATASET, SPEC.collection, format="AOD"))
    yield catalog
    catalog.close()


def events() -> pa.Table:
    tables = generate_run(SPEC, SPEC.first_run)
    return next(t for name, t in tables.items() if ".merge.AOD." in name)


def inputs(folder: Path, table: pa.Table, pieces: int = 4) -> list[Path]:
    """The events cut into files, alternately JSON lines and CSV, in reverse key order."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-table.num_rows // pieces)
    paths = []
    for number in range(pieces):
        piece = table.slice((pieces - 1 - number) * size, size)
        if number % 2:
            path = folder / f"part{number}.csv"
            write_csv(piece, path)
        else:
            path = folder / f"part{number}.jsonl"
            write_jsonl(piece, path)
        paths.append(path)
    return paths


def convert(catalog: SQLiteCatalog, root: Path, paths: list[str], spark: Any = None) -> Any:
    tasks, skipped = plan_conversion(
        catalog, str(root), paths, DATASET, read_events, OPTIONS, target_bytes=2**20
    )
    summary = run_conversion(catalog, tasks, spark=spark)
    summary.skipped_already_converted = skipped
    return summary


def test_record_files_become_a_sorted_dataset(catalog: SQLiteCatalog, tmp_path: Path) -> None:
    table = events()
    folder = tmp_path / "in"
    inputs(folder, table)

    summary = convert(catalog, tmp_path / "store", [str(folder)])

    assert summary.inputs == 4 and summary.events == table.num_rows
    assert 1 <= summary.files < 4, "small inputs are grouped into fewer files"
    assert live_rows(catalog, DATASET).equals(table)
    entries = catalog.list_tagfiles(dataset=DATASET)
    assert all(e.guids for e in entries), "GUIDs of the references are indexed"
    assert verify_catalog(catalog, str(tmp_path / "store")).ok(strict=True)

    # Converting the folder again adds nothing; a new file alone is converted.
    again = convert(catalog, tmp_path / "store", [str(folder)])
    assert (again.files, again.skipped_already_converted) == (0, 4)
    extra = tmp_path / "more" / "late.jsonl"
    extra.parent.mkdir()
    later = generate_run(GeneratorSpec(runs=1, first_run=300000, events_per_run=50), 300000)
    late = next(t for n, t in later.items() if ".merge.AOD." in n)
    write_jsonl(late, extra)
    added = convert(catalog, tmp_path / "store", [str(folder), str(extra)])
    assert (added.files, added.skipped_already_converted) == (1, 4)
    assert added.events == late.num_rows


def test_a_bad_line_names_the_file_and_line(catalog: SQLiteCatalog, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    paths = inputs(folder, events())
    lines = paths[0].read_text().splitlines()
    lines[2] = re.sub(r'"bcid":\s*\d+', '"bcid":"x"', lines[2])
    paths[0].write_text("\n".join(lines) + "\n")

    with pytest.raises(ValidationError, match=r"part0\.jsonl: line 3: field 'bcid'"):
        convert(catalog, tmp_path / "store", [str(folder)])
    assert catalog.list_tagfiles(states=None) == []
    assert verify_catalog(catalog, str(tmp_path / "store")).ok(strict=True)

    broken = tmp_path / "broken.csv"
    write_csv(events().slice(0, 3), broken)
    text = broken.read_text().splitlines()
    text[2] = text[2].replace(",", ",zz", 1)
    broken.write_text("\n".join(text) + "\n")
    with pytest.raises(ValidationError, match=r"broken\.csv"):
        convert(catalog, tmp_path / "store", [str(broken)])
    with pytest.raises(ValidationError, match="no such input"):
        convert(catalog, tmp_path / "store", [str(tmp_path / "nothing.csv")])


@pytest.mark.parametrize("on_spark", [False, pytest.param(True, marks=pytest.mark.spark)])
def test_export_to_parquet_partitioned_by_run(
    request: pytest.FixtureRequest, catalog: SQLiteCatalog, tmp_path: Path, on_spark: bool
) -> None:
    spark = request.getfixturevalue("spark") if on_spark else None
    table = events()
    convert(catalog, tmp_path / "store", [str(p) for p in inputs(tmp_path / "in", table)])

    out = tmp_path / "export"
    figures = export_dataset(catalog, DATASET, str(out), spark=spark)

    assert figures["events"] == table.num_rows
    assert [p.name for p in out.iterdir() if p.is_dir()] == [f"run_number={SPEC.first_run}"]
    exported = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert exported.num_rows == table.num_rows
    assert sorted(exported.column("event_number").to_pylist()) == sorted(
        table.column("event_number").to_pylist()
    )
    with pytest.raises(ValidationError, match="exists already"):
        export_dataset(catalog, DATASET, str(out))


@pytest.mark.spark
def test_conversion_on_spark(spark: Any, catalog: SQLiteCatalog, tmp_path: Path) -> None:
    table = events()
    paths = [str(p) for p in inputs(tmp_path / "in", table, pieces=6)]
    summary = convert(catalog, tmp_path / "store", paths, spark=spark)
    assert summary.events == table.num_rows
    assert live_rows(catalog, DATASET).equals(table)
    assert catalog.list_tagfiles(states=[FileState.WRITING]) == []
    assert {e.kind for e in catalog.list_tagfiles()} == {FileKind.MASTER}
    assert EVENT_KEY == ("run_number", "event_number")
