"""Reader.pick: one logical record per event, with every copy attributed to its dataset."""

from __future__ import annotations

import fnmatch
import itertools
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalog import Catalog, Collection, Dataset
from eventindex.creator import create_generated
from eventindex.errors import CatalogError, NotFoundError
from eventindex.generator import GeneratorSpec
from eventindex.query import EventLocation, PickedEvent, Reader
from eventindex.records.schema import EVENT_SCHEMA, RecordKind
from eventindex.storage import MapFileReader
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
    cached = Reader(store.catalog, max_open_files=2, refresh_seconds=3600)
    fresh = Reader(store.catalog, refresh_seconds=0)
    try:
        first_event = keys_of(store, spec.first_run, "RAW")[0]
        assert cached.pick(spec.collection, spec.first_run, first_event) is not None
        later_run = spec.first_run + 1
        assert cached.pick(spec.collection, later_run, 1) is None
        assert fresh.pick(spec.collection, later_run, 1) is None

        longer = GeneratorSpec(runs=2, events_per_run=500)
        create_generated(longer, store.catalog, store.writer)
        store = replace(store, spec=longer)
        event_number = keys_of(store, later_run, "RAW")[-1]
        expected = expected_locations(store, later_run, event_number)
        picked = fresh.pick(spec.collection, later_run, event_number)
        assert picked is not None and locations(picked) == expected, "stale after 0 s"
        assert cached.pick(spec.collection, later_run, event_number) is None, "cached list"
        cached.refresh()
        picked = cached.pick(spec.collection, later_run, event_number)
        assert picked is not None and locations(picked) == expected
    finally:
        cached.close()
        fresh.close()
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


# -- keys that cannot exist ----------------------------------------------------------
@pytest.mark.parametrize(
    ("run_number", "event_number", "field"),
    [
        (-1, 1, "run_number"),
        (2**32, 1, "run_number"),
        (284484, -1, "event_number"),
        (284484, 2**64, "event_number"),
        (True, 1, "run_number"),
        (284484, "7", "event_number"),
    ],
)
def test_keys_outside_the_key_types_are_refused(
    store: GeneratedStore, reader: Reader, run_number: Any, event_number: Any, field: str
) -> None:
    collection = store.spec.collection
    with pytest.raises(ValueError, match=field):
        reader.pick(collection, run_number, event_number)
    with pytest.raises(ValueError, match=rf"keys\[1\]: {field}"):
        reader.lookup(collection, [(store.spec.first_run, 1), (run_number, event_number)])


def test_unknown_collection(reader: Reader) -> None:
    with pytest.raises(NotFoundError, match=r"mc16_13TeV\.nothing"):
        reader.pick("mc16_13TeV.nothing", 284484, 1)
    with pytest.raises(NotFoundError, match=r"mc16_13TeV\.nothing"):
        reader.lookup("mc16_13TeV.nothing", [(284484, 1)])
    with pytest.raises(NotFoundError, match=r"mc16_13TeV\.nothing"):
        reader.select("mc16_13TeV.nothing", run_min=0, run_max=1)


def test_default_collection(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=200)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        with Reader(store.catalog, refresh_seconds=0) as reader:
            assert reader.default_collection() == spec.collection
            store.catalog.create_collection(
                Collection("mc16_13TeV.physics_Main", RecordKind.EVENTS)
            )
            with pytest.raises(NotFoundError) as error:
                reader.default_collection()
            message = str(error.value)
            assert "2 event collections" in message
            assert spec.collection in message and "mc16_13TeV.physics_Main" in message
    finally:
        store.close()


