"""Query engines watch the catalog's change token: new files show within about a second,
unchanged catalogs are never listed again, and picks never wait for a listing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from catalog import Catalog, Collection, SQLiteCatalog
from eventindex.creator import create_generated
from eventindex.generator import GeneratorSpec
from eventindex.query import Reader
from eventindex.query.objects import ObjectCatalogs
from eventindex.query.triggers import TriggerIndex
from eventindex.records.schema import RecordKind
from tests.generated_store import GeneratedStore
from tests.spatial.partition_data import object_table, partition

SPEC = GeneratorSpec(runs=1, events_per_run=300)
LONGER = GeneratorSpec(runs=2, events_per_run=300)
LATER_RUN = SPEC.first_run + 1
# "About a second": the Reader asks every second, lists in milliseconds here.
VISIBLE_WITHIN_S = 2.5


class WatchedCatalog:
    """Delegates to a catalog, counting its calls; ``delay`` slows listings down."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.calls: Counter[str] = Counter()
        self.delay = 0.0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.catalog, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            if name.startswith("list_") and self.delay:
                time.sleep(self.delay)
            return attribute(*args, **kwargs)

        return call

    def listings(self) -> int:
        return sum(n for name, n in self.calls.items() if name.startswith("list_"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path, SPEC)
    try:
        yield generated
    finally:
        generated.close()


def later_event(store: GeneratedStore) -> int:
    """An event of the run that ``LONGER`` adds."""
    longer = replace(store, spec=LONGER)
    return int(longer.tables[longer.dataset(LATER_RUN, "RAW")]["event_number"][0].as_py())


def wait_for_pick(reader: Reader, event_number: int, within: float) -> float:
    """Seconds until a pick finds the event (picks every 10 ms); fails after ``within``."""
    started = time.monotonic()
    while reader.pick(SPEC.collection, LATER_RUN, event_number) is None:
        elapsed = time.monotonic() - started
        assert elapsed < within, f"the new files were not visible after {elapsed:.1f} s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_files_committed_by_another_connection_show_within_seconds(
    store: GeneratedStore,
) -> None:
    """What the web service sees of the consumers' commits: no refresh() needed, even
    from a catalog slow to list (0.15 s here: it was listed once per 15 s before)."""
    watching = SQLiteCatalog(str(store.catalog_path))  # the service's own connection
    slow = WatchedCatalog(watching)
    slow.delay = 0.05
    try:
        with Reader(cast(Catalog, slow)) as reader:  # the default refresh_seconds: 1
            assert reader.pick(SPEC.collection, LATER_RUN, 1) is None
            create_generated(LONGER, store.catalog, store.writer)
            wait_for_pick(reader, later_event(store), VISIBLE_WITHIN_S)
            assert reader.stats()["catalog_refreshes"] >= 2
    finally:
        watching.close()


def test_an_unchanged_catalog_is_checked_but_not_listed(store: GeneratedStore) -> None:
    watched = WatchedCatalog(store.catalog)
    with Reader(cast(Catalog, watched), refresh_seconds=0.02) as reader:
        kept = (SPEC.first_run, int(next(iter(store.tables.values()))["event_number"][0].as_py()))
        assert reader.pick(SPEC.collection, *kept) is not None
        listed = watched.listings()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            reader.pick(SPEC.collection, *kept)
            time.sleep(0.005)
        assert watched.listings() == listed, "nothing changed, nothing listed"
        assert watched.calls["change_token"] >= 5, "the token was asked all along"
        stats = reader.stats()
        assert stats["catalog_refreshes"] == 1 and stats["catalog_checks"] >= 5

        # One change: listed again, once.
        store.catalog.create_collection(Collection("unrelated", RecordKind.EVENTS))
        deadline = time.monotonic() + VISIBLE_WITHIN_S
        while reader.stats()["catalog_refreshes"] < 2:
            assert time.monotonic() < deadline, "the change went unseen"
            reader.pick(SPEC.collection, *kept)
            time.sleep(0.005)
        time.sleep(0.2)
        reader.pick(SPEC.collection, *kept)
        time.sleep(0.1)
        assert reader.stats()["catalog_refreshes"] == 2


