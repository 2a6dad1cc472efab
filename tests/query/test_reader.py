"""Reader.pick: one logical record per event, with every copy attributed to its dataset."""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalog import Dataset
from eventindex.creator import create_generated
from eventindex.generator import GeneratorSpec
from eventindex.query import EventLocation, PickedEvent, Reader
from tests.generated_store import GeneratedStore

Location = tuple[str, str, int, str, str]  # format, guid, position, dataset, processing tag


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("reader"))
    try:
        yield generated
    finally:
        generated.close()


@pytest.fixture
def reader(store: GeneratedStore) -> Iterator[Reader]:
    opened = Reader(store.catalog)
    try:
        yield opened
    finally:
        opened.close()


def row_of(table: pa.Table, run_number: int, event_number: int) -> dict[str, Any] | None:
    mask = pc.and_(
        pc.equal(table["run_number"], run_number), pc.equal(table["event_number"], event_number)
    )
    rows = table.filter(mask).to_pylist()
    assert len(rows) <= 1
    return rows[0] if rows else None


def expected_locations(store: GeneratedStore, run_number: int, event_number: int) -> set[Location]:
    """Each dataset that holds the event contributes its own copy (its format's reference)."""
    found = set()
    for name, table in store.tables.items():
        dataset: Dataset = store.datasets[name]
        row = row_of(table, run_number, event_number)
        if row is None:
            continue
        (own,) = [r for r in row["references"] if r["format"] == dataset.format]
        found.add((own["format"], own["guid"], own["position"], name, dataset.processing_tag))
    return found


def locations(picked: PickedEvent) -> set[Location]:
    return {
        (loc.format, loc.guid, loc.position, loc.dataset, loc.processing_tag)
        for loc in picked.locations
    }


def keys_of(store: GeneratedStore, run_number: int, fmt: str) -> list[int]:
    table = store.tables[store.dataset(run_number, fmt)]
    return sorted(table["event_number"].to_pylist())


