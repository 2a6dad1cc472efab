"""Compaction (the Appender): the pure merge on small frames, then the job end to end."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalog import Catalog, FileKind, FileState, HBaseCatalog, SQLiteCatalog, TagFile
from catalog.fileset import FilesetWriter
from catalog.verify import verify_catalog
from eventindex.config import CompactionSettings
from eventindex.creator import ensure_collection, ensure_dataset
from eventindex.errors import NotFoundError, ValidationError
from eventindex.generator import GeneratorSpec, dataset_specs, generate_menus, generate_run
from eventindex.query.trigger_index import INDEX_PART
from eventindex.query.triggers import TriggerIndex
from eventindex.records.schema import EVENT_KEY, RecordKind
from eventindex.storage import MapFileReader, WriteOptions
from eventindex.storage.merge import merge_tables, reorder_like
from spark_jobs import compact as compact_module
from spark_jobs.compact import plan_compaction, run_compaction
from spark_jobs.indexer import plan_index, run_index
from tests.catalog.conftest import mock_connection

SPEC = GeneratorSpec(runs=2, events_per_run=2000)
OPTIONS = WriteOptions(row_group_rows=1024)
SETTINGS = CompactionSettings(target_rows=1500, target_bytes=2**30, small_file_rows=1000)
SLICE = 150  # rows of one small TagFile, as a consumer flush would write them
PART = "scores"


# -- the pure transform --------------------------------------------------------
def _frame(pairs: list[tuple[int, int]], tag: str) -> pa.Table:
    return pa.table(
        {
            "run_number": pa.array([p[0] for p in pairs], pa.uint32()),
            "event_number": pa.array([p[1] for p in pairs], pa.uint64()),
            "tag": pa.array([f"{tag}{i}" for i in range(len(pairs))]),
        }
    )


def test_merge_sorts_by_key_and_keeps_duplicates_in_input_order() -> None:
    first = _frame([(1, 5), (2, 1), (2, 9)], "a")
    second = _frame([(1, 2), (2, 1), (3, 0)], "b")

    merged = merge_tables([first, second], EVENT_KEY)

    keys = list(zip(*(merged.table.column(k).to_pylist() for k in EVENT_KEY), strict=True))
    assert keys == [(1, 2), (1, 5), (2, 1), (2, 1), (2, 9), (3, 0)]
    assert merged.table.column("tag").to_pylist() == ["b0", "a0", "a1", "b1", "a2", "b2"]
    assert (merged.duplicates, merged.duplicate_keys) == (1, [(2, 1)])
    # The permutation lines up any table aligned with the inputs (extension parts).
    aligned = reorder_like([first.select(["tag"]), second.select(["tag"])], merged.order)
    assert aligned.column("tag").equals(merged.table.column("tag"))


def test_merge_keeps_64_bit_event_numbers_in_order() -> None:
    big = 2**63 + 7
    merged = merge_tables([_frame([(1, big)], "a"), _frame([(1, 3)], "b")], EVENT_KEY)
    assert merged.table.column("event_number").to_pylist() == [3, big]
    assert merged.duplicates == 0


def test_merge_refuses_tables_of_other_schemas() -> None:
    other = _frame([(1, 1)], "b").append_column("extra", pa.array([1]))
    with pytest.raises(ValidationError, match="input 1 has another schema"):
        merge_tables([_frame([(1, 2)], "a"), other], EVENT_KEY)


# -- the job -------------------------------------------------------------------
@dataclass
class SmallFiles:
    """A store whose RAW datasets were written by many small flushes, out of order."""

    catalog: Catalog
    root: Path
    writer: FilesetWriter
    tables: dict[str, pa.Table]  # what each dataset holds, duplicates included
    message_ids: list[str]


def _scores(table: pa.Table) -> pa.Table:
    """An extension part computed from the keys, so alignment can be checked anywhere."""
    events = table.column("event_number").to_numpy().astype(np.float64)
    return pa.table(
        {
            "run_number": table.column("run_number"),
            "event_number": table.column("event_number"),
            "score": pa.array(events * 0.5, pa.float64()),
        }
    )


def small_files(catalog: Catalog, root: Path, *, extensions: bool = True) -> SmallFiles:
    writer = FilesetWriter(catalog, str(root), OPTIONS)
    ensure_collection(catalog, SPEC.collection, RecordKind.EVENTS)
    for dataset in dataset_specs(SPEC):
        ensure_dataset(catalog, dataset)
    for menu in generate_menus(SPEC):
        catalog.put_trigger_menu(menu)
    shuffle = random.Random(7)
    tables: dict[str, pa.Table] = {}
    message_ids: list[str] = []
    for run_number in SPEC.run_numbers:
        name = SPEC.dataset_name(run_number, SPEC.processings[0])
        table = generate_run(SPEC, run_number)[name]
        # One event flushed twice under two message ids: a duplicate inside the dataset.
        table = pa.concat_tables([table, table.slice(10, 1)])
        tables[name] = table
        pieces = [table.slice(s, SLICE) for s in range(0, table.num_rows, SLICE)]
        shuffle.shuffle(pieces)
        dataset = catalog.get_dataset(name)
        for number, piece in enumerate(pieces):
            message = f"{run_number}-m{number}"
            message_ids.append(message)
            master = writer.write(piece, dataset, message_ids=[message])
            if extensions and number % 3:  # some files have no extension yet
                writer.write(
                    _scores(piece),
                    dataset,
                    kind=FileKind.EXTENSION,
                    part=PART,
                    attributes={"master": master.file_id},
                )
    return SmallFiles(catalog, root, writer, tables, message_ids)


def live_rows(catalog: Catalog, dataset: str) -> pa.Table:
    pieces = []
    for entry in catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.MASTER]):
        with MapFileReader(entry.uri) as reader:
            pieces.append(reader.read())
    return pa.concat_tables(pieces).sort_by([(k, "ascending") for k in EVENT_KEY])


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([(k, "ascending") for k in EVENT_KEY])


@pytest.fixture(params=["sqlite", "hbase-mock"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        opened: Catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
        yield opened
        opened.close()
    else:
        hbase = HBaseCatalog(mock_connection(), table_prefix=f"compact_{tmp_path.name[-12:]}_")
        yield hbase
        hbase.drop_tables()


def test_compaction_merges_small_files_without_losing_or_doubling(
    catalog: Catalog, tmp_path: Path
) -> None:
    store = small_files(catalog, tmp_path / "store")
    raw = "*.daq.RAW"
    before = {name: live_rows(catalog, name) for name in store.tables}
    inputs = [
        e
        for name in store.tables
        for e in catalog.list_tagfiles(dataset=name, kinds=[FileKind.MASTER])
    ]

    tasks = plan_compaction(catalog, str(store.root), raw, SETTINGS, OPTIONS)
    summary = run_compaction(catalog, tasks)

    assert summary.files_in == sum(len(t.inputs) for t in tasks) == len(inputs)
    assert summary.files_out == len(tasks) == 4  # ~2000 rows a run, at most 1500 per file
    assert summary.events == sum(t.num_rows for t in store.tables.values())
    assert summary.duplicates == 2 and all(len(k) == 1 for k in summary.duplicate_keys.values())
    for name, table in store.tables.items():
        after = live_rows(catalog, name)
        assert after.equals(before[name]) and after.equals(_sorted(table))
        masters = catalog.list_tagfiles(dataset=name, kinds=[FileKind.MASTER])
        assert all(m.attributes.get("compacted_from") for m in masters)
        assert all(m.rows <= SETTINGS.target_rows for m in masters)
    retired = catalog.list_tagfiles(kinds=[FileKind.MASTER], states=[FileState.RETIRED])
    assert {e.file_id for e in inputs} <= {e.file_id for e in retired}
    # Redelivered messages stay known: the new files inherited the inputs' message ids.
    assert catalog.absorbed_message_ids(store.message_ids) == set(store.message_ids)
    assert verify_catalog(catalog, str(store.root)).ok()

    again = plan_compaction(catalog, str(store.root), raw, SETTINGS, OPTIONS)
    assert again == [], "a second run finds nothing left to merge"


def test_extension_parts_follow_their_masters(catalog: Catalog, tmp_path: Path) -> None:
    store = small_files(catalog, tmp_path / "store")
    run_compaction(catalog, plan_compaction(catalog, str(store.root), "*", SETTINGS, OPTIONS))

    for name in store.tables:
        masters = catalog.list_tagfiles(dataset=name, kinds=[FileKind.MASTER])
        parts = {
            e.attributes["master"]: e
            for e in catalog.list_tagfiles(dataset=name, kinds=[FileKind.EXTENSION])
        }
        assert set(parts) == {m.file_id for m in masters}, "one live part per live master"
        for master in masters:
            with MapFileReader(master.uri) as m, MapFileReader(parts[master.file_id].uri) as x:
                keys, part = m.read(list(EVENT_KEY)), x.read()
            assert all(part.column(k).equals(keys.column(k)) for k in EVENT_KEY)
            expected = _scores(keys).column("score")
            has_value = pc.is_valid(part.column("score"))
            # Files written without the part have nulls; the others their values, aligned.
            assert 0 < pc.sum(has_value).as_py() < part.num_rows
            assert pc.filter(part.column("score"), has_value).equals(pc.filter(expected, has_value))
    assert verify_catalog(catalog, str(store.root)).ok()


def test_trigger_indexes_of_retired_inputs_are_replaced(tmp_path: Path) -> None:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    store = small_files(catalog, tmp_path / "store", extensions=False)
    tasks, _ = plan_index(catalog, str(store.root), "*.daq.RAW")
    run_index(catalog, tasks)
    index = TriggerIndex(catalog, refresh_seconds=0.0)
    menu = next(m for m in catalog.list_trigger_menus() if m.level == "HLT")
    expression = " OR ".join(list(menu.bits.values())[:4])
    before = index.count(expression, dataset="*.daq.RAW")
    assert before.unindexed_files == 0

    summary = run_compaction(
        catalog, plan_compaction(catalog, str(store.root), "*.daq.RAW", SETTINGS, OPTIONS)
    )

    assert summary.reindexed == summary.files_out == 4
    live = [e for e in catalog.list_tagfiles(kinds=[FileKind.INDEX]) if e.part == INDEX_PART]
    masters = {e.file_id for e in catalog.list_tagfiles(kinds=[FileKind.MASTER])}
    raw_masters = {
        e.file_id
        for e in catalog.list_tagfiles(kinds=[FileKind.MASTER])
        if e.dataset.endswith("daq.RAW")
    }
    assert {e.attributes["master"] for e in live} == raw_masters <= masters
    after = index.count(expression, dataset="*.daq.RAW")
    assert after.unindexed_files == 0
    # The duplicated event passes twice before and after: the same answer.
    assert (after.passed, after.events) == (before.passed, before.events)
    catalog.close()


def test_a_reader_never_sees_a_gap_or_a_double(tmp_path: Path) -> None:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    store = small_files(catalog, tmp_path / "store", extensions=False)
    expected = sum(t.num_rows for t in store.tables.values())
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        watcher = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
        while not stop.is_set():
            listed = watcher.list_tagfiles(kinds=[FileKind.MASTER])
            seen.add(sum(e.rows for e in listed if e.dataset in store.tables))
        watcher.close()

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        run_compaction(catalog, plan_compaction(catalog, str(store.root), "*", SETTINGS, OPTIONS))
    finally:
        stop.set()
        thread.join()
    assert seen == {expected}
    catalog.close()


def test_a_failing_job_leaves_the_dataset_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    store = small_files(catalog, tmp_path / "store")
    before = sorted(e.file_id for e in catalog.list_tagfiles())
    tasks = plan_compaction(catalog, str(store.root), "*", SETTINGS, OPTIONS)
    real: Callable[[Any], Any] = compact_module.compact_files
    calls: list[int] = []

    def fail_on_second(task: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(task)

    monkeypatch.setattr(compact_module, "compact_files", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        run_compaction(catalog, tasks)

    # The first group was committed whole; nothing of the failed ones is left.
    assert catalog.list_tagfiles(states=[FileState.WRITING]) == []
    after = catalog.list_tagfiles()
    assert len([e for e in after if e.attributes.get("compacted_from")]) == 1
    for name, table in store.tables.items():
        assert live_rows(catalog, name).equals(_sorted(table))
    assert verify_catalog(catalog, str(store.root)).ok()
    assert len(before) > len(after)
    catalog.close()


def test_a_crash_before_the_commit_leaves_only_writing_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    store = small_files(catalog, tmp_path / "store", extensions=False)
    tasks = plan_compaction(catalog, str(store.root), "*", SETTINGS, OPTIONS)

    def crash(entries: list[TagFile]) -> list[TagFile]:
        raise SystemExit("killed")

    # A killed process cleans up nothing: no forget, and the commit never happens.
    monkeypatch.setattr(compact_module, "forget_files", lambda catalog, entries: None)
    monkeypatch.setattr(catalog, "commit_tagfiles", crash)
    with pytest.raises(SystemExit):
        run_compaction(catalog, tasks)

    debris = catalog.list_tagfiles(states=[FileState.WRITING])
    assert {e.file_id for e in debris} >= {t.output_id for t in tasks}
    for name, table in store.tables.items():
        assert live_rows(catalog, name).equals(_sorted(table)), "readers see the old files"
    report = verify_catalog(catalog, str(store.root))
    assert report.ok(), report.to_dict()
    # Garbage collection of the debris, then a rerun compacts as if nothing happened.
    monkeypatch.undo()
    for entry in debris:
        catalog.remove_tagfile(entry.file_id)
    summary = run_compaction(
        catalog, plan_compaction(catalog, str(store.root), "*", SETTINGS, OPTIONS)
    )
    assert summary.files_out == len(tasks)
    catalog.close()


def test_run_range_and_unknown_dataset(tmp_path: Path) -> None:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    store = small_files(catalog, tmp_path / "store", extensions=False)
    first = SPEC.first_run
    tasks = plan_compaction(
        catalog, str(store.root), "*", SETTINGS, OPTIONS, run_range=(first, first)
    )
    assert {t.dataset for t in tasks} == {SPEC.dataset_name(first, SPEC.processings[0])}
    with pytest.raises(NotFoundError, match="no dataset matches"):
        plan_compaction(catalog, str(store.root), "nope*", SETTINGS, OPTIONS)
    catalog.close()


@pytest.mark.spark
def test_compaction_on_spark(spark: Any, tmp_path: Path) -> None:
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    store = small_files(catalog, tmp_path / "store")
    tasks = plan_compaction(catalog, str(store.root), "*", SETTINGS, OPTIONS)
    seen: list[str] = []

    summary = run_compaction(
        catalog, tasks, spark=spark, progress=lambda result: seen.append(result.task.output_id)
    )

    assert sorted(seen) == sorted(t.output_id for t in tasks)
    assert summary.files_out == 4 and summary.extension_files == 4
    for name, table in store.tables.items():
        assert live_rows(catalog, name).equals(_sorted(table))
    assert verify_catalog(catalog, str(store.root)).ok()
    catalog.close()
