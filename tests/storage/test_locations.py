"""Locations files: every row's key, attributes and references, narrowed and memory-mapped,
answering exactly what the table they describe holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from eventindex.errors import StorageError
from eventindex.records.schema import REFERENCE_TYPE
from eventindex.storage import locations
from eventindex.storage.locations import LocationIndex, build_locations, write_locations

ATTRIBUTES = ("lumi_block", "smk", "offset", "signed")


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                pa.field("run_number", pa.uint32(), nullable=False),
                pa.field("event_number", pa.uint64(), nullable=False),
                pa.field("lumi_block", pa.uint32(), nullable=False),
                pa.field("smk", pa.uint32(), nullable=False),
                pa.field("offset", pa.uint64(), nullable=False),
                pa.field("signed", pa.int64(), nullable=False),
                pa.field("references", pa.list_(REFERENCE_TYPE), nullable=False),
            ]
        ),
    )


def _rows(depths: list[int]) -> list[dict[str, Any]]:
    """Two runs; events far apart (above 2**32); attributes that take each encoding:
    a few wide values (a dictionary), a wide range (offsets), negative numbers."""
    rows = []
    for i, depth in enumerate(depths):
        run = 7 if i < len(depths) // 2 else 9
        rows.append(
            {
                "run_number": run,
                "event_number": 2**40 + 1000 * i,
                "lumi_block": 100 + i // 3,
                "smk": [2**31, 5, 2**32 - 1][i % 3],
                "offset": 2**63 + 70_000 * i,
                "signed": -(2**62) + 3 * i if i % 2 else 12 + i,
                "references": [
                    {
                        "format": ["RAW", "AOD", "DAOD_PHYS"][d],
                        "guid": f"guid-{i % 4}-{d}",
                        "position": 10**12 + i * 7 + d,
                    }
                    for d in range(depth)
                ],
            }
        )
    return rows


@pytest.mark.parametrize("depths", [[2] * 40, [i % 4 for i in range(40)]], ids=["fixed", "varying"])
def test_every_row_reads_back(tmp_path: Path, depths: list[int]) -> None:
    rows = _rows(depths)
    info = write_locations(
        _table(rows), str(tmp_path / "f.locations"), ATTRIBUTES, {"master": "m1"}
    )
    assert (info.rows, info.key_min, info.key_max) == (
        40,
        (7, 2**40),
        (9, 2**40 + 39_000),
    )
    assert info.bytes == (tmp_path / "f.locations").stat().st_size
    with LocationIndex(info.uri) as index:
        assert index.metadata == {"master": "m1"}
        assert (index.rows, index.key_min, index.key_max) == (info.rows, info.key_min, info.key_max)
        for number, row in enumerate(rows):
            assert index.find(row["run_number"], row["event_number"]) == number
            assert index.references(number) == [
                (r["format"], r["guid"], r["position"]) for r in row["references"]
            ]
            assert index.attributes(number) == {name: row[name] for name in ATTRIBUTES}
        every = np.arange(len(rows))
        assert index.references_many(every[::3]) == [index.references(i) for i in every[::3]]
        assert index.attributes_many(every[::2]) == [index.attributes(i) for i in every[::2]]
        runs = np.array([r["run_number"] for r in rows], dtype=np.uint32)
        events = np.array([r["event_number"] for r in rows], dtype=np.uint64)
        assert index.find_many(runs, events).tolist() == every.tolist()


@pytest.mark.parametrize("depths", [[2] * 40, [i % 4 for i in range(40)]], ids=["fixed", "varying"])
def test_prefetching_asks_for_the_pages_a_read_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depths: list[int]
) -> None:
    rows = _rows(depths)
    info = write_locations(_table(rows), str(tmp_path / "f.locations"), ATTRIBUTES)
    runs = np.array([r["run_number"] for r in rows], dtype=np.uint32)
    events = np.array([r["event_number"] for r in rows], dtype=np.uint64)
    with LocationIndex(info.uri) as index:
        asked: list[tuple[str, list[int], list[int]]] = []
        real = index._prefetch

        def record(section: str, starts: Any, stops: Any) -> None:
            asked.append((section, starts.tolist(), stops.tolist()))
            real(section, starts, stops)  # the real madvise, on a real mapping

        monkeypatch.setattr(index, "_prefetch", record)
        index.prefetch_keys(runs, events)
        assert {section for section, _, _ in asked} == {"events"}
        assert len(asked) == len(set(runs.tolist())), "one request per run segment"
        found = index.find_many(runs, events, prefetched=True)
        assert found.tolist() == list(range(len(rows)))
        spans = [(a, b) for _, starts, stops in asked for a, b in zip(starts, stops, strict=True)]
        assert all(any(a <= row < b for a, b in spans) for row in found.tolist())
        asked.clear()
        index.find_many(runs, events, prefetched=True)
        assert asked == [], "prefetched: find_many asks for nothing again"

        picked = np.arange(len(rows))[::3]
        attributed = picked[::2]
        index.prefetch_rows(picked, attributed)
        index.prefetch_references(picked)
        (rows_asked, references_asked) = asked
        if depths[0] == depths[-1] == 2:  # one depth: only the attributed rows' records
            assert rows_asked == ("rows", attributed.tolist(), (attributed + 1).tolist())
        else:  # where a row's references end is in the next row's record
            following = np.minimum(picked + 2, len(rows))
            assert rows_asked == ("rows", picked.tolist(), following.tolist())
        starts = np.cumsum([0, *depths])
        assert references_asked == (
            "references",
            starts[picked].tolist(),
            starts[picked + 1].tolist(),
        )
        asked.clear()
        assert index.references_many(picked, prefetched=True) == [
            index.references(i) for i in picked.tolist()
        ]
        assert asked == []


def test_absent_keys(tmp_path: Path) -> None:
    rows = _rows([1] * 10)
    info = write_locations(_table(rows), str(tmp_path / "f.locations"), ATTRIBUTES)
    absent = [
        (8, 2**40),  # a run between the file's runs
        (7, 2**40 + 1),  # inside the run, between events
        (7, 0),  # below the file's smallest event
        (7, 2**64 - 1),  # above any event the offsets can hold
        (9, 2**40),  # an event of the other run
        (2**32 - 1, 2**40),
    ]
    with LocationIndex(info.uri) as index:
        assert [index.find(*key) for key in absent] == [-1] * len(absent)
        runs = np.array([k[0] for k in absent], dtype=np.uint32)
        events = np.array([k[1] for k in absent], dtype=np.uint64)
        assert index.find_many(runs, events).tolist() == [-1] * len(absent)
        assert index.references_many(np.array([], dtype=np.int64)) == []


def test_a_key_held_twice_answers_with_its_first_row(tmp_path: Path) -> None:
    rows = _rows([1] * 6)
    rows[3]["event_number"] = rows[2]["event_number"]
    info = write_locations(_table(rows), str(tmp_path / "f.locations"), ATTRIBUTES)
    with LocationIndex(info.uri) as index:
        assert index.find(rows[2]["run_number"], rows[2]["event_number"]) == 2


def test_attributes_are_stored_narrow(tmp_path: Path) -> None:
    # More distinct values than a one-byte dictionary holds, for the offset columns.
    header, sections = build_locations(_table(_rows([1] * 300)), ATTRIBUTES)
    widths = {name: sections["rows"].dtype[name].itemsize for name in ATTRIBUTES}
    assert widths == {"lumi_block": 1, "smk": 1, "offset": 4, "signed": 8}
    assert sections["events"].dtype == np.uint32  # offsets from the smallest event
    assert header["depth"] == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rows: rows.reverse(), "not sorted by run_number"),
        (lambda rows: rows[:2].reverse() or rows.insert(0, rows.pop(1)), "not sorted by event"),
        (lambda rows: rows.clear(), "empty"),
    ],
)
def test_bad_tables_are_refused_and_leave_no_file(
    tmp_path: Path, change: Any, message: str
) -> None:
    rows = _rows([1] * 10)
    change(rows)
    with pytest.raises(StorageError, match=message):
        write_locations(_table(rows), str(tmp_path / "f.locations"), ATTRIBUTES)
    assert list(tmp_path.iterdir()) == []


def test_missing_columns_are_named(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="bcid"):
        write_locations(_table(_rows([1])), str(tmp_path / "f.locations"), ["bcid"])


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    info = write_locations(_table(_rows([2] * 20)), str(tmp_path / "f.locations"), ATTRIBUTES)
    whole = Path(info.uri).read_bytes()
    truncated = tmp_path / "truncated.locations"
    truncated.write_bytes(whole[: len(whole) - 100])
    with pytest.raises(StorageError, match="damaged"):
        LocationIndex(str(truncated))
    other = tmp_path / "other.locations"
    other.write_bytes(b"PAR1" + whole[4:])
    with pytest.raises(StorageError, match="not a locations file"):
        LocationIndex(str(other))
    with pytest.raises(StorageError, match="not found"):
        LocationIndex(str(tmp_path / "absent.locations"))


@pytest.mark.parametrize("depths", [[3] * 30, [i % 4 for i in range(30)]], ids=["fixed", "varying"])
def test_references_to_one_file(tmp_path: Path, depths: list[int]) -> None:
    rows = _rows(depths)
    info = write_locations(_table(rows), str(tmp_path / "f.locations"), ATTRIBUTES)
    with LocationIndex(info.uri) as index:
        for guid in ("guid-1-0", "guid-2-2", "absent"):
            expected = [
                (r["format"], row["run_number"], row["event_number"], r["position"])
                for row in rows
                for r in row["references"]
                if r["guid"] == guid
            ]
            assert index.referencing(guid) == expected
        assert index.referencing("guid-1-0")


@pytest.mark.parametrize("block", [3, 4, 1024])
def test_lookups_through_the_sampled_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Runs of repeated keys across block edges, gaps, two runs: every answer is the
    first row of its key, as a bisect of the whole file gives."""
    monkeypatch.setattr(locations, "BLOCK", block)
    rng = np.random.default_rng(block)
    events = np.sort(rng.choice(np.arange(0, 9000, 3), size=2600, replace=True))
    rows = [
        {**_rows([1])[0], "run_number": 5 if i < 1300 else 6, "event_number": int(e)}
        for i, e in enumerate(np.concatenate([np.sort(events[:1300]), np.sort(events[1300:])]))
    ]
    info = write_locations(_table(rows), str(tmp_path / "f.locations"), ATTRIBUTES)
    runs = np.array([r["run_number"] for r in rows], dtype=np.uint32)
    keys = np.array([r["event_number"] for r in rows], dtype=np.uint64)
    probes = [(int(r), int(e) + d) for r, e in zip(runs, keys, strict=True) for d in (-1, 0, 1)]
    expected = []
    for run, event in probes:
        segment = np.flatnonzero(runs == run)
        first = segment[0] + int(np.searchsorted(keys[segment], event, side="left"))
        hit = first <= segment[-1] and int(keys[first]) == event and event >= 0
        expected.append(int(first) if hit else -1)
    with LocationIndex(info.uri) as index:
        assert [index.find(run, event) if event >= 0 else -1 for run, event in probes] == expected
        kept = [i for i, (_, event) in enumerate(probes) if event >= 0]
        found = index.find_many(
            np.array([probes[i][0] for i in kept], dtype=np.uint32),
            np.array([probes[i][1] for i in kept], dtype=np.uint64),
        )
        assert found.tolist() == [expected[i] for i in kept]
