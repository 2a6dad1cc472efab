"""Map-files: round trips, lookups at every edge of the key index, crash safety and errors."""

from __future__ import annotations

import collections
import random
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventindex.errors import StorageError
from eventindex.records.schema import EVENT_SCHEMA, OBJECT_SCHEMA
from eventindex.storage import (
    QUERY_INDEX,
    KeyCache,
    MapFileReader,
    MapFileWriter,
    WriteOptions,
    file_checksum,
    file_size,
    sort_by_key,
    write_mapfile,
)
from tests.storage.conftest import (
    EVENT_KEY,
    OBJECT_KEY,
    PICK_COLUMNS,
    event_rows,
    event_table,
    object_table,
)

SMALL_GROUPS = WriteOptions(row_group_rows=4)


def event_keys(count: int, run: int = 284484, step: int = 3) -> list[tuple[int, int]]:
    """Keys with gaps (every ``step``-th event), so absent keys sit between present ones."""
    return [(run, 10 + step * i) for i in range(count)]


def write_events(
    path: Path, keys: Sequence[tuple[int, int]], options: WriteOptions = SMALL_GROUPS
) -> str:
    uri = str(path / "events.parquet")
    write_mapfile(event_table(keys), uri, EVENT_KEY, options)
    return uri


class CountingReader(MapFileReader):
    """Counts payload reads per row group."""

    def __init__(
        self, uri: str, key_cache: KeyCache | None = None, *, read_threads: int | None = None
    ) -> None:
        super().__init__(uri, key_cache, read_threads=read_threads)
        self.reads: collections.Counter[int] = collections.Counter()
        self._reads_lock = threading.Lock()

    def _read_row_group(self, index: int, columns: Sequence[str]) -> pa.Table:
        with self._reads_lock:
            self.reads[index] += 1
        return super()._read_row_group(index, columns)


# -- writing and reading back -------------------------------------------------


def test_event_table_round_trips_sorted(tmp_path: Path) -> None:
    keys = [*event_keys(30), (284485, 1), (284483, 2**63 + 5), (284483, 2**64 - 1)]
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    uri = str(tmp_path / "events.parquet")
    info = write_mapfile(event_table(shuffled), uri, EVENT_KEY, SMALL_GROUPS)

    assert info.rows == len(keys)
    assert info.row_groups == 9  # ceil(33 / 4)
    assert info.key_min == (284483, 2**63 + 5)
    assert info.key_max == (284485, 1)
    assert info.bytes == file_size(uri)
    assert info.checksum == file_checksum(uri)
    with MapFileReader(uri) as reader:
        assert reader.num_rows == len(keys)
        assert reader.num_row_groups == 9
        assert (reader.key_min, reader.key_max) == (info.key_min, info.key_max)
        table = reader.read()
        assert table.schema.equals(EVENT_SCHEMA, check_metadata=False)
        assert table.to_pylist() == event_table(sorted(keys)).to_pylist()
        for group in range(reader.num_row_groups):
            first, last = reader.row_group_key_range(group)
            rows = sorted(keys)[4 * group : 4 * group + 4]
            assert (first, last) == (rows[0], rows[-1])
        assert reader.get((284483, 2**64 - 1)) == event_rows([(284483, 2**64 - 1)])[0]


def test_object_table_with_negative_ids_round_trips(tmp_path: Path) -> None:
    ids = [5, -(2**63), 2**63 - 1, -1, 0, 17, -17, 2**40]
    uri = str(tmp_path / "objects.parquet")
    info = write_mapfile(object_table(ids), uri, OBJECT_KEY, WriteOptions(row_group_rows=3))
    assert (info.key_min, info.key_max) == ((-(2**63),), (2**63 - 1,))
    with MapFileReader(uri) as reader:
        assert reader.read().column("object_id").to_pylist() == sorted(ids)
        assert reader.read().schema.equals(OBJECT_SCHEMA, check_metadata=False)
        assert reader.get((-17,)) == object_table([-17]).to_pylist()[0]
        assert reader.get((-(2**63),), ["object_id"]) == {"object_id": -(2**63)}
        assert reader.get((-16,)) is None
        found = reader.get_many([(2**63 - 1,), (-1,), (3,)], ["ra", "object_id"])
        assert found.to_pylist() == [
            {"ra": 359.999, "object_id": -1, QUERY_INDEX: 1},
            {"ra": (2**63 - 1) % 360_000 / 1000.0, "object_id": 2**63 - 1, QUERY_INDEX: 0},
        ]