@pytest.fixture(scope="module")
def kept(store: GeneratedStore) -> tuple[int, int]:
    """An event of the first run that the derivation kept."""
    run_number = store.spec.first_run
    daod = keys_of(store, run_number, "DAOD_PHYS")
    return run_number, daod[len(daod) // 2]


@pytest.fixture(scope="module")
def skimmed(store: GeneratedStore) -> tuple[int, int]:
    """An event of the last run that the derivation dropped."""
    run_number = store.spec.run_numbers[-1]
    daod = set(keys_of(store, run_number, "DAOD_PHYS"))
    return run_number, next(e for e in keys_of(store, run_number, "RAW") if e not in daod)


def test_pick_kept_event(store: GeneratedStore, reader: Reader, kept: tuple[int, int]) -> None:
    run_number, event_number = kept
    picked = reader.pick(store.spec.collection, run_number, event_number)
    assert picked is not None
    assert (picked.collection, picked.run_number, picked.event_number) == (
        store.spec.collection,
        run_number,
        event_number,
    )
    raw = row_of(store.tables[store.dataset(run_number, "RAW")], run_number, event_number)
    assert raw is not None
    for name in ("lumi_block", "timestamp", "timestamp_ns", "bcid", "lvl1_id", "smk", "hltpsk"):
        assert picked.attributes[name] == raw[name], name
    assert "references" not in picked.attributes

    expected = expected_locations(store, run_number, event_number)
    assert locations(picked) == expected
    by_format: dict[str, list[EventLocation]] = {}
    for loc in picked.locations:
        by_format.setdefault(loc.format, []).append(loc)
    assert sorted(by_format) == ["AOD", "DAOD_PHYS", "RAW"]
    (raw_location,) = by_format["RAW"]
    assert raw_location.dataset == store.dataset(run_number, "RAW")
    assert raw_location.processing_tag == ""
    assert {(loc.dataset, loc.processing_tag) for loc in by_format["AOD"]} == {
        (store.dataset(run_number, "AOD", "r7562"), "r7562_p2521"),
        (store.dataset(run_number, "AOD", "r9264"), "r9264_p3083"),
    }
    (daod,) = by_format["DAOD_PHYS"]
    assert daod.processing_tag == "r9264_p3083_p4355"
    # Sorted by format, then dataset: stable output for people and diffs.
    assert picked.locations == sorted(
        picked.locations, key=lambda loc: (loc.format, loc.dataset, loc.guid)
    )


def test_pick_event_dropped_by_the_derivation(
    store: GeneratedStore, reader: Reader, skimmed: tuple[int, int]
) -> None:
    picked = reader.pick(store.spec.collection, *skimmed)
    assert picked is not None
    assert locations(picked) == expected_locations(store, *skimmed)
    assert sorted(loc.format for loc in picked.locations) == ["AOD", "AOD", "RAW"]


def test_to_dict(store: GeneratedStore, reader: Reader, kept: tuple[int, int]) -> None:
    picked = reader.pick(store.spec.collection, *kept)
    assert picked is not None
    as_dict = picked.to_dict()
    assert as_dict["run_number"], as_dict["event_number"] == kept
    assert len(as_dict["locations"]) == 4
    assert set(as_dict["locations"][0]) == {
        "dataset",
        "format",
        "processing_tag",
        "guid",
        "position",
    }


def test_formats_filter(store: GeneratedStore, reader: Reader, kept: tuple[int, int]) -> None:
    collection = store.spec.collection
    raw = reader.pick(collection, *kept, formats=["RAW"])
    assert raw is not None
    assert [loc.format for loc in raw.locations] == ["RAW"]
    both = reader.pick(collection, *kept, formats=["AOD", "DAOD_PHYS"])
    assert both is not None
    assert sorted(loc.format for loc in both.locations) == ["AOD", "AOD", "DAOD_PHYS"]
    none = reader.pick(collection, *kept, formats=["ESD"])
    assert none is not None and none.locations == [], "the event exists, in no such format"


@pytest.mark.parametrize(
    ("pattern", "formats"),
    [
        ("*.merge.AOD.r7562_p2521", ["AOD"]),
        ("*.merge.AOD.*", ["AOD", "AOD"]),
        ("*.daq.RAW", ["RAW"]),
        ("*DAOD*", ["DAOD_PHYS"]),
    ],
)
def test_dataset_pattern_filter(
    store: GeneratedStore,
    reader: Reader,
    kept: tuple[int, int],
    pattern: str,
    formats: list[str],
) -> None:
    picked = reader.pick(store.spec.collection, *kept, dataset_pattern=pattern)
    assert picked is not None
    assert sorted(loc.format for loc in picked.locations) == formats
    assert all(fnmatch.fnmatchcase(loc.dataset, pattern) for loc in picked.locations)


def test_dataset_pattern_that_matches_nothing(
    store: GeneratedStore, reader: Reader, kept: tuple[int, int]
) -> None:
    assert reader.pick(store.spec.collection, *kept, dataset_pattern="mc16_*") is None


def test_missing_events(store: GeneratedStore, reader: Reader) -> None:
    collection = store.spec.collection
    first_run, last_run = store.spec.run_numbers[0], store.spec.run_numbers[-1]
    events = keys_of(store, first_run, "RAW")
    gap = next(a + 1 for a, b in itertools.pairwise(events) if b > a + 1)
    assert reader.pick(collection, first_run, gap) is None
    assert reader.pick(collection, first_run, events[0] - 1) is None
    assert reader.pick(collection, first_run, events[-1] + 1) is None
    assert reader.pick(collection, last_run + 1, events[0]) is None
    assert reader.pick(collection, 0, events[0]) is None
    assert reader.pick(collection, first_run, 2**64 - 1) is None
    assert reader.pick(collection, 2**32 - 1, 0) is None


def test_event_numbers_above_2_to_the_32(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=2, events_per_run=600, large_event_numbers=True)
    store = GeneratedStore.create(tmp_path, spec)
    reader = Reader(store.catalog)
    try:
        large = [
            (run_number, event_number)
            for run_number in spec.run_numbers
            for event_number in keys_of(store, run_number, "RAW")
            if event_number > 2**32
        ]
        assert large, "the spec gives some runs event numbers above 2**32"
        for run_number, event_number in (large[0], large[-1]):
            picked = reader.pick(spec.collection, run_number, event_number)
            assert picked is not None
            assert picked.event_number == event_number
            assert locations(picked) == expected_locations(store, run_number, event_number)
        run_number, event_number = large[0]
        assert reader.pick(spec.collection, run_number, event_number - 2**32) is None
    finally:
        reader.close()
        store.close()


def test_picks_see_files_committed_after_the_reader_opened(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=500)
    store = GeneratedStore.create(tmp_path, spec)
    reader = Reader(store.catalog, max_open_files=2)
    try:
        first_event = keys_of(store, spec.first_run, "RAW")[0]
        assert reader.pick(spec.collection, spec.first_run, first_event) is not None
        later_run = spec.first_run + 1
        assert reader.pick(spec.collection, later_run, 1) is None

        longer = GeneratorSpec(runs=2, events_per_run=500)
        create_generated(longer, store.catalog, store.writer)
        store = replace(store, spec=longer)
        event_number = keys_of(store, later_run, "RAW")[-1]
        picked = reader.pick(spec.collection, later_run, event_number)
        assert picked is not None
        assert locations(picked) == expected_locations(store, later_run, event_number)
    finally:
        reader.close()
        store.close()


def test_upstream_dataset_missing_from_the_catalog(tmp_path: Path) -> None:
    """A dataset whose upstream was never registered: its own copy is still attributed."""
    spec = GeneratorSpec(runs=1, events_per_run=400)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        aod_name = store.dataset(spec.first_run, "AOD", "r7562")
        orphan = Dataset(
            name=aod_name.replace("physics_Main", "physics_Late"),
            collection=spec.collection,
            format="AOD",
            processing_tag="r7562_p2521",
            upstream="data15_13TeV.never.registered.RAW",
        )
        store.catalog.create_dataset(orphan)
        table = store.tables[aod_name]
        store.writer.write(table, orphan)
        event_number = table["event_number"][0].as_py()
        with Reader(store.catalog) as reader:
            picked = reader.pick(
                spec.collection, spec.first_run, event_number, dataset_pattern="*physics_Late*"
            )
        assert picked is not None
        assert [(loc.format, loc.dataset) for loc in picked.locations] == [("AOD", orphan.name)]
    finally:
        store.close()


def test_location_is_a_value() -> None:
    location = EventLocation("d", "RAW", "", "guid", 3)
    assert location == EventLocation("d", "RAW", "", "guid", 3)
    assert {location: 1}[EventLocation("d", "RAW", "", "guid", 3)] == 1
