"""Picks and lookups return the extension columns of the datasets that hold the event."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog import FileKind
from eventindex.query.extensions import EXTENSIONS, Extensions
from eventindex.query.reader import Reader
from eventindex.records.schema import EVENT_KEY
from eventindex.storage import WriteOptions
from spark_jobs.compact import plan_compaction, run_compaction
from spark_jobs.extend import open_source, plan_extension, run_extension
from tests.generated_store import GeneratedStore

OPTIONS = WriteOptions(row_group_rows=1024)


@pytest.fixture
def store(tmp_path: Path) -> GeneratedStore:
    return GeneratedStore.create(tmp_path, file_rows=700)


def _extend(store: GeneratedStore, dataset: str, path: Path, name: str = "ml") -> None:
    source = open_source(str(path), EVENT_KEY)
    tasks = plan_extension(store.catalog, str(store.root), dataset, name, source, OPTIONS)
    run_extension(store.catalog, tasks)


def _write_source(table: pa.Table, path: Path) -> pa.Table:
    keys = table.select(list(EVENT_KEY))
    events = keys.column("event_number").to_numpy()
    source = keys.append_column("score", pa.array(events % 97, pa.int32())).append_column(
        "digest", pa.array([int(e).to_bytes(4, "big") for e in events], pa.binary())
    )
    pq.write_table(source.take(pa.array(np.random.default_rng(1).permutation(len(events)))), path)
    return source


def test_pick_and_lookup_return_the_extension_columns(
    store: GeneratedStore, tmp_path: Path
) -> None:
    run = store.spec.first_run
    aod = store.dataset(run, "AOD", "r7562")
    table = store.tables[aod]
    _write_source(table, tmp_path / "ml.parquet")
    reader = Reader(store.catalog, refresh_seconds=0.0)

    _extend(store, aod, tmp_path / "ml.parquet")

    run_number, event_number = (table.column(k)[5].as_py() for k in EVENT_KEY)
    picked = reader.pick(store.spec.collection, run_number, event_number)
    assert picked is not None
    expected = {"score": event_number % 97, "digest": event_number.to_bytes(4, "big").hex()}
    assert picked.attributes[EXTENSIONS] == {aod: expected}
    assert picked.to_dict()["attributes"][EXTENSIONS] == {aod: expected}
    # Only the dataset that was extended contributes; a pick limited elsewhere has none.
    raw = store.dataset(run, "RAW")
    other = reader.pick(store.spec.collection, run_number, event_number, dataset_pattern=raw)
    assert other is not None and EXTENSIONS not in other.attributes

    keys = [(r, e) for r, e in zip(*(table.column(k).to_pylist() for k in EVENT_KEY), strict=True)]
    answers = reader.lookup(store.spec.collection, [*keys[:50], (1, 1)])
    assert answers[-1] is None
    for (_, event), answer in zip(keys[:50], answers[:-1], strict=True):
        assert answer is not None
        assert answer.attributes[EXTENSIONS][aod]["score"] == event % 97


def test_compacted_masters_keep_answering_with_their_columns(
    store: GeneratedStore, tmp_path: Path
) -> None:
    from eventindex.config import CompactionSettings

    run = store.spec.first_run
    aod = store.dataset(run, "AOD", "r7562")
    table = store.tables[aod]
    _write_source(table, tmp_path / "ml.parquet")
    _extend(store, aod, tmp_path / "ml.parquet")
    extensions = Extensions(store.catalog, refresh_seconds=0.0)
    keys = [(r, e) for r, e in zip(*(table.column(k).to_pylist() for k in EVENT_KEY), strict=True)]
    before = extensions.columns(store.spec.collection, keys)

    settings = CompactionSettings(target_rows=10_000, small_file_rows=5_000)
    tasks = plan_compaction(store.catalog, str(store.root), aod, settings, OPTIONS)
    assert tasks, "the dataset was written as several small files"
    run_compaction(store.catalog, tasks)

    assert len(store.catalog.list_tagfiles(dataset=aod, kinds=[FileKind.EXTENSION])) == len(tasks)
    assert extensions.columns(store.spec.collection, keys) == before
    assert all(b[aod]["score"] is not None for b in before)
