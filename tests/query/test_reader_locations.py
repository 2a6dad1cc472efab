"""The Reader over locations files: the same answers as from the map-files, with no Parquet
decoded, and the map-files still answering for files that have none (yet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from catalog.model import FileKind
from catalog.verify import verify_catalog
from eventindex.creator import create_generated
from eventindex.generator import GeneratorSpec
from eventindex.query import Reader
from eventindex.storage import MapFileReader
from eventindex.storage.locations import LocationIndex
from spark_jobs.locations import locations_files, plan_locations, run_locations
from tests.generated_store import GeneratedStore
from tests.query.test_reader import (
    events_referencing,
    expected_locations,
    keys_of,
    locations,
    own_guid,
    sample_keys,
)


def describe(store: GeneratedStore, *, rebuild: bool = False) -> int:
    """Run the locations job in this process; how many files it wrote."""
    tasks, _ = plan_locations(store.catalog, str(store.root), rebuild=rebuild)
    return run_locations(store.catalog, tasks).files


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("located"))
    describe(generated)
    try:
        yield generated
    finally:
        generated.close()


@pytest.mark.parametrize(
    "filters",
    [{}, {"formats": ["AOD"]}, {"dataset_pattern": "*.merge.AOD.*"}, {"formats": ["RAW"]}],
    ids=["all", "formats", "pattern", "raw"],
)
def test_picks_and_lookups_equal_the_map_files_answers(
    store: GeneratedStore, filters: dict[str, Any]
) -> None:
    keys = sample_keys(store, 200)
    collection = store.spec.collection
    with Reader(store.catalog) as located, Reader(store.catalog, use_locations=False) as plain:
        assert located.located(collection) and not plain.located(collection)
        picks = [located.pick(collection, *key, **filters) for key in keys]
        assert picks == [plain.pick(collection, *key, **filters) for key in keys]
        assert located.lookup(collection, keys, **filters) == picks
        assert sum(p is not None for p in picks) >= 200
        stats = located.stats()
        assert stats["locations_reads"] > 0 and stats["mapfile_reads"] == 0
        assert stats["open_files"] == 0, "no map-file was opened"
        assert stats["open_locations_files"] > 0
        assert plain.stats()["locations_reads"] == 0


def test_no_parquet_is_read(store: GeneratedStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a map-file was opened")

    monkeypatch.setattr(MapFileReader, "__init__", refuse)
    keys = sample_keys(store, 50)
    with Reader(store.catalog) as reader:
        for key in keys:
            picked = reader.pick(store.spec.collection, *key)
            if picked is not None:
                assert locations(picked) == expected_locations(store, *key)
        reader.lookup(store.spec.collection, keys)


def test_a_lookup_asks_for_every_files_pages_before_reading_any(
    store: GeneratedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold, the reads of all files then overlap: the batch waits for the disk once per
    stage (keys, records, references), not once per file."""
    calls: list[tuple[str, bool]] = []
    for name in ("prefetch_keys", "prefetch_rows", "prefetch_references"):
        real = getattr(LocationIndex, name)

        def asked(self: LocationIndex, *args: Any, _real: Any = real, _name: str = name) -> None:
            calls.append((_name, False))
            _real(self, *args)

        monkeypatch.setattr(LocationIndex, name, asked)
    for name in ("find_many", "references_many"):
        real = getattr(LocationIndex, name)

        def read(
            self: LocationIndex, *args: Any, _real: Any = real, _name: str = name, **kwargs: Any
        ) -> Any:
            calls.append((_name, bool(kwargs.get("prefetched"))))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(LocationIndex, name, read)
    keys = sample_keys(store, 100)
    with Reader(store.catalog) as reader:
        assert reader.located(store.spec.collection)
        answers = reader.lookup(store.spec.collection, keys)
    assert sum(a is not None for a in answers) >= 100
    names = [name for name, _ in calls]
    assert all(prefetched for name, prefetched in calls if not name.startswith("prefetch"))
    stages = ["prefetch_keys", "find_many", "prefetch_rows", "prefetch_references"]
    last = 0
    for stage in stages:  # each stage for every file before the next stage begins
        first = names.index(stage)
        assert first >= last
        last = len(names) - names[::-1].index(stage)
    assert names.count("references_many") == names.count("prefetch_references") > 1
    assert min(i for i, n in enumerate(names) if n == "references_many") >= last


def test_verify_accepts_locations_files(store: GeneratedStore) -> None:
    report = verify_catalog(store.catalog, str(store.root))
    assert report.ok(), report.to_text()
    masters = store.catalog.list_tagfiles(kinds=[FileKind.MASTER])
    assert report.files_checked == 2 * len(masters)