def test_sort_by_key_returns_sorted_input_unchanged() -> None:
    table = object_table([1, 2, 3])
    assert sort_by_key(table, OBJECT_KEY) is table
    assert sort_by_key(object_table([3, 1, 2]), OBJECT_KEY).column(0).to_pylist() == [1, 2, 3]


def test_footer_metadata_is_kept_and_other_tools_read_the_file(tmp_path: Path) -> None:
    uri = str(tmp_path / "events.parquet")
    write_mapfile(event_table(event_keys(10)), uri, EVENT_KEY, metadata={"dataset": "d1"})
    with MapFileReader(uri) as reader:
        assert reader.metadata == {"dataset": "d1"}
        assert reader.key == tuple(EVENT_KEY)
    plain = pq.ParquetFile(uri)
    assert plain.metadata.row_group(0).sorting_columns[0].column_index == 0
    duckdb = pytest.importorskip("duckdb")
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{uri}') WHERE event_number >= 13")
    assert count.fetchall() == [(9,)]


def test_rewriting_a_map_file_keeps_no_stale_footer_entries(tmp_path: Path) -> None:
    first = str(tmp_path / "first.parquet")
    write_mapfile(event_table(event_keys(10)), first, EVENT_KEY, SMALL_GROUPS, {"dataset": "old"})
    with MapFileReader(first) as reader:
        table = reader.read()
    assert table.schema.metadata is not None
    assert b"eventindex.row_groups" in table.schema.metadata
    second = str(tmp_path / "second.parquet")
    write_mapfile(table.slice(2), second, EVENT_KEY, WriteOptions(row_group_rows=3))
    with MapFileReader(second) as reader:
        assert reader.metadata == {}
        assert reader.num_row_groups == 3
        assert reader.key_min == (284484, 16)
        assert reader.get((284484, 13)) is None


def test_reserved_metadata_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"\['row_groups'\] are reserved"):
        write_mapfile(
            event_table(event_keys(2)),
            str(tmp_path / "a.parquet"),
            EVENT_KEY,
            metadata={"row_groups": "[]"},
        )
    assert list(tmp_path.iterdir()) == []


def test_duplicates_stay_adjacent_and_every_copy_is_found(tmp_path: Path) -> None:
    # Six copies of one key (rows 3 to 8) straddle the row-group boundaries at rows 4 and 8.
    unique = event_keys(8)
    twin = (284484, 17)
    copies = [event_table([twin], copy=c) for c in range(6)]
    table = pa.concat_tables([event_table(unique[:1]), *copies, event_table(unique[1:])])
    uri = str(tmp_path / "dups.parquet")
    write_mapfile(
        table.take(pa.array([8, 3, 0, 12, 1, 5, 2, 9, 4, 10, 6, 11, 7, 13])),
        uri,
        EVENT_KEY,
        SMALL_GROUPS,
    )

    with CountingReader(uri) as reader:
        keys = [tuple(k.values()) for k in reader.read(EVENT_KEY).to_pylist()]
        assert keys == sorted(keys)
        assert keys.count(twin) == 6
        assert len({reader.row_group_key_range(g) for g in range(3)}) == 3

        found = reader.get_many([(1, 1), twin, twin], ["lumi_block"])
        # Both queries of the twin get all six copies, in file order, from three row groups.
        assert found.column(QUERY_INDEX).to_pylist() == [1, 2] * 6
        lumi = found.column("lumi_block").to_pylist()
        assert sorted(lumi) == sorted([17 + c for c in range(6)] * 2)
        assert set(reader.reads) == {0, 1, 2}
        assert all(count == 1 for count in reader.reads.values())
        # The first copy in key order is the one get() answers with.
        first = reader.read(["run_number", "event_number", "lumi_block"]).to_pylist()
        first_twin = next(r for r in first if (r["run_number"], r["event_number"]) == twin)
        assert reader.get(twin, ["lumi_block"]) == {"lumi_block": first_twin["lumi_block"]}