# -- lookup ------------------------------------------------------------------------
def sample_keys(store: GeneratedStore, count: int, seed: int = 3) -> list[tuple[int, int]]:
    """Random existing events of every run, kept and skimmed, plus keys no dataset holds."""
    rng = random.Random(seed)
    keys = []
    for run_number in store.spec.run_numbers:
        events = keys_of(store, run_number, "RAW")
        keys += [(run_number, e) for e in rng.sample(events, count // len(store.spec.run_numbers))]
        keys += [(run_number, events[0] - 1), (run_number, events[-1] + 1)]
    keys += [(store.spec.run_numbers[-1] + 1, 1), (0, 0)]
    rng.shuffle(keys)
    return keys


def test_lookup_answers_in_order_with_none_for_missing_keys(
    store: GeneratedStore, reader: Reader, kept: tuple[int, int], skimmed: tuple[int, int]
) -> None:
    missing = (kept[0], keys_of(store, kept[0], "RAW")[0] - 1)
    keys = [skimmed, missing, kept, (2**32 - 1, 2**64 - 1), kept]
    answers = reader.lookup(store.spec.collection, keys)
    assert len(answers) == len(keys)
    assert answers[1] is None and answers[3] is None
    for key, answer in zip(keys, answers, strict=True):
        if answer is not None:
            assert (answer.run_number, answer.event_number) == key
            assert locations(answer) == expected_locations(store, *key)
    assert answers[2] == answers[4], "a key asked twice is answered twice"
    assert reader.lookup(store.spec.collection, []) == []


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"formats": ["AOD"]},
        {"dataset_pattern": "*.merge.AOD.*"},
        {"formats": ["RAW", "DAOD_PHYS"]},
    ],
    ids=["all", "formats", "pattern", "two formats"],
)
def test_lookup_equals_picks_one_by_one(
    store: GeneratedStore, reader: Reader, filters: dict[str, Any]
) -> None:
    keys = sample_keys(store, 120)
    answers = reader.lookup(store.spec.collection, keys, **filters)
    picks = [reader.pick(store.spec.collection, *key, **filters) for key in keys]
    assert answers == picks
    assert sum(a is not None for a in answers) >= 120


def test_lookup_reads_each_file_at_most_twice(store: GeneratedStore) -> None:
    """Once for the key index (cached), once for the payload: never once per key."""
    calls: Counter[str] = Counter()
    original = MapFileReader.get_many

    def counting(self: MapFileReader, *args: Any, **kwargs: Any) -> pa.Table:
        calls[self.uri] += 1
        return original(self, *args, **kwargs)

    keys = sample_keys(store, 600)
    with Reader(store.catalog) as fresh, pytest.MonkeyPatch.context() as patch:
        patch.setattr(MapFileReader, "get_many", counting)
        answers = fresh.lookup(store.spec.collection, keys)
    assert sum(a is not None for a in answers) == 600
    assert calls and max(calls.values()) <= 2


# -- the dataset graph saves reads -----------------------------------------------------
def test_a_derived_record_stands_for_its_upstream_copies(
    store: GeneratedStore, kept: tuple[int, int]
) -> None:
    """The DAOD record references its AOD and RAW copies: those files need no read."""
    read: list[str] = []
    original = MapFileReader.get

    def recording(self: MapFileReader, key: Any, columns: Any = None) -> Any:
        if columns is not None and "references" in columns:
            read.append(self.metadata["dataset"])
        return original(self, key, columns)

    with Reader(store.catalog) as fresh, pytest.MonkeyPatch.context() as patch:
        patch.setattr(MapFileReader, "get", recording)
        picked = fresh.pick(store.spec.collection, *kept)
    assert picked is not None
    assert locations(picked) == expected_locations(store, *kept)
    run_number = kept[0]
    assert sorted(read) == sorted(
        [store.dataset(run_number, "DAOD_PHYS"), store.dataset(run_number, "AOD", "r7562")]
    )


def test_a_derived_holder_spares_the_key_checks_of_its_upstream_datasets(
    store: GeneratedStore, kept: tuple[int, int]
) -> None:
    """Once the DAOD holds the key, its AOD and RAW need not even be asked for it."""
    checked: list[str] = []
    original = MapFileReader.get

    def recording(self: MapFileReader, key: Any, columns: Any = None) -> Any:
        if columns is not None and "references" not in columns:
            checked.append(self.metadata["dataset"])
        return original(self, key, columns)

    with Reader(store.catalog) as fresh, pytest.MonkeyPatch.context() as patch:
        patch.setattr(MapFileReader, "get", recording)
        picked = fresh.pick(store.spec.collection, *kept)
    assert picked is not None
    assert locations(picked) == expected_locations(store, *kept)
    run_number = kept[0]
    assert sorted(checked) == sorted(
        [store.dataset(run_number, "DAOD_PHYS"), store.dataset(run_number, "AOD", "r7562")]
    )


