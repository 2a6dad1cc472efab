"""The Creator: a generator spec becomes registered filesets, and re-running resumes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from catalog import Collection, FileKind, FileState, SQLiteCatalog
from catalog.fileset import FilesetWriter
from catalog.verify import verify_catalog
from eventindex.creator import create_generated
from eventindex.errors import CatalogError
from eventindex.generator import (
    DEFAULT_PROCESSINGS,
    GeneratorSpec,
    dataset_specs,
    generate_menus,
)
from eventindex.records.schema import RecordKind
from eventindex.storage import MapFileReader
from tests.generated_store import SMALL_ROW_GROUPS, SMALL_SPEC, GeneratedStore

KEY = ["run_number", "event_number"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("creator"))
    try:
        yield generated
    finally:
        generated.close()


def file_keys(uri: str) -> pa.Table:
    with MapFileReader(uri) as reader:
        return reader.read(KEY)


def stored_keys(catalog: SQLiteCatalog, dataset: str) -> pa.Table:
    """The keys of a dataset's committed master files, in file order."""
    files = catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.MASTER])
    return pa.concat_tables([file_keys(f.uri) for f in files])


def test_every_dataset_is_registered_with_all_its_rows(store: GeneratedStore) -> None:
    catalog, spec = store.catalog, store.spec
    assert [c.name for c in catalog.list_collections()] == [spec.collection]
    assert catalog.get_collection(spec.collection).kind is RecordKind.EVENTS
    expected = {d.name: d for d in dataset_specs(spec)}
    registered = {d.name: d for d in catalog.list_datasets(spec.collection)}
    assert set(registered) == set(expected) == set(store.tables)
    for name, dataset in registered.items():
        assert (dataset.format, dataset.processing_tag, dataset.upstream) == (
            expected[name].format,
            expected[name].processing_tag,
            expected[name].upstream,
        )
        files = catalog.list_tagfiles(dataset=name)
        assert files and all(f.kind is FileKind.MASTER for f in files)
        assert sum(f.rows for f in files) == store.tables[name].num_rows
        assert stored_keys(catalog, name).equals(store.tables[name].select(KEY))

    summary = store.summary
    assert sorted(summary.datasets_written) == sorted(expected)
    assert summary.datasets_skipped == []
    assert summary.files == len(catalog.list_tagfiles())
    assert summary.rows == sum(t.num_rows for t in store.tables.values())
    assert summary.bytes == sum(f.bytes for f in catalog.list_tagfiles())
    assert verify_catalog(catalog, str(store.root)).ok(strict=True)


def test_trigger_menus_are_stored(store: GeneratedStore) -> None:
    menus = generate_menus(store.spec)
    assert menus
    stored = store.catalog.list_trigger_menus()
    assert sorted(stored, key=lambda m: (m.key, m.level)) == sorted(
        menus, key=lambda m: (m.key, m.level)
    )
    used_keys = {k for t in store.tables.values() for k in t["smk"].to_pylist()}
    assert used_keys <= {m.key for m in stored}, "every SMK in the data has its menu"


def test_running_again_skips_everything(store: GeneratedStore) -> None:
    before = store.catalog.list_tagfiles(states=None)
    runs: list[int] = []
    summary = create_generated(store.spec, store.catalog, store.writer, progress=runs.append)
    assert summary.datasets_written == []
    assert sorted(summary.datasets_skipped) == sorted(store.tables)
    assert (summary.files, summary.rows, summary.bytes) == (0, 0, 0)
    assert store.catalog.list_tagfiles(states=None) == before
    assert runs == list(store.spec.run_numbers)


def test_file_rows_cuts_datasets_into_contiguous_files(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=2500)
    store = GeneratedStore.create(tmp_path, spec, file_rows=700)
    try:
        assert store.summary.files > len(spec.processings)
        for name, table in store.tables.items():
            files = store.catalog.list_tagfiles(dataset=name)
            assert len(files) == math.ceil(table.num_rows / 700)
            assert [f.rows for f in files[:-1]] == [700] * (len(files) - 1)
            for before, after in itertools.pairwise(files):
                assert before.key_max < after.key_min, "files do not overlap"
            assert stored_keys(store.catalog, name).equals(table.select(KEY))
        assert verify_catalog(store.catalog, str(store.root)).ok(strict=True)
    finally:
        store.close()


