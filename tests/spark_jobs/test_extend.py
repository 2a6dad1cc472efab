"""The Extender: columns computed elsewhere become vertical parts that picks return."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from catalog import FileKind, FileState, SQLiteCatalog
from catalog.verify import verify_catalog
from eventindex.errors import ValidationError
from eventindex.query.extensions import Extensions
from eventindex.records.schema import EVENT_KEY
from eventindex.storage import MapFileReader
from eventindex.storage.merge import align_extension
from spark_jobs.compact import plan_compaction, run_compaction
from spark_jobs.extend import open_source, plan_extension, run_extension
from tests.spark_jobs.test_compact import OPTIONS, SETTINGS, SmallFiles, small_files


# -- the pure transform ----------------------------------------------------------
def _keys(pairs: list[tuple[int, int]]) -> pa.Table:
    return pa.table(
        {
            "run_number": pa.array([p[0] for p in pairs], pa.uint32()),
            "event_number": pa.array([p[1] for p in pairs], pa.uint64()),
        }
    )


def test_align_lays_the_extension_out_in_master_order() -> None:
    master = _keys([(1, 1), (1, 2), (1, 2), (2, 7)])
    extension = _keys([(2, 7), (1, 1), (9, 9)]).append_column("x", pa.array([70, 10, 99]))

    aligned = align_extension(master, extension, EVENT_KEY)

    assert aligned.table.column("x").to_pylist() == [10, None, None, 70]
    assert aligned.table.select(list(EVENT_KEY)).equals(master)
    assert aligned.matched.tolist() == [True, True, False]
    assert aligned.missing == 2


def test_align_refuses_keys_given_twice() -> None:
    extension = _keys([(1, 1), (1, 1)]).append_column("x", pa.array([1, 2]))
    with pytest.raises(ValidationError, match=r"more than once, e.g. \[\(1, 1\)\]"):
        align_extension(_keys([(1, 1)]), extension, EVENT_KEY)


# -- the job ------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[SmallFiles]:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    yield small_files(catalog, tmp_path / "store", extensions=False)
    catalog.close()


def _dataset(store: SmallFiles) -> str:
    return next(iter(store.tables))


def _source(store: SmallFiles, path: Path, *, skip: int = 7, offset: float = 0.0) -> pa.Table:
    """New columns for every event of the first dataset but every ``skip``-th, shuffled."""
    events = store.tables[_dataset(store)]
    unique = events.group_by(list(EVENT_KEY)).aggregate([]).select(list(EVENT_KEY))
    keep = np.arange(unique.num_rows) % skip != 0
    rows = unique.filter(pa.array(keep))
    rows = rows.take(pa.array(np.random.default_rng(3).permutation(rows.num_rows)))
    table = pa.table(
        {
            "run_number": rows.column("run_number").cast(pa.int64()),
            "event_number": rows.column("event_number").cast(pa.int64()),
            "jet_pt": pa.array(rows.column("event_number").to_numpy() * 0.25 + offset),
            "label": pa.array([f"e{e}" for e in rows.column("event_number").to_pylist()]),
        }
    )
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return table


def _expected(source: pa.Table) -> dict[tuple[int, int], dict[str, Any]]:
    return {(r["run_number"], r["event_number"]): r for r in source.to_pylist()}


def _extend(store: SmallFiles, path: Path, spark: Any = None, part: str = "jets") -> Any:
    source = open_source(str(path), EVENT_KEY)
    tasks = plan_extension(store.catalog, str(store.root), _dataset(store), part, source, OPTIONS)
    return run_extension(store.catalog, tasks, spark=spark)


def _check_picks(store: SmallFiles, source: pa.Table) -> None:
    expected = _expected(source)
    events = store.tables[_dataset(store)]
    keys = list(zip(*(events.column(k).to_pylist() for k in EVENT_KEY), strict=True))
    collection = store.catalog.get_dataset(_dataset(store)).collection
    answers = Extensions(store.catalog).columns(collection, keys)
    for key, answer in zip(keys, answers, strict=True):
        values = answer[_dataset(store)]
        if key in expected:
            assert values == {"jet_pt": expected[key]["jet_pt"], "label": expected[key]["label"]}
        else:
            assert values == {"jet_pt": None, "label": None}


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_extension_columns_join_the_logical_record(
    store: SmallFiles, tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"jets{suffix}"
    source = _source(store, path)

    summary = _extend(store, path)

    masters = store.catalog.list_tagfiles(dataset=_dataset(store), kinds=[FileKind.MASTER])
    parts = store.catalog.list_tagfiles(dataset=_dataset(store), kinds=[FileKind.EXTENSION])
    assert summary.files == len(masters) == len(parts)
    assert {p.attributes["master"] for p in parts} == {m.file_id for m in masters}
    assert summary.events == sum(m.rows for m in masters)
    assert summary.events_without_values == summary.events - source.num_rows - 1  # + duplicate
    for part in parts:
        master = next(m for m in masters if m.file_id == part.attributes["master"])
        with MapFileReader(part.uri) as x, MapFileReader(master.uri) as m:
            assert x.read(list(EVENT_KEY)).equals(m.read(list(EVENT_KEY)))
    _check_picks(store, source)
    assert verify_catalog(store.catalog, str(store.root)).ok()


def test_extending_again_replaces_the_part_in_one_step(store: SmallFiles, tmp_path: Path) -> None:
    _source(store, tmp_path / "v1.parquet")
    _extend(store, tmp_path / "v1.parquet")
    first = {e.file_id for e in store.catalog.list_tagfiles(kinds=[FileKind.EXTENSION])}
    source = _source(store, tmp_path / "v2.parquet", skip=5, offset=1.0)

    summary = _extend(store, tmp_path / "v2.parquet")

    assert summary.replaced_files == len(first)
    live = {e.file_id for e in store.catalog.list_tagfiles(kinds=[FileKind.EXTENSION])}
    assert live.isdisjoint(first) and len(live) == len(first)
    retired = store.catalog.list_tagfiles(kinds=[FileKind.EXTENSION], states=[FileState.RETIRED])
    assert {e.file_id for e in retired} == first
    _check_picks(store, source)


def test_keys_in_no_master_are_an_error_and_nothing_is_written(
    store: SmallFiles, tmp_path: Path
) -> None:
    path = tmp_path / "bad.parquet"
    good = _source(store, path)
    stray = pa.table(
        {
            "run_number": pa.array([1, 2], pa.int64()),
            "event_number": pa.array([5, 6], pa.int64()),
            "jet_pt": pa.array([0.0, 0.0]),
            "label": pa.array(["x", "y"]),
        }
    )
    pq.write_table(pa.concat_tables([good, stray]), path)

    with pytest.raises(ValidationError, match=r"2 key\(s\) are in no master file .*\(1, 5\)"):
        _extend(store, path)
    assert store.catalog.list_tagfiles(kinds=[FileKind.EXTENSION], states=None) == []
    assert verify_catalog(store.catalog, str(store.root)).ok(), "no orphan files either"


def test_bad_sources_are_refused_with_the_file_and_column(
    store: SmallFiles, tmp_path: Path
) -> None:
    path = tmp_path / "dup.parquet"
    table = _source(store, path)
    pq.write_table(pa.concat_tables([table, table.slice(3, 1)]), path)
    with pytest.raises(ValidationError, match="keys given more than once"):
        _extend(store, path)

    clash = tmp_path / "clash.parquet"
    pq.write_table(table.append_column("bcid", pa.array([1] * table.num_rows)), clash)
    with pytest.raises(ValidationError, match=r"clash.parquet: column 'bcid' is a field"):
        open_source(str(clash), EVENT_KEY)
    no_key = tmp_path / "nokey.parquet"
    pq.write_table(table.drop_columns(["event_number"]), no_key)
    with pytest.raises(ValidationError, match=r"nokey.parquet: key column 'event_number'"):
        open_source(str(no_key), EVENT_KEY)
    with pytest.raises(ValidationError, match=r"missing\.parquet: cannot read"):
        open_source(str(tmp_path / "missing.parquet"), EVENT_KEY)

    _source(store, path.with_name("ok.parquet"))
    _extend(store, path.with_name("ok.parquet"))
    other = tmp_path / "other.parquet"
    pq.write_table(table.select(["run_number", "event_number", "label"]), other)
    with pytest.raises(ValidationError, match="column 'label' is already in extension 'jets'"):
        _extend(store, other, part="labels")
    with pytest.raises(ValidationError, match="extension name"):
        _extend(store, other, part="no spaces")


def test_compaction_carries_the_extension_columns(store: SmallFiles, tmp_path: Path) -> None:
    source = _source(store, tmp_path / "jets.parquet")
    _extend(store, tmp_path / "jets.parquet")

    run_compaction(
        store.catalog, plan_compaction(store.catalog, str(store.root), "*", SETTINGS, OPTIONS)
    )

    masters = store.catalog.list_tagfiles(dataset=_dataset(store), kinds=[FileKind.MASTER])
    assert all(m.attributes.get("compacted_from") for m in masters)
    _check_picks(store, source)


@pytest.mark.spark
def test_extension_on_spark(spark: Any, store: SmallFiles, tmp_path: Path) -> None:
    path = tmp_path / "jets.parquet"
    source = _source(store, path)
    summary = _extend(store, path, spark=spark)
    assert summary.files == len(
        store.catalog.list_tagfiles(dataset=_dataset(store), kinds=[FileKind.MASTER])
    )
    _check_picks(store, source)

    stray = tmp_path / "stray.parquet"
    pq.write_table(
        pa.concat_tables(
            [source, source.slice(0, 1).set_column(1, "event_number", pa.array([1], pa.int64()))]
        ),
        stray,
    )
    with pytest.raises(ValidationError, match=r"1 key\(s\) are in no master"):
        _extend(store, stray, spark=spark)