def test_records_without_upstream_references_make_the_upstream_files_read(
    tmp_path: Path,
) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=400)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        raw_name = store.dataset(spec.first_run, "RAW")
        aod_name = store.dataset(spec.first_run, "AOD", "r7562")
        bare = Dataset(
            name=aod_name.replace("physics_Main", "physics_Bare"),
            collection=spec.collection,
            format="AOD",
            processing_tag="r7562_p2521",
            upstream=raw_name,
        )
        store.catalog.create_dataset(bare)
        table = store.tables[aod_name]
        own_only = [
            [r for r in refs if r["format"] == "AOD"] for refs in table["references"].to_pylist()
        ]
        index = table.schema.get_field_index("references")
        table = table.set_column(
            index, table.schema.field(index), pa.array(own_only, table.schema.field(index).type)
        )
        store.writer.write(table, bare)
        event_number = table["event_number"][5].as_py()
        with Reader(store.catalog) as reader:
            picked = reader.pick(
                spec.collection, spec.first_run, event_number, dataset_pattern="*[BR][aA]*"
            )
            (answer,) = reader.lookup(
                spec.collection, [(spec.first_run, event_number)], dataset_pattern="*[BR][aA]*"
            )
        assert picked is not None and picked == answer
        assert sorted((loc.format, loc.dataset) for loc in picked.locations) == [
            ("AOD", bare.name),
            ("RAW", raw_name),
        ]
    finally:
        store.close()


# -- events of a file ----------------------------------------------------------------
def events_referencing(
    store: GeneratedStore, dataset: str, guid: str
) -> list[tuple[int, int, int]]:
    table = store.tables[dataset]
    found = set()
    for run_number, event_number, references in zip(
        table["run_number"].to_pylist(),
        table["event_number"].to_pylist(),
        table["references"].to_pylist(),
        strict=True,
    ):
        for reference in references:
            if reference["guid"] == guid:
                found.add((run_number, event_number, reference["position"]))
    return sorted(found, key=lambda e: (e[2], e[0], e[1]))


def own_guid(store: GeneratedStore, dataset: str, row: int = 0) -> str:
    fmt = store.datasets[dataset].format
    references = store.tables[dataset]["references"][row].as_py()
    return str(next(r["guid"] for r in references if r["format"] == fmt))