def test_files_added_later_answer_through_their_map_files(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=500)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        assert describe(store) == len(store.tables)
        longer = GeneratorSpec(runs=2, events_per_run=500)
        create_generated(longer, store.catalog, store.writer)
        store = replace(store, spec=longer)
        later_run = spec.first_run + 1
        event_number = keys_of(store, later_run, "RAW")[3]
        with Reader(store.catalog, refresh_seconds=0) as reader:
            picked = reader.pick(longer.collection, later_run, event_number)
            assert picked is not None
            assert locations(picked) == expected_locations(store, later_run, event_number)
            assert not reader.located(longer.collection)
            assert reader.stats()["mapfile_reads"] > 0
            tasks, skipped = plan_locations(store.catalog, str(store.root))
            assert (len(tasks), skipped) == (len(store.tables) // 2, len(store.tables) // 2)
            run_locations(store.catalog, tasks)
            assert reader.located(longer.collection)
            assert reader.pick(longer.collection, later_run, event_number) == picked
    finally:
        store.close()


def test_a_rebuild_supersedes_and_a_damaged_file_is_passed_over(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=400)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        describe(store)
        first = {e.file_id for entries in locations_files(store.catalog).values() for e in entries}
        assert describe(store, rebuild=True) == len(store.tables)
        current = locations_files(store.catalog)
        assert all(len(entries) == 1 for entries in current.values())
        assert not first & {e.file_id for entries in current.values() for e in entries}

        event_number = keys_of(store, spec.first_run, "AOD")[5]
        with Reader(store.catalog, use_locations=False) as plain:
            expected = plain.pick(spec.collection, spec.first_run, event_number)
        damaged = next(iter(current.values()))[0]
        Path(damaged.uri).write_bytes(b"not a locations file")
        with Reader(store.catalog) as reader:
            assert reader.pick(spec.collection, spec.first_run, event_number) == expected
            assert not reader.located(spec.collection)
    finally:
        store.close()


def test_retired_masters_drop_their_locations_files(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=300)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        describe(store)
        # The derived dataset: no other record references its copies.
        daod = store.dataset(spec.first_run, "DAOD_PHYS")
        event_number = keys_of(store, spec.first_run, "DAOD_PHYS")[2]
        with Reader(store.catalog, refresh_seconds=3600) as reader:
            reader.retired_grace_seconds = 0
            before = reader.pick(spec.collection, spec.first_run, event_number)
            assert before is not None and daod in {loc.dataset for loc in before.locations}
            assert reader.located(spec.collection)  # opens every locations file
            opened = reader.stats()["open_locations_files"]
            assert opened == len(store.tables)
            store.catalog.retire_tagfiles(
                f.file_id
                for f in store.catalog.list_tagfiles(dataset=daod, kinds=[FileKind.MASTER])
            )
            reader.refresh()
            after = reader.pick(spec.collection, spec.first_run, event_number)
            assert after is not None and daod not in {loc.dataset for loc in after.locations}
            assert reader.stats()["open_locations_files"] == opened - 1
            assert reader.located(spec.collection)
    finally:
        store.close()


def test_the_command_builds_and_then_skips(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=300)
    store = GeneratedStore.create(tmp_path, spec)
    store.close()
    command = [
        str(Path(sys.executable).parent / "eventindex"),
        "--store",
        str(store.root),
        "--catalog",
        str(store.catalog_path),
        "spark",
        "locations",
        "--local",
        "--output",
        "json",
    ]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EVENTINDEX_")}
    first = json.loads(subprocess.run(command, check=True, capture_output=True, env=environ).stdout)
    assert first["files"] == len(store.tables) and first["rows"] > 0
    again = json.loads(subprocess.run(command, check=True, capture_output=True, env=environ).stdout)
    assert (again["files"], again["skipped_already_built"]) == (0, len(store.tables))


def test_a_stale_file_list_is_refreshed_in_the_background(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=300)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        with Reader(store.catalog, refresh_seconds=0.05) as reader:
            later_run = spec.first_run + 1
            assert reader.pick(spec.collection, later_run, 1) is None
            longer = GeneratorSpec(runs=2, events_per_run=300)
            create_generated(longer, store.catalog, store.writer)
            event_number = keys_of(replace(store, spec=longer), later_run, "RAW")[0]
            deadline = time.monotonic() + 30
            while reader.pick(spec.collection, later_run, event_number) is None:
                assert time.monotonic() < deadline, "the new files never became visible"
                time.sleep(0.02)
            assert reader.stats()["catalog_refreshes"] >= 2
    finally:
        store.close()


@pytest.mark.parametrize(
    ("fmt", "tag"), [("RAW", ""), ("AOD", "r7562"), ("AOD", "r9264"), ("DAOD_PHYS", "")]
)
def test_events_in_file_from_locations(store: GeneratedStore, fmt: str, tag: str) -> None:
    name = store.dataset(store.spec.run_numbers[-1], fmt, tag)
    guid = own_guid(store, name, row=store.tables[name].num_rows // 3)
    with Reader(store.catalog) as located, Reader(store.catalog, use_locations=False) as plain:
        found = located.events_in_file(guid)
        assert found is not None and found == plain.events_in_file(guid)
        assert found.events == events_referencing(store, name, guid)
        assert located.stats()["mapfile_reads"] == 0 and located.stats()["open_files"] == 0