class CrashError(Exception):
    """The process dies in the middle of a write."""


def test_resumes_after_a_crash_in_the_middle_of_a_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third TagFile fails: its dataset has one file of several. Running again completes
    the dataset without duplicating the rows already stored."""
    spec = GeneratorSpec(runs=1, events_per_run=2500)
    catalog = SQLiteCatalog(str(tmp_path / "catalog.sqlite"))
    writer = FilesetWriter(catalog, str(tmp_path / "store"), SMALL_ROW_GROUPS)
    real_write = writer.write
    calls = itertools.count()

    def crashing_write(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == 2:
            raise CrashError
        return real_write(*args, **kwargs)

    monkeypatch.setattr(writer, "write", crashing_write)
    with pytest.raises(CrashError):
        create_generated(spec, catalog, writer, file_rows=1000)
    assert len(catalog.list_tagfiles()) == 2
    monkeypatch.undo()

    summary = create_generated(spec, catalog, writer, file_rows=1000)
    store = GeneratedStore(spec, tmp_path / "store", tmp_path, catalog, writer, summary)
    try:
        for name, table in store.tables.items():
            assert stored_keys(catalog, name).equals(table.select(KEY)), name
        report = verify_catalog(catalog, str(store.root))
        assert report.ok(strict=True), report.to_text()
        assert summary.rows == sum(t.num_rows for t in store.tables.values()) - 2000
    finally:
        catalog.close()


def test_another_spec_into_the_same_datasets_is_refused(store: GeneratedStore) -> None:
    other = GeneratorSpec(runs=1, events_per_run=SMALL_SPEC.events_per_run, seed=99)
    before = store.catalog.list_tagfiles(states=None)
    with pytest.raises(CatalogError, match="already holds"):
        create_generated(other, store.catalog, store.writer)
    assert store.catalog.list_tagfiles(states=None) == before


def test_another_seed_with_the_same_row_counts_is_refused(tmp_path: Path) -> None:
    """With --exact every seed gives a RAW dataset of the same size: compare contents."""
    raw_only = DEFAULT_PROCESSINGS[:1]
    spec = GeneratorSpec(runs=1, events_per_run=1000, exact=True, processings=raw_only)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        other = replace(spec, seed=7)
        assert other.collection == spec.collection
        with pytest.raises(CatalogError, match="already holds"):
            create_generated(other, store.catalog, store.writer)
    finally:
        store.close()


def test_more_runs_add_datasets(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=800)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        longer = GeneratorSpec(runs=2, events_per_run=800)
        summary = create_generated(longer, store.catalog, store.writer)
        assert len(summary.datasets_skipped) == len(summary.datasets_written)
        assert {d.split(".")[1] for d in summary.datasets_written} == {
            f"{longer.first_run + 1:08d}"
        }
        assert len(store.catalog.list_datasets()) == 2 * len(spec.processings)
    finally:
        store.close()


def test_collection_of_another_kind_is_refused(tmp_path: Path) -> None:
    catalog = SQLiteCatalog(":memory:")
    catalog.create_collection(Collection(SMALL_SPEC.collection, RecordKind.OBJECTS))
    writer = FilesetWriter(catalog, str(tmp_path / "store"))
    with pytest.raises(CatalogError, match="objects"):
        create_generated(SMALL_SPEC, catalog, writer)


def test_file_rows_must_be_positive(store: GeneratedStore) -> None:
    with pytest.raises(ValueError, match="file_rows"):
        create_generated(store.spec, store.catalog, store.writer, file_rows=0)


def test_no_writing_entries_are_left(store: GeneratedStore) -> None:
    states = {f.state for f in store.catalog.list_tagfiles(states=None)}
    assert states == {FileState.COMMITTED}
