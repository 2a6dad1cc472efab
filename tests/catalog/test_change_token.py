"""Catalog.change_token: it differs after every kind of write, by anyone, and only then.

Tests taking ``catalog``/``populated``/``backend`` run against every backend
(see conftest); the SQLite and HBase specifics follow.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from collections.abc import Callable, Hashable
from contextlib import closing
from pathlib import Path

import pytest

from catalog import Catalog, Collection, Dataset, FileState, HBaseCatalog, SQLiteCatalog
from eventindex.errors import AlreadyExistsError, CatalogError
from eventindex.records.schema import RecordKind, TriggerMenu
from tests.catalog.conftest import AOD, EVENTS, Backend, populate
from tests.catalog.test_catalog_contract import tagfile

MENU = TriggerMenu(key=1, level="L1", bits={0: "L1_EM"})


def changes(catalog: Catalog, write: Callable[[], object]) -> bool:
    """Whether ``write`` changed the token (asserting that reading alone does not)."""
    before = catalog.change_token()
    assert catalog.change_token() == before, "a token read is not a change"
    write()
    return catalog.change_token() != before


def test_every_kind_of_write_changes_the_token(catalog: Catalog) -> None:
    assert isinstance(catalog.change_token(), Hashable)
    assert changes(
        catalog, lambda: catalog.create_collection(Collection(EVENTS, RecordKind.EVENTS))
    )
    assert changes(catalog, lambda: catalog.create_dataset(Dataset(AOD, EVENTS)))
    assert changes(catalog, lambda: catalog.add_tagfile(tagfile("w-1")))
    assert changes(catalog, lambda: catalog.commit_tagfile(tagfile("w-1")))
    assert changes(catalog, lambda: catalog.commit_tagfile(tagfile("n-1")))
    assert changes(catalog, lambda: catalog.commit_tagfiles([tagfile("b-1"), tagfile("b-2")]))
    # Compaction: a new file supersedes (and so retires) older ones.
    assert changes(catalog, lambda: catalog.commit_tagfile(tagfile("c-1", supersedes=("b-1",))))
    assert changes(catalog, lambda: catalog.retire_tagfiles(["n-1"]))
    assert changes(catalog, lambda: catalog.remove_tagfile("n-1"))
    assert changes(catalog, lambda: catalog.add_tagfile(tagfile("w-2")))
    assert changes(catalog, lambda: catalog.remove_tagfile("w-2"))
    assert changes(catalog, lambda: catalog.put_trigger_menu(MENU))
    # Entries registered already committed (what a copy or a Spark job does).
    assert changes(
        catalog, lambda: catalog.add_tagfiles([tagfile("a-1", state=FileState.COMMITTED)])
    )


def test_reading_never_changes_the_token(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("f-1", message_ids=("m1",), guids=("g1",)))
    populated.put_trigger_menu(MENU)
    token = populated.change_token()
    populated.list_collections()
    populated.list_datasets(EVENTS)
    populated.get_dataset(AOD)
    populated.list_tagfiles(collection=EVENTS, states=None)
    populated.list_tagfiles(first_key_range=(284484, 284484))
    populated.get_tagfile("f-1")
    populated.files_with_guid("g1")
    populated.absorbed_message_ids(["m1", "m2"])
    populated.list_trigger_menus()
    populated.get_trigger_menu(1, "L1")
    assert populated.change_token() == token


def test_a_refused_write_changes_nothing_visible(populated: Catalog) -> None:
    """The token may or may not move on a refused write; what readers list stays."""
    populated.commit_tagfile(tagfile("f-1"))
    listed = populated.list_tagfiles()
    with pytest.raises(AlreadyExistsError):
        populated.create_collection(Collection(EVENTS, RecordKind.EVENTS))
    with pytest.raises(CatalogError):
        populated.commit_tagfile(tagfile("f-1"))
    assert populated.list_tagfiles() == listed


def test_writes_through_another_catalog_object_change_the_token(backend: Backend) -> None:
    if not backend.persistent:
        pytest.skip("an in-memory SQLite catalog has one connection only")
    watcher = populate(backend.open())
    writer = backend.open()
    assert changes(watcher, lambda: writer.commit_tagfile(tagfile("f-1")))
    assert changes(watcher, lambda: writer.retire_tagfiles(["f-1"]))
    assert changes(
        watcher, lambda: writer.create_collection(Collection("other", RecordKind.EVENTS))
    )
    # And the other way round: the writer sees nothing it did not do as a change.
    token = writer.change_token()
    assert writer.change_token() == token


def test_threads_writing_through_one_catalog_change_the_token(populated: Catalog) -> None:
    before = populated.change_token()
    thread = threading.Thread(target=populated.commit_tagfile, args=(tagfile("t-1"),))
    thread.start()
    thread.join()
    assert populated.change_token() != before


# -- SQLite: other connections and processes ---------------------------------
def _commit_in_process(path: str, file_id: str) -> None:
    with SQLiteCatalog(path) as catalog:
        catalog.commit_tagfile(tagfile(file_id))


@pytest.fixture
def sqlite_path(tmp_path: Path) -> str:
    path = str(tmp_path / "catalog.sqlite")
    with SQLiteCatalog(path) as catalog:
        populate(catalog)
    return path


def test_sqlite_commits_of_another_process_change_the_token(sqlite_path: str) -> None:
    context = multiprocessing.get_context("spawn")
    with SQLiteCatalog(sqlite_path) as watcher:
        for number in range(3):
            before = watcher.change_token()
            process = context.Process(target=_commit_in_process, args=(sqlite_path, f"p-{number}"))
            process.start()
            process.join(timeout=120)
            assert process.exitcode == 0
            after = watcher.change_token()
            assert after != before, f"commit {number} of another process went unseen"
            assert watcher.change_token() == after
        assert len(watcher.list_tagfiles()) == 3


def test_sqlite_writes_of_any_client_change_the_token(sqlite_path: str) -> None:
    """No cooperation needed: a plain sqlite3 connection (the shell, older code) counts."""
    with SQLiteCatalog(sqlite_path) as watcher:
        before = watcher.change_token()
        with closing(sqlite3.connect(sqlite_path)) as raw, raw:
            raw.execute("UPDATE tagfiles SET state = 'retired' WHERE 0")  # a commit, no rows
            raw.execute("UPDATE datasets SET stream = 'x'")
        assert watcher.change_token() != before


def test_sqlite_a_rolled_back_write_leaves_listings_alone(sqlite_path: str) -> None:
    with SQLiteCatalog(sqlite_path) as watcher, SQLiteCatalog(sqlite_path) as writer:
        token = watcher.change_token()
        raw = sqlite3.connect(sqlite_path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("UPDATE datasets SET stream = 'x'")
            assert watcher.change_token() == token, "an open transaction is no change yet"
            raw.execute("ROLLBACK")
        finally:
            raw.close()
        assert watcher.change_token() == token
        writer.commit_tagfile(tagfile("f-1"))
        assert watcher.change_token() != token


# -- HBase: one counter cell --------------------------------------------------
def test_hbase_token_is_the_change_counter(mock_hbase: HBaseCatalog) -> None:
    counter = mock_hbase._tables["changes"]
    start = mock_hbase.change_token()
    assert isinstance(start, int) and start > 0, "populating wrote, and counted"
    mock_hbase.commit_tagfiles([tagfile("f-1"), tagfile("f-2")])
    assert mock_hbase.change_token() == start + 1, "one operation, one increment"
    counter.counter_inc(b"catalog", b"c:writes", 5)
    assert mock_hbase.change_token() == start + 6


def test_hbase_other_catalog_objects_share_the_counter(mock_hbase: HBaseCatalog) -> None:
    other = HBaseCatalog(mock_hbase._connection, table_prefix=mock_hbase.table_prefix)
    before = mock_hbase.change_token()
    other.commit_tagfile(tagfile("f-1"))
    assert mock_hbase.change_token() != before
    assert other.change_token() == mock_hbase.change_token()


def test_hbase_a_write_that_failed_part_way_still_counts(
    mock_hbase: HBaseCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit point was passed before the failure: readers must list again."""
    mock_hbase.commit_tagfile(tagfile("a-1"))
    put_many = mock_hbase._put_many

    def crash_on_retire(table: str, rows: object) -> None:
        if table == "tagfiles":
            raise OSError("region server went away")
        put_many(table, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(mock_hbase, "_put_many", crash_on_retire)
    before = mock_hbase.change_token()
    with pytest.raises(CatalogError):
        mock_hbase.commit_tagfile(tagfile("b", supersedes=("a-1",)))
    monkeypatch.undo()
    assert mock_hbase.change_token() != before
    assert [t.file_id for t in mock_hbase.list_tagfiles()] == ["b"]


def test_hbase_a_write_refused_before_writing_does_not_count(mock_hbase: HBaseCatalog) -> None:
    before = mock_hbase.change_token()
    with pytest.raises(AlreadyExistsError):
        mock_hbase.create_collection(Collection(EVENTS, RecordKind.EVENTS))
    mock_hbase.put_trigger_menu(MENU)
    token = mock_hbase.change_token()
    assert token == before + 1
    mock_hbase.put_trigger_menu(MENU)  # identical: a no-op
    assert mock_hbase.change_token() == token


def test_a_closed_catalog_has_no_token(backend: Backend) -> None:
    catalog = backend.open()
    catalog.close()
    with pytest.raises(CatalogError):
        catalog.change_token()


def test_sqlite_token_reads_do_not_wait_for_other_queries(sqlite_path: str) -> None:
    """A long listing holds the catalog's connection; the token has one of its own."""
    catalog = SQLiteCatalog(sqlite_path)
    try:
        tokens: list[object] = []
        with catalog._lock:  # what a long query on another thread holds
            reader = threading.Thread(target=lambda: tokens.append(catalog.change_token()))
            reader.start()
            reader.join(timeout=10)
            assert tokens, "the token read waited for the connection's lock"
    finally:
        catalog.close()