def test_refresh_seconds_zero_checks_on_every_pick_and_lists_on_change(
    store: GeneratedStore,
) -> None:
    watched = WatchedCatalog(store.catalog)
    with Reader(cast(Catalog, watched), refresh_seconds=0) as reader:
        assert reader.pick(SPEC.collection, LATER_RUN, 1) is None
        listed = watched.listings()
        for _ in range(5):
            assert reader.pick(SPEC.collection, LATER_RUN, 1) is None
        assert watched.listings() == listed
        create_generated(LONGER, store.catalog, store.writer)
        # Before answering: the very next pick sees it.
        assert reader.pick(SPEC.collection, LATER_RUN, later_event(store)) is not None


def test_picks_never_wait_for_a_listing(store: GeneratedStore) -> None:
    """Listings run on a background thread while the old list answers."""
    watched = WatchedCatalog(store.catalog)
    with Reader(cast(Catalog, watched), refresh_seconds=0.02) as reader:
        kept = (SPEC.first_run, int(next(iter(store.tables.values()))["event_number"][0].as_py()))
        assert reader.pick(SPEC.collection, *kept) is not None
        watched.delay = 0.4  # every listing call: a listing takes well over a second
        create_generated(LONGER, store.catalog, store.writer)
        slowest = 0.0
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            before = time.perf_counter()
            assert reader.pick(SPEC.collection, *kept) is not None
            slowest = max(slowest, time.perf_counter() - before)
            time.sleep(0.005)
        assert slowest < 0.3, f"a pick waited {slowest:.2f} s"
        assert watched.listings() > 0
        watched.delay = 0.0
        wait_for_pick(reader, later_event(store), 10.0)


def test_explicit_refresh_still_lists_at_once(store: GeneratedStore) -> None:
    with Reader(store.catalog, refresh_seconds=3600) as reader:
        assert reader.pick(SPEC.collection, LATER_RUN, 1) is None
        create_generated(LONGER, store.catalog, store.writer)
        assert reader.pick(SPEC.collection, LATER_RUN, later_event(store)) is None
        reader.refresh()
        assert reader.pick(SPEC.collection, LATER_RUN, later_event(store)) is not None


def test_trigger_counts_list_the_catalog_only_when_it_changed(store: GeneratedStore) -> None:
    watched = WatchedCatalog(store.catalog)
    index = TriggerIndex(cast(Catalog, watched), refresh_seconds=0.0)
    menu = next(m for m in store.catalog.list_trigger_menus() if m.level == "HLT")
    expression = next(iter(menu.bits.values()))
    first = index.count(expression, dataset="*.daq.RAW")
    listed = watched.calls["list_tagfiles"]
    assert index.count(expression, dataset="*.daq.RAW").passed == first.passed
    assert watched.calls["list_tagfiles"] == listed, "unchanged: the file list is kept"
    create_generated(LONGER, store.catalog, store.writer)
    after = index.count(expression, dataset="*.daq.RAW")
    assert watched.calls["list_tagfiles"] > listed
    assert set(after.runs) == {SPEC.first_run, LATER_RUN}


def test_object_tables_are_reopened_only_when_the_catalog_changed(tmp_path: Path) -> None:
    done = partition(tmp_path, object_table(2000))
    try:
        tables = ObjectCatalogs(done.catalog, refresh_seconds=0.0)
        first = tables.table("sky")
        assert tables.table("sky") is first, "unchanged: the open table is kept"
        done.catalog.create_collection(Collection("unrelated", RecordKind.EVENTS))
        second = tables.table("sky")
        assert second is not first
        assert second.rows == first.rows
        tables.close()
    finally:
        done.catalog.close()


def test_tokens_are_hashable(store: GeneratedStore) -> None:
    assert isinstance(store.catalog.change_token(), Hashable)