@pytest.mark.parametrize(
    ("fmt", "tag"), [("RAW", ""), ("AOD", "r7562"), ("AOD", "r9264"), ("DAOD_PHYS", "")]
)
def test_events_in_file(store: GeneratedStore, reader: Reader, fmt: str, tag: str) -> None:
    run_number = store.spec.run_numbers[-1]
    name = store.dataset(run_number, fmt, tag)
    guid = own_guid(store, name, row=store.tables[name].num_rows // 2)
    found = reader.events_in_file(guid)
    assert found is not None
    expected = events_referencing(store, name, guid)
    assert len(expected) > 1
    assert found.events == expected
    assert (found.guid, found.format, found.dataset) == (guid, fmt, name)
    assert found.processing_tag == store.datasets[name].processing_tag
    as_dict = found.to_dict()
    assert as_dict["count"] == len(expected)
    assert as_dict["events"][0] == dict(
        zip(("run_number", "event_number", "position"), expected[0], strict=True)
    )
    json.dumps(as_dict)


def test_events_in_file_unknown_guid(reader: Reader) -> None:
    assert reader.events_in_file("00000000-0000-0000-0000-000000000000") is None


def test_events_in_file_without_its_own_dataset(tmp_path: Path) -> None:
    """With the RAW dataset retired, the AOD records still say where every event is."""
    spec = GeneratorSpec(runs=1, events_per_run=900)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        raw_name = store.dataset(spec.first_run, "RAW")
        guid = own_guid(store, raw_name)
        store.catalog.retire_tagfiles(
            f.file_id for f in store.catalog.list_tagfiles(dataset=raw_name)
        )
        with Reader(store.catalog) as reader:
            found = reader.events_in_file(guid)
        assert found is not None
        assert found.events == events_referencing(store, raw_name, guid)
        assert (found.format, found.dataset) == ("RAW", raw_name), "attributed upstream"
    finally:
        store.close()


# -- select ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    """Datasets cut into several files each, so files of datasets interleave by key."""
    spec = GeneratorSpec(runs=2, events_per_run=1200)
    generated = GeneratedStore.create(tmp_path_factory.mktemp("split"), spec, file_rows=500)
    try:
        yield generated
    finally:
        generated.close()


def test_select_a_run_range(split_store: GeneratedStore) -> None:
    store = split_store
    run_numbers = list(store.spec.run_numbers)
    with Reader(store.catalog) as reader:
        rows = list(
            reader.select(store.spec.collection, run_min=run_numbers[0], run_max=run_numbers[-1])
        )
        (last_run,) = {
            r["run_number"]
            for r in reader.select(
                store.spec.collection, run_min=run_numbers[-1], run_max=run_numbers[-1]
            )
        }
    assert last_run == run_numbers[-1]
    names = sorted(store.tables)
    assert len(store.catalog.list_tagfiles()) > 2 * len(names), "several files per dataset"
    assert [r["dataset"] for r in rows] == [
        n for n in names for _ in range(store.tables[n].num_rows)
    ], "dataset by dataset, every row"
    for name in names:
        mine = [(r["run_number"], r["event_number"]) for r in rows if r["dataset"] == name]
        assert mine == sorted(mine), "in key order"
        assert [e for _, e in mine] == store.tables[name]["event_number"].to_pylist()
    first = rows[0]
    generated = store.tables[first["dataset"]].slice(0, 1).to_pylist()[0]
    assert first["l1_tbp"] == generated["l1_tbp"].hex()
    assert first["hlt_passed"] == generated["hlt_passed"].hex()
    assert first["references"] == generated["references"]
    assert list(first) == ["dataset", *EVENT_SCHEMA.names]
    json.loads(json.dumps(rows[:50]))


def test_select_bounds_limit_pattern_and_columns(store: GeneratedStore, reader: Reader) -> None:
    collection = store.spec.collection
    first_run = store.spec.first_run
    everything = sum(t.num_rows for t in store.tables.values())
    assert len(list(reader.select(collection, run_min=0, run_max=2**32 - 1))) == everything
    assert list(reader.select(collection, run_min=0, run_max=first_run - 1)) == []
    limited = list(reader.select(collection, run_min=0, run_max=2**32 - 1, limit=1500))
    assert len(limited) == 1500
    assert list(reader.select(collection, run_min=0, run_max=2**32 - 1, limit=0)) == []
    raw = list(
        reader.select(
            collection,
            run_min=first_run,
            run_max=first_run,
            dataset_pattern="*.daq.RAW",
            columns=["lumi_block", "l1_tav"],
        )
    )
    table = store.tables[store.dataset(first_run, "RAW")]
    assert len(raw) == table.num_rows
    assert list(raw[0]) == ["dataset", "run_number", "event_number", "lumi_block", "l1_tav"]
    assert [r["l1_tav"] for r in raw] == [m.hex() for m in table["l1_tav"].to_pylist()]
    assert all(r["l1_tav"] == r["l1_tav"].lower() for r in raw[:10])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"run_min": 5, "run_max": 4}, "above run_max"),
        ({"run_min": -1, "run_max": 4}, "run_min"),
        ({"run_min": 0, "run_max": 2**32}, "run_max"),
        ({"run_min": 0, "run_max": 1, "limit": -1}, "limit"),
        ({"run_min": 0, "run_max": 1, "columns": ["lumi_block", "nope"]}, "nope"),
    ],
)
def test_select_refuses_bad_arguments_before_streaming(
    store: GeneratedStore, reader: Reader, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        reader.select(store.spec.collection, **arguments)


# -- the cached file list ------------------------------------------------------------
class CountingCatalog:
    """Delegates to a catalog and counts the calls, to see what reaches the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        self.calls[name] += 1
        return getattr(self.catalog, name)


def test_warm_picks_never_ask_the_catalog(
    store: GeneratedStore, kept: tuple[int, int], skimmed: tuple[int, int]
) -> None:
    counting = CountingCatalog(store.catalog)
    with Reader(cast(Catalog, counting), refresh_seconds=3600) as reader:
        collection = store.spec.collection
        assert reader.pick(collection, *kept) is not None
        counting.calls.clear()
        for key in [kept, skimmed, (kept[0], 1), *sample_keys(store, 40)]:
            reader.pick(collection, *key)
        reader.lookup(collection, sample_keys(store, 40))
        assert counting.calls == Counter()
        stats = reader.stats()
        assert stats["catalog_refreshes"] == 1
        assert stats["picks_served"] >= 44
        assert stats["lookups_served"] == 1
        assert stats["open_files"] == len(store.tables)
        assert all(isinstance(v, int) for v in stats.values())


def test_retired_files_drop_out_at_refresh(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=600)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        reader = Reader(store.catalog, refresh_seconds=3600)
        reader.retired_grace_seconds = 0
        run_number = spec.first_run
        event_number = keys_of(store, run_number, "AOD")[7]
        picked = reader.pick(spec.collection, run_number, event_number)
        assert picked is not None
        assert "AOD" in {loc.format for loc in picked.locations}
        aod = store.dataset(run_number, "AOD", "r9264")
        retired = [f.file_id for f in store.catalog.list_tagfiles(dataset=aod)]
        store.catalog.retire_tagfiles(retired)
        open_before = reader.stats()["open_files"]
        reader.refresh()
        picked = reader.pick(spec.collection, run_number, event_number)
        assert picked is not None
        datasets = {loc.dataset for loc in picked.locations}
        assert aod not in datasets, "the retired dataset is gone"
        assert store.dataset(run_number, "AOD", "r7562") in datasets
        stats = reader.stats()
        assert stats["open_files"] == open_before - len(retired)
        assert stats["retired_files_open"] == 0, "closed once the grace period is over"
        assert stats["catalog_refreshes"] == 2
        reader.close()
    finally:
        store.close()


def test_readers_of_retired_files_stay_open_for_the_grace_period(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=300)
    store = GeneratedStore.create(tmp_path, spec)
    try:
        with Reader(store.catalog, refresh_seconds=3600) as reader:
            event_number = keys_of(store, spec.first_run, "RAW")[0]
            assert reader.pick(spec.collection, spec.first_run, event_number) is not None
            store.catalog.retire_tagfiles(f.file_id for f in store.catalog.list_tagfiles())
            reader.refresh()
            assert reader.stats()["retired_files_open"] > 0
            assert reader.pick(spec.collection, spec.first_run, event_number) is None
        assert reader.stats()["retired_files_open"] == 0, "close() closes them all"
    finally:
        store.close()


class FailingCatalog(CountingCatalog):
    """A catalog that went down after the Reader's first look."""

    down = False

    def __getattr__(self, name: str) -> Any:
        if self.down and name in ("list_tagfiles", "list_datasets", "list_collections"):
            raise CatalogError("catalog is down")
        return super().__getattr__(name)


def test_picks_survive_a_catalog_outage(store: GeneratedStore, kept: tuple[int, int]) -> None:
    failing = FailingCatalog(store.catalog)
    with Reader(cast(Catalog, failing), refresh_seconds=0) as reader:
        expected = reader.pick(store.spec.collection, *kept)
        assert expected is not None
        failing.down = True
        assert reader.pick(store.spec.collection, *kept) == expected, "the old list answers"
        with pytest.raises(CatalogError):
            reader.refresh()
        failing.down = False
        reader.refresh()
        assert reader.pick(store.spec.collection, *kept) == expected