def test_stable_sort_keeps_duplicates_in_input_order(tmp_path: Path) -> None:
    twin = (1, 1)
    table = pa.concat_tables([event_table([twin], copy=c) for c in (3, 1, 2)])
    uri = str(tmp_path / "dups.parquet")
    write_mapfile(table, uri, EVENT_KEY, WriteOptions(row_group_rows=2))
    with MapFileReader(uri) as reader:
        assert reader.read(["lumi_block"]).column(0).to_pylist() == [4, 2, 3]
        assert reader.get(twin, ["lumi_block"]) == {"lumi_block": 4}


# -- lookups ------------------------------------------------------------------


@pytest.fixture
def events_uri(tmp_path: Path) -> str:
    """40 events, 10 row groups of 4: event numbers 10, 13, ..., 127 of run 284484."""
    return write_events(tmp_path, event_keys(40))


def test_get_returns_the_row_with_the_requested_columns(events_uri: str) -> None:
    with MapFileReader(events_uri) as reader:
        for key in [(284484, 10), (284484, 22), (284484, 25), (284484, 127)]:
            assert reader.get(key) == event_rows([key])[0]
            expected = {c: event_rows([key])[0][c] for c in PICK_COLUMNS}
            answer = reader.get(key, PICK_COLUMNS)
            assert answer == expected
            assert answer is not None
            assert list(answer) == PICK_COLUMNS
            assert reader.get(key, ["references", "run_number"]) == {
                "references": expected["references"],
                "run_number": 284484,
            }


@pytest.mark.parametrize(
    "key",
    [
        (284484, 9),  # before the first key
        (284483, 2**64 - 1),  # before the first key, in an earlier run
        (284484, 20),  # between row group 0 (last 19) and row group 1 (first 22)
        (284484, 68),  # between row groups 4 and 5
        (284484, 128),  # after the last key
        (284485, 0),  # after the last key, in a later run
        (284484, 23),  # inside row group 1 (22..31), but absent
        (284484, 0),
    ],
)
def test_missing_keys_are_none(events_uri: str, key: tuple[int, int]) -> None:
    with CountingReader(events_uri) as reader:
        assert reader.get(key) is None
        assert reader.get(key, ["lumi_block"]) is None
        found = reader.get_many([key], PICK_COLUMNS)
        assert found.num_rows == 0
        assert found.column_names == [*PICK_COLUMNS, QUERY_INDEX]
        assert found.schema.field("references").type == EVENT_SCHEMA.field("references").type
        assert not reader.reads  # a miss reads no payload


@pytest.mark.parametrize("key", [(-1, 10), (284484, 2**64), (2**32, 1), (284484, -5)])
def test_keys_outside_the_key_types_raise_value_error(
    events_uri: str, key: tuple[int, int]
) -> None:
    with MapFileReader(events_uri) as reader:
        with pytest.raises(ValueError, match="outside"):
            reader.get(key)
        with pytest.raises(ValueError, match="outside"):
            reader.get_many([(284484, 10), key])
        with pytest.raises(ValueError, match="outside"):
            list(reader.scan(key_min=key))


