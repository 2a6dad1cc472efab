"""The pool of open map-file readers: LRU reuse, and evicted readers closed only
after their grace time (another thread may still be reading from them)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from eventindex.errors import StorageError
from eventindex.query.open_files import OpenFiles
from eventindex.storage import MapFileReader, write_mapfile


def _files(tmp_path: Path, count: int) -> list[str]:
    uris = []
    for n in range(count):
        uri = str(tmp_path / f"f{n}.parquet")
        write_mapfile(
            pa.table({"object_id": pa.array([n, n + 100], pa.int64())}), uri, ["object_id"]
        )
        uris.append(uri)
    return uris


def _closed(reader: MapFileReader, key: int = 0) -> bool:
    """Whether reading a row that the file holds fails (a missing key reads nothing)."""
    try:
        reader.get((key,), ["object_id"])
    except (StorageError, ValueError):
        return True
    return False


def test_a_reader_is_reused_and_evicted_ones_close_after_the_grace_time(tmp_path: Path) -> None:
    uris = _files(tmp_path, 3)
    files = OpenFiles(max_open=2, grace_seconds=3600)
    first = files.open("a", uris[0])
    assert files.open("a", uris[0]) is first
    files.open("b", uris[1])
    files.open("c", uris[2])  # evicts "a", the least recently used
    assert files.counts() == (2, 1)
    assert not _closed(first), "still open: a reader elsewhere may be using it"
    files.grace_seconds = 0
    files.close_retired()
    assert _closed(first)
    assert files.counts() == (2, 0)
    reopened = files.open("a", uris[0])
    assert reopened is not first and not _closed(reopened)


def test_dropped_and_all_readers_close(tmp_path: Path) -> None:
    uris = _files(tmp_path, 2)
    files = OpenFiles(max_open=8, grace_seconds=3600)
    one, two = files.open("a", uris[0]), files.open("b", uris[1])
    files.drop(["a", "unknown"])
    assert files.counts() == (1, 1) and not _closed(one)
    files.close()
    assert _closed(one) and _closed(two, 1) and files.counts() == (0, 0)
