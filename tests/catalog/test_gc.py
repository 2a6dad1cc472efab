"""``collect_garbage``: retired files go after the grace time, crash debris after the
stale age, live files never; dry runs delete nothing; a crash mid-run is finished
by the next run. Runs against every catalog backend (see conftest)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from catalog import Catalog, FileKind, FileState, TagFile
from catalog.fileset import FilesetWriter
from catalog.gc import collect_garbage
from catalog.verify import STALE_WRITING_SECONDS
from eventindex.errors import NotFoundError
from eventindex.storage import MapFileReader, write_mapfile
from tests.catalog.conftest import AOD, EVENTS

HOUR = 3600.0


def events(first: int, count: int) -> pa.Table:
    return pa.table(
        {
            "run_number": pa.array([284484] * count, pa.uint32()),
            "event_number": pa.array(range(first, first + count), pa.uint64()),
            "lumi_block": pa.array([7] * count, pa.uint32()),
        }
    )


class Store:
    def __init__(self, catalog: Catalog, root: Path) -> None:
        self.catalog = catalog
        self.root = root
        self.writer = FilesetWriter(catalog, str(root))
        self.dataset = catalog.get_dataset(AOD)

    def write(self, first: int, count: int = 50, **kwargs: object) -> TagFile:
        return self.writer.write(events(first, count), self.dataset, **kwargs)  # type: ignore[arg-type]

    def writing(self, *, age: float, name: str) -> TagFile:
        """A ``writing`` entry ``age`` seconds old with its file and a temporary file."""
        entry = TagFile(
            file_id=name,
            dataset=AOD,
            collection=EVENTS,
            kind=FileKind.MASTER,
            uri=self.writer.uri_for(self.dataset, FileKind.MASTER, name),
            created_at=time.time() - age,
        )
        self.catalog.add_tagfile(entry)
        write_mapfile(events(0, 10), entry.uri, ("run_number", "event_number"))
        temporary = Path(entry.uri).parent / f".{Path(entry.uri).name}.0123abcd.tmp"
        temporary.write_bytes(b"half a file")
        return entry


@pytest.fixture
def store(populated: Catalog, tmp_path: Path) -> Store:
    return Store(populated, tmp_path / "store")


@pytest.fixture
def compacted(store: Store) -> tuple[list[TagFile], TagFile, TagFile]:
    """Two small files replaced by a merged one, and an unrelated live file."""
    olds = [store.write(0), store.write(50)]
    merged = store.write(0, 100, supersedes=[o.file_id for o in olds])
    other = store.write(1000)
    return olds, merged, other


def files_on_disk(store: Store) -> set[str]:
    return {str(p) for p in store.root.rglob("*") if p.is_file()}


def test_retired_files_go_after_the_grace_time(
    store: Store, compacted: tuple[list[TagFile], TagFile, TagFile]
) -> None:
    olds, merged, other = compacted
    before = files_on_disk(store)

    early = collect_garbage(store.catalog, grace_seconds=HOUR)
    assert (early.removed, early.waiting) == ([], 2)
    assert files_on_disk(store) == before

    report = collect_garbage(store.catalog, grace_seconds=HOUR, now=time.time() + 2 * HOUR)

    assert report.ok() and sorted(r.file_id for r in report.removed) == sorted(
        o.file_id for o in olds
    )
    assert {r.reason for r in report.removed} == {"retired"}
    assert report.files == 2 and report.bytes == sum(o.bytes for o in olds)
    assert files_on_disk(store) == before - {o.uri for o in olds}
    for old in olds:
        with pytest.raises(NotFoundError):
            store.catalog.get_tagfile(old.file_id)
    # Live files are untouched and still read.
    assert [t.file_id for t in store.catalog.list_tagfiles(states=None)] == [
        merged.file_id,
        other.file_id,
    ]
    with MapFileReader(merged.uri) as reader:
        assert reader.num_rows == 100
    again = collect_garbage(store.catalog, grace_seconds=0)
    assert again.removed == [] and again.ok()


def test_dry_run_deletes_nothing(
    store: Store, compacted: tuple[list[TagFile], TagFile, TagFile]
) -> None:
    store.writing(age=2 * STALE_WRITING_SECONDS, name="crashed")
    before = files_on_disk(store)
    listed = store.catalog.list_tagfiles(states=None)

    report = collect_garbage(store.catalog, grace_seconds=0, dry_run=True)

    assert report.dry_run and len(report.removed) == 3 and report.files == 4
    assert files_on_disk(store) == before
    assert store.catalog.list_tagfiles(states=None) == listed
    assert report.to_dict()["dry_run"] is True and "would remove 3 entries" in report.to_text()


def test_stale_writing_debris_goes_with_its_temporary_files(store: Store) -> None:
    live = store.write(0)
    crashed = store.writing(age=2 * STALE_WRITING_SECONDS, name="crashed")
    running = store.writing(age=10, name="running")
    running_files = {p for p in files_on_disk(store) if "running" in p}

    report = collect_garbage(store.catalog, grace_seconds=HOUR)

    (removed,) = report.removed
    assert (removed.file_id, removed.reason) == ("crashed", "stale_writing")
    assert len(removed.files) == 2 and any(f.endswith(".tmp") for f in removed.files)
    assert report.writing == 1
    assert not any("crashed" in p for p in files_on_disk(store))
    assert running_files <= files_on_disk(store) and live.uri in files_on_disk(store)
    assert store.catalog.get_tagfile(running.file_id).state is FileState.WRITING
    with pytest.raises(NotFoundError):
        store.catalog.get_tagfile(crashed.file_id)


def test_a_run_that_crashed_after_deleting_is_finished_by_the_next(
    store: Store, compacted: tuple[list[TagFile], TagFile, TagFile]
) -> None:
    olds, _, _ = compacted
    Path(olds[0].uri).unlink()  # deleted, then the run died before forgetting it

    report = collect_garbage(store.catalog, grace_seconds=0)

    assert report.ok() and sorted(r.file_id for r in report.removed) == sorted(
        o.file_id for o in olds
    )
    assert store.catalog.list_tagfiles(states=[FileState.RETIRED]) == []


def test_entries_retired_without_a_time_wait_one_grace_time(store: Store) -> None:
    old = store.write(0)
    store.catalog.retire_tagfiles([old.file_id])
    entry = store.catalog.get_tagfile(old.file_id)
    # As an older version recorded it: retired, no time.
    store.catalog.remove_tagfile(old.file_id)
    store.catalog.add_tagfile(replace(entry, retired_at=None))

    first = collect_garbage(store.catalog, grace_seconds=HOUR, now=time.time() + 10 * HOUR)
    assert (first.removed, first.stamped) == ([], 1)
    assert Path(old.uri).exists()
    later = collect_garbage(store.catalog, grace_seconds=HOUR, now=time.time() + 2 * HOUR)
    assert [r.file_id for r in later.removed] == [old.file_id]
    assert not Path(old.uri).exists()


def test_a_reader_keeps_reading_a_retired_file_it_has_open(
    store: Store, compacted: tuple[list[TagFile], TagFile, TagFile]
) -> None:
    olds, _, _ = compacted
    with MapFileReader(olds[0].uri) as reader:
        report = collect_garbage(store.catalog, grace_seconds=0)
        assert olds[0].file_id in {r.file_id for r in report.removed}
        assert not Path(olds[0].uri).exists()
        table = reader.read()  # POSIX: the open file outlives its name
    assert table.column("event_number").to_pylist() == list(range(50))


def test_negative_grace_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="grace"):
        collect_garbage(store.catalog, grace_seconds=-1)