def test_get_many_reads_each_row_group_once(events_uri: str) -> None:
    present = [(284484, 10 + 3 * i) for i in (39, 0, 1, 2, 3, 17, 18, 21, 2)]
    absent = [(284484, 11), (284484, 200), (7, 7)]
    keys = [*present[:4], absent[0], *present[4:7], absent[1], *present[7:], absent[2]]
    with CountingReader(events_uri, KeyCache()) as reader:
        found = reader.get_many(keys, PICK_COLUMNS)
        # Rows 39, 0-3, 17, 18, 21 live in groups 9, 0, 4, 5: one payload read each.
        assert reader.reads == {0: 1, 4: 1, 5: 1, 9: 1}
        assert found.num_rows == len(present)
        rows = found.to_pylist()
        for row in rows:
            key = keys[row[QUERY_INDEX]]
            assert (row["run_number"], row["event_number"]) == key
            assert row["references"] == event_rows([key])[0]["references"]
        # Ordered by key, then by position in the query.
        answered = [(r["event_number"], r[QUERY_INDEX]) for r in rows]
        assert answered == sorted(answered)
        assert sorted(r[QUERY_INDEX] for r in rows) == [0, 1, 2, 3, 5, 6, 7, 9, 10]
        assert found.schema.field("references").type == EVENT_SCHEMA.field("references").type
        assert found.schema.field(QUERY_INDEX).type == pa.int64()


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_get_many_answers_the_same_on_any_number_of_threads(tmp_path: Path, threads: int) -> None:
    keys = event_keys(200)
    uri = write_events(tmp_path, keys, WriteOptions(row_group_rows=7))
    # Every third key from the end, one absent key, one more key and one asked twice.
    queries = [*keys[::-3], (284484, 11), keys[5], keys[199]]
    expected = [
        (key, position)
        for key in sorted(set(queries) & set(keys))
        for position, query in enumerate(queries)
        if query == key
    ]
    with CountingReader(uri, KeyCache(), read_threads=threads) as reader:
        found = reader.get_many(queries, PICK_COLUMNS)
        rows = found.to_pylist()
        assert [((r["run_number"], r["event_number"]), r[QUERY_INDEX]) for r in rows] == expected
        for row, (key, _) in zip(rows, expected, strict=True):
            assert row["references"] == event_rows([key])[0]["references"]
        assert all(count == 1 for count in reader.reads.values())
        assert set(reader.reads) == {keys.index(k) // 7 for k in queries if k in keys}


def test_read_threads_must_be_sensible(events_uri: str) -> None:
    for threads in (0, 9):
        with pytest.raises(ValueError, match="read_threads"):
            MapFileReader(events_uri, read_threads=threads)


def test_get_many_of_all_columns_and_of_no_keys(events_uri: str) -> None:
    with MapFileReader(events_uri) as reader:
        found = reader.get_many([(284484, 13), (284484, 10)])
        assert found.drop_columns([QUERY_INDEX]).to_pylist() == event_rows(
            [(284484, 10), (284484, 13)]
        )
        assert found.schema.remove(found.schema.get_field_index(QUERY_INDEX)).equals(
            EVENT_SCHEMA, check_metadata=False
        )
        empty = reader.get_many([])
        assert empty.num_rows == 0
        assert empty.column_names == [*EVENT_SCHEMA.names, QUERY_INDEX]


def test_key_only_lookups_read_no_payload(events_uri: str) -> None:
    with CountingReader(events_uri) as reader:
        assert reader.get((284484, 13), ["event_number"]) == {"event_number": 13}
        assert reader.get((284484, 13), []) == {}
        assert reader.get((284484, 14), []) is None
        found = reader.get_many([(284484, 13), (284484, 16), (284484, 17)], EVENT_KEY)
        assert found.to_pylist() == [
            {"run_number": 284484, "event_number": 13, QUERY_INDEX: 0},
            {"run_number": 284484, "event_number": 16, QUERY_INDEX: 1},
        ]
        assert found.schema.field("run_number").type == pa.uint32()
        assert not reader.reads


def test_unknown_columns_are_refused(events_uri: str) -> None:
    with MapFileReader(events_uri) as reader:
        with pytest.raises(KeyError, match="nope"):
            reader.get((284484, 10), ["lumi_block", "nope"])
        with pytest.raises(KeyError, match="nope"):
            reader.get_many([(284484, 10)], ["nope"])
        with pytest.raises(KeyError, match="nope"):
            list(reader.scan(columns=["nope"]))
        with pytest.raises(KeyError, match="nope"):
            reader.read(["nope"])
        with pytest.raises(TypeError, match="one string"):
            reader.get((284484, 10), "lumi_block")


def _scanned(reader: MapFileReader, low: Any, high: Any) -> list[int]:
    tables = list(reader.scan(low, high, ["event_number"]))
    assert all(0 < t.num_rows <= 4 for t in tables)
    return [e for t in tables for e in t.column("event_number").to_pylist()]


def test_scan_bounds_are_inclusive_at_row_group_edges(events_uri: str) -> None:
    run = 284484
    events = [10 + 3 * i for i in range(40)]
    with MapFileReader(events_uri) as reader:
        assert _scanned(reader, None, None) == events
        # Exactly row groups 1 and 2: first key of 1 to last key of 2.
        assert _scanned(reader, (run, 22), (run, 43)) == events[4:12]
        # Last key of group 0 to first key of group 1.
        assert _scanned(reader, (run, 19), (run, 22)) == [19, 22]
        # Bounds between keys.
        assert _scanned(reader, (run, 20), (run, 21)) == []
        assert _scanned(reader, (run, 20), (run, 23)) == [22]
        assert _scanned(reader, (run, 11), None) == events[1:]
        assert _scanned(reader, None, (run, 126)) == events[:-1]
        assert _scanned(reader, (run, 127), (run, 127)) == [127]
        assert _scanned(reader, (run, 128), None) == []
        assert _scanned(reader, (run, 50), (run, 40)) == []
        # A bound may name the run only.
        assert _scanned(reader, (run,), (run,)) == events
        assert _scanned(reader, (run + 1,), None) == []
        assert _scanned(reader, None, (run - 1,)) == []
        rows = [r for t in reader.scan((run, 22), (run, 25)) for r in t.to_pylist()]
        assert rows == event_rows([(run, 22), (run, 25)])


def test_scan_over_several_runs(tmp_path: Path) -> None:
    keys = [(run, event) for run in (1, 2, 3) for event in (5, 2**40, 2**64 - 1)]
    uri = write_events(tmp_path, keys)
    with MapFileReader(uri) as reader:
        runs = [r for t in reader.scan((2,), (2,), ["run_number"]) for r in t.column(0).to_pylist()]
        assert runs == [2, 2, 2]
        tables = list(reader.scan((2, 6), (3, 5), EVENT_KEY))
        assert [t.to_pylist() for t in tables] == [
            [
                {"run_number": 2, "event_number": 2**40},
                {"run_number": 2, "event_number": 2**64 - 1},
                {"run_number": 3, "event_number": 5},
            ]
        ]


# -- the key cache --------------------------------------------------------------


def test_key_cache_hits_on_repeated_lookups(events_uri: str, key_cache: KeyCache) -> None:
    with MapFileReader(events_uri, key_cache) as reader:
        reader.get((284484, 10))
        assert (key_cache.hits, key_cache.misses) == (0, 1)
        reader.get((284484, 13))  # same row group
        reader.get((284484, 11))  # same row group, absent
        assert (key_cache.hits, key_cache.misses) == (2, 1)
        reader.get_many([(284484, 10), (284484, 22)])
        assert (key_cache.hits, key_cache.misses) == (3, 2)
        assert len(key_cache) == 2
        assert key_cache.nbytes == 2 * 4 * 12
    assert len(key_cache) == 0  # closing drops the reader's entries
    assert key_cache.nbytes == 0


def test_key_cache_evicts_least_recently_used_by_bytes(events_uri: str) -> None:
    cache = KeyCache(max_bytes=2 * 4 * 12)  # two row groups of four 12-byte keys
    with MapFileReader(events_uri, cache) as reader:
        for event in (10, 22, 10, 34):  # groups 0, 1, 0, 2: group 1 is the least recent
            reader.get((284484, event))
        assert len(cache) == 2
        assert cache.nbytes <= cache.max_bytes
        misses = cache.misses
        reader.get((284484, 10))
        assert cache.misses == misses
        reader.get((284484, 22))
        assert cache.misses == misses + 1


def test_key_cache_skips_entries_larger_than_its_budget(events_uri: str) -> None:
    cache = KeyCache(max_bytes=10)
    with MapFileReader(events_uri, cache) as reader:
        assert reader.get((284484, 10), ["lumi_block"]) == {"lumi_block": 10}
        assert reader.get((284484, 10), ["lumi_block"]) == {"lumi_block": 10}
        assert len(cache) == 0
        assert cache.misses == 2


def test_readers_of_one_cache_do_not_share_entries(tmp_path: Path, key_cache: KeyCache) -> None:
    first = write_events(tmp_path, event_keys(8))
    second = str(tmp_path / "other.parquet")
    write_mapfile(event_table(event_keys(8, step=5)), second, EVENT_KEY, SMALL_GROUPS)
    with MapFileReader(first, key_cache) as a, MapFileReader(second, key_cache) as b:
        assert a.get((284484, 13), ["event_number"]) == {"event_number": 13}
        assert b.get((284484, 13), ["event_number"]) is None
        assert b.get((284484, 15), ["event_number"]) == {"event_number": 15}
        assert a.get((284484, 15), ["event_number"]) is None


def test_a_dropped_reader_frees_its_cache_entries(events_uri: str, key_cache: KeyCache) -> None:
    reader = MapFileReader(events_uri, key_cache)
    reader.get((284484, 10))
    assert len(key_cache) == 1
    del reader
    assert len(key_cache) == 0


# -- the streaming writer -------------------------------------------------------


def test_writer_makes_full_row_groups_from_uneven_chunks(tmp_path: Path) -> None:
    keys = event_keys(23)
    uri = str(tmp_path / "stream.parquet")
    with MapFileWriter(uri, EVENT_SCHEMA, EVENT_KEY, WriteOptions(row_group_rows=5)) as writer:
        for start, stop in [(0, 3), (3, 4), (4, 4), (4, 17), (17, 23)]:
            writer.write(event_table(keys[start:stop]))
    assert writer.info is not None
    assert writer.info.rows == 23
    metadata = pq.ParquetFile(uri).metadata
    sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    assert sizes == [5, 5, 5, 5, 3]
    with MapFileReader(uri) as reader:
        assert reader.read().to_pylist() == event_rows(keys)
        assert reader.row_group_key_range(4) == (keys[20], keys[22])


def test_writer_refuses_keys_going_back_and_other_schemas(tmp_path: Path) -> None:
    uri = str(tmp_path / "stream.parquet")
    with MapFileWriter(uri, EVENT_SCHEMA, EVENT_KEY, SMALL_GROUPS) as writer:
        writer.write(event_table([(2, 5), (2, 1)]))  # sorted inside one table
        with pytest.raises(StorageError, match=r"out of key order: \(1, 9\) follows \(2, 5\)"):
            writer.write(event_table([(1, 9)]))
        with pytest.raises(StorageError, match="schema does not match"):
            writer.write(object_table([1]))
        writer.write(event_table([(2, 5), (3, 0)]))  # equal to the last key is fine
    with MapFileReader(uri) as reader:
        assert reader.read(EVENT_KEY).to_pylist() == [
            {"run_number": 2, "event_number": e} for e in (1, 5, 5)
        ] + [{"run_number": 3, "event_number": 0}]


def test_key_columns_must_exist_and_be_integers(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="key column 'nope' is missing"):
        write_mapfile(object_table([1]), str(tmp_path / "a.parquet"), ["nope"])
    with pytest.raises(StorageError, match="must be an integer type"):
        write_mapfile(object_table([1]), str(tmp_path / "a.parquet"), ["ra"])
    nulls = pa.table({"object_id": pa.array([1, None], pa.int64())})
    with pytest.raises(StorageError, match="null"):
        write_mapfile(nulls, str(tmp_path / "a.parquet"), OBJECT_KEY)
    assert list(tmp_path.iterdir()) == []


# -- crash safety ---------------------------------------------------------------


def test_a_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: pq.ParquetWriter, *args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", explode)
    uri = str(tmp_path / "deep" / "events.parquet")
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_mapfile(event_table(event_keys(10)), uri, EVENT_KEY, SMALL_GROUPS)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_failed_rewrite_keeps_the_committed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = write_events(tmp_path, event_keys(10))
    before = file_checksum(uri)

    def interrupt(self: pq.ParquetWriter, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pq.ParquetWriter, "add_key_value_metadata", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_mapfile(event_table(event_keys(5)), uri, EVENT_KEY, SMALL_GROUPS)
    assert file_checksum(uri) == before
    assert [p.name for p in tmp_path.iterdir()] == ["events.parquet"]


def test_an_aborted_stream_leaves_no_file(tmp_path: Path) -> None:
    uri = str(tmp_path / "stream.parquet")
    with pytest.raises(ZeroDivisionError), MapFileWriter(uri, EVENT_SCHEMA, EVENT_KEY) as writer:
        writer.write(event_table(event_keys(3)))
        assert len(list(tmp_path.iterdir())) == 1  # the temporary file, hidden
        assert next(tmp_path.iterdir()).name.startswith(".stream.parquet.")
        _ = 1 / 0
    assert list(tmp_path.iterdir()) == []


def test_empty_tables_are_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "empty.parquet")
    with pytest.raises(StorageError, match="empty map-file"):
        write_mapfile(EVENT_SCHEMA.empty_table(), uri, EVENT_KEY)
    with (
        pytest.raises(StorageError, match="empty map-file"),
        MapFileWriter(uri, EVENT_SCHEMA, EVENT_KEY) as writer,
    ):
        writer.write(EVENT_SCHEMA.empty_table())
    assert list(tmp_path.iterdir()) == []


# -- damaged and foreign files -------------------------------------------------


def test_a_missing_file_is_a_storage_error(tmp_path: Path) -> None:
    uri = str(tmp_path / "missing.parquet")
    with pytest.raises(StorageError, match=f"{uri}: map-file not found"):
        MapFileReader(uri)


def test_a_file_that_is_not_parquet_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.parquet"
    path.write_text("this is not a parquet file, it is a shopping list\n" * 20)
    with pytest.raises(StorageError, match=f"{path}: not a readable Parquet file"):
        MapFileReader(str(path))


def test_a_truncated_file_is_a_storage_error(tmp_path: Path) -> None:
    uri = write_events(tmp_path, event_keys(40))
    data = Path(uri).read_bytes()
    for size in (len(data) // 2, len(data) - 5, 3):
        Path(uri).write_bytes(data[:size])
        with pytest.raises(StorageError, match=uri):
            MapFileReader(uri)


def test_a_plain_parquet_file_is_not_a_map_file(tmp_path: Path) -> None:
    uri = str(tmp_path / "plain.parquet")
    pq.write_table(event_table(event_keys(4)), uri)
    with pytest.raises(StorageError, match=f"{uri}: not a map-file"):
        MapFileReader(uri)


@pytest.mark.parametrize(
    ("row_groups", "message"),
    [
        (b"[[1, 10, 1, 19]]", "1 entries for 2 row groups"),
        (b"[[1, 10], [1, 22]]", "must hold 4 integers"),
        (b"[[1, 10, 1, 19], [1, 22, 1, 2e3]]", "not an integer"),
        (b"[[1, 22, 1, 31], [1, 10, 1, 19]]", "out of key order"),
        (b"not json", "damaged map-file key index"),
    ],
)
def test_a_damaged_key_index_is_a_storage_error(
    tmp_path: Path, row_groups: bytes, message: str
) -> None:
    uri = str(tmp_path / "damaged.parquet")
    table = event_table(event_keys(8))
    table = table.replace_schema_metadata(
        {
            b"eventindex.format": b"mapfile/1",
            b"eventindex.key": b'["run_number", "event_number"]',
            b"eventindex.row_groups": row_groups,
        }
    )
    pq.write_table(table, uri, row_group_size=4)
    with pytest.raises(StorageError, match=message):
        MapFileReader(uri)


def test_a_closed_reader_refuses_lookups(events_uri: str) -> None:
    reader = MapFileReader(events_uri)
    reader.close()
    with pytest.raises(StorageError, match=events_uri):
        reader.get((284484, 10))
    with pytest.raises(StorageError, match=events_uri):
        reader.read()


# -- paths ------------------------------------------------------------------------


def test_local_paths_and_file_uris_name_the_same_file(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/sub/events.parquet"
    info = write_mapfile(event_table(event_keys(6)), uri, EVENT_KEY, SMALL_GROUPS)
    assert info.uri == uri
    local = tmp_path / "sub" / "events.parquet"
    assert local.is_file()
    assert file_checksum(str(local)) == file_checksum(uri) == info.checksum
    with MapFileReader(uri) as by_uri, MapFileReader(str(local)) as by_path:
        assert (
            by_uri.get((284484, 13)) == by_path.get((284484, 13)) == event_rows([(284484, 13)])[0]
        )


# -- concurrency and a model check ----------------------------------------------------


def test_concurrent_lookups_agree(events_uri: str) -> None:
    keys = [(284484, e) for e in range(5, 135)]
    present = {(284484, 10 + 3 * i) for i in range(40)}
    expected = {k: (event_rows([k])[0] if k in present else None) for k in keys}
    errors: list[str] = []
    lock = threading.Lock()
    with MapFileReader(events_uri, KeyCache()) as reader:

        def check(key: tuple[int, int]) -> None:
            answer = reader.get(key)
            if answer != expected[key]:
                with lock:
                    errors.append(f"{key}: {answer}")

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(check, keys * 4))
    assert errors == []


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(-50, 50), min_size=1, max_size=60),
    queries=st.lists(st.integers(-55, 55), max_size=30),
    group_rows=st.integers(1, 7),
)
def test_get_many_matches_a_brute_force_model(
    ids: list[int], queries: list[int], group_rows: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        uri = f"{directory}/objects.parquet"
        write_mapfile(object_table(ids), uri, OBJECT_KEY, WriteOptions(row_group_rows=group_rows))
        with CountingReader(uri, KeyCache()) as reader:
            found = reader.get_many([(q,) for q in queries], ["ra", "object_id"])
            # File order (key order, duplicates as written), then query order per row.
            expected = [
                (i, position) for i in sorted(ids) for position, q in enumerate(queries) if q == i
            ]
            got = list(
                zip(
                    found.column("object_id").to_pylist(),
                    found.column(QUERY_INDEX).to_pylist(),
                    strict=True,
                )
            )
            assert got == expected
            assert found.column("ra").to_pylist() == [(q % 360_000) / 1000.0 for q, _ in got]
            assert all(count == 1 for count in reader.reads.values())
            for q in set(queries):
                assert (reader.get((q,)) is not None) == (q in ids)
            low, high = sorted(queries[:2]) if len(queries) >= 2 else (None, None)
            scanned = [
                i
                for table in reader.scan(
                    None if low is None else (low,), None if high is None else (high,)
                )
                for i in table.column("object_id").to_pylist()
            ]
            assert scanned == sorted(
                i for i in ids if (low is None or i >= low) and (high is None or i <= high)
            )


def test_uint64_event_numbers_beyond_2_63_are_found(tmp_path: Path) -> None:
    keys = [(1, 2**63 - 1), (1, 2**63), (1, 2**63 + 1), (1, 2**64 - 2), (1, 2**64 - 1)]
    uri = write_events(tmp_path, keys, WriteOptions(row_group_rows=2))
    with MapFileReader(uri) as reader:
        for key in keys:
            assert reader.get(key, ["event_number"]) == {"event_number": key[1]}
        found = reader.get_many(keys[::-1], ["event_number"])
        assert found.column("event_number").to_pylist() == [k[1] for k in keys]
        assert found.column(QUERY_INDEX).to_pylist() == [4, 3, 2, 1, 0]
        assert np.array_equal(
            found.column("event_number").to_numpy(), np.array([k[1] for k in keys], np.uint64)
        )
