"""The catalog contract: one behaviour suite that every backend must pass.

Tests taking the ``catalog``/``populated`` fixtures run against every backend
(see conftest). The tests at the end cover what is backend-specific: loading
from settings, the missing driver, several processes sharing one SQLite file,
and HBase's crash windows.
"""

from __future__ import annotations

import multiprocessing
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from catalog import (
    Catalog,
    Collection,
    Dataset,
    FileKind,
    FileState,
    HBaseCatalog,
    SQLiteCatalog,
    SupersededError,
    TagFile,
    load_catalog,
)
from catalog.hbase import INTENT_SECONDS
from eventindex.config import CatalogSettings
from eventindex.errors import (
    AlreadyExistsError,
    CatalogError,
    ConfigError,
    MissingExtraError,
    NotFoundError,
)
from eventindex.records.schema import RecordKind, TriggerMenu
from tests.catalog.conftest import AOD, DAOD, EVENTS, GAIA, OBJECTS, Backend

BIG = 2**63 + 5  # event numbers exceed 2**63 - 1: keys must survive as uint64


def tagfile(
    file_id: str,
    *,
    dataset: str = AOD,
    collection: str = EVENTS,
    runs: tuple[int, int] | None = (284484, 284484),
    kind: FileKind = FileKind.MASTER,
    **changes: object,
) -> TagFile:
    """A TagFile of ``dataset`` whose first key component spans ``runs``."""
    key_min: tuple[int, ...] = () if runs is None else (runs[0], 1)
    key_max: tuple[int, ...] = () if runs is None else (runs[1], BIG)
    entry = TagFile(
        file_id=file_id,
        dataset=dataset,
        collection=collection,
        kind=kind,
        uri=f"var/store/{collection}/{dataset}/{kind.value}/{file_id}.parquet",
        key_min=key_min,
        key_max=key_max,
    )
    return replace(entry, **changes)  # type: ignore[arg-type]


def ids(tagfiles: list[TagFile]) -> list[str]:
    return [t.file_id for t in tagfiles]


# -- collections -------------------------------------------------------------
def test_collection_round_trip(catalog: Catalog) -> None:
    events = Collection(EVENTS, RecordKind.EVENTS, "Run 2 physics", created_at=1_450_000_000.25)
    catalog.create_collection(events)

    stored = catalog.get_collection(EVENTS)

    assert stored == events
    assert stored.key == ("run_number", "event_number")


def test_collection_name_is_unique(catalog: Catalog) -> None:
    catalog.create_collection(Collection(EVENTS, RecordKind.EVENTS, "first"))

    with pytest.raises(AlreadyExistsError):
        catalog.create_collection(Collection(EVENTS, RecordKind.OBJECTS, "second"))
    assert catalog.get_collection(EVENTS).description == "first"


def test_unknown_collection_is_not_found(catalog: Catalog) -> None:
    with pytest.raises(NotFoundError):
        catalog.get_collection("no_such_collection")


def test_collections_are_listed_by_name(catalog: Catalog) -> None:
    for name in ["gaia_dr3", "data16_13TeV.physics_Main", "data15_13TeV.physics_Main"]:
        catalog.create_collection(Collection(name, RecordKind.EVENTS))

    assert [c.name for c in catalog.list_collections()] == [
        "data15_13TeV.physics_Main",
        "data16_13TeV.physics_Main",
        "gaia_dr3",
    ]


# -- datasets ----------------------------------------------------------------
def test_dataset_round_trip(catalog: Catalog) -> None:
    catalog.create_collection(Collection(EVENTS, RecordKind.EVENTS))
    aod = Dataset(
        AOD,
        EVENTS,
        format="AOD",
        processing_tag="r7562_p2521",
        project="data15_13TeV",
        stream="physics_Main",
        upstream="data15_13TeV.00284484.physics_Main.merge.RAW",
        attributes={"run_min": "284484", "note": "ünïcode ok"},
        created_at=1_450_000_000.5,
    )
    catalog.create_dataset(aod)

    assert catalog.get_dataset(AOD) == aod


def test_dataset_needs_its_collection(catalog: Catalog) -> None:
    with pytest.raises(NotFoundError):
        catalog.create_dataset(Dataset(AOD, EVENTS))
    with pytest.raises(NotFoundError):
        catalog.get_dataset(AOD)


def test_dataset_name_is_unique(populated: Catalog) -> None:
    with pytest.raises(AlreadyExistsError):
        populated.create_dataset(Dataset(AOD, OBJECTS, format="other"))
    assert populated.get_dataset(AOD).collection == EVENTS


def test_unknown_dataset_is_not_found(populated: Catalog) -> None:
    with pytest.raises(NotFoundError):
        populated.get_dataset("data15_13TeV.00000000.physics_Main.merge.AOD.x")


def test_datasets_are_listed_by_name_and_collection(populated: Catalog) -> None:
    assert [d.name for d in populated.list_datasets()] == [AOD, DAOD, GAIA]
    assert [d.name for d in populated.list_datasets(EVENTS)] == [AOD, DAOD]
    assert [d.name for d in populated.list_datasets(OBJECTS)] == [GAIA]
    populated.create_collection(Collection("empty", RecordKind.OBJECTS))
    assert populated.list_datasets("empty") == []


def test_datasets_of_unknown_collection(populated: Catalog) -> None:
    with pytest.raises(NotFoundError):
        populated.list_datasets("no_such_collection")


# -- TagFiles: registration --------------------------------------------------
def test_tagfile_round_trip_keeps_every_field(populated: Catalog) -> None:
    entry = TagFile(
        file_id="f-0001",
        dataset=AOD,
        collection=EVENTS,
        kind=FileKind.EXTENSION,
        uri="hdfs://nn:8020/ei/data15/AOD/extension/f-0001.parquet",
        part="trigger_chains",
        rows=123_456,
        bytes=9_876_543_210,
        checksum="xxh64:0123456789abcdef",
        key_min=(284484, 5),
        key_max=(284500, BIG),
        state=FileState.WRITING,
        created_at=1_450_000_123.125,
        committed_at=None,
        message_ids=("producer-7:41", "producer-7:42"),
        guids=("6C7E0B5A-8F3D-E511-9B6C-02163E01342B", "0A1B2C3D-0000-1111-2222-333344445555"),
        supersedes=("f-0000",),
        attributes={"codec": "zstd", "row_groups": "4"},
    )
    bare = TagFile(file_id="x", dataset="d", collection="c", kind=FileKind.MASTER, uri="u")
    unset = [
        f.name
        for f in fields(TagFile)
        if getattr(entry, f.name) == getattr(bare, f.name)
        and f.name not in ("state", "committed_at", "retired_at")
    ]
    assert unset == [], "the round trip must exercise every field"
    populated.add_tagfile(entry)

    assert populated.get_tagfile("f-0001") == entry
    assert populated.list_tagfiles(states=None) == [entry]


def test_commit_stores_the_complete_entry(populated: Catalog) -> None:
    entry = tagfile(
        "f-1",
        rows=10,
        bytes=2048,
        checksum="c1",
        message_ids=("m1", "m2"),
        guids=("g1",),
        attributes={"a": "b"},
        key_min=(1, BIG),
        key_max=(2**32 - 1, 2**64 - 1),
    )
    before = time.time()

    stored = populated.commit_tagfile(entry)

    assert stored.state is FileState.COMMITTED
    assert stored.committed_at is not None and before <= stored.committed_at <= time.time()
    assert stored == replace(entry, state=FileState.COMMITTED, committed_at=stored.committed_at)
    assert populated.get_tagfile("f-1") == stored
    assert populated.list_tagfiles() == [stored]


def test_commit_replaces_the_writing_entry(populated: Catalog) -> None:
    populated.add_tagfile(tagfile("f-1", runs=None))
    final = tagfile("f-1", runs=(100, 200), rows=500, bytes=4096, checksum="abc")

    populated.commit_tagfile(final)

    stored = populated.get_tagfile("f-1")
    assert (stored.state, stored.rows, stored.key_min, stored.key_max) == (
        FileState.COMMITTED,
        500,
        (100, 1),
        (200, BIG),
    )
    assert ids(populated.list_tagfiles(first_key_range=(150, 150))) == ["f-1"]


def test_commit_moves_the_key_range(populated: Catalog) -> None:
    populated.add_tagfile(tagfile("f-1", runs=(10, 20)))
    populated.commit_tagfile(tagfile("f-1", runs=(30, 40)))

    assert populated.list_tagfiles(first_key_range=(10, 20)) == []
    assert ids(populated.list_tagfiles(first_key_range=(35, 35))) == ["f-1"]


def test_file_id_is_unique(populated: Catalog) -> None:
    populated.add_tagfile(tagfile("f-1"))

    with pytest.raises(AlreadyExistsError):
        populated.add_tagfiles([tagfile("f-2"), tagfile("f-1", rows=99)])
    with pytest.raises(NotFoundError):
        populated.get_tagfile("f-2")  # the batch failed as a whole
    assert populated.get_tagfile("f-1").rows == 0


def test_file_id_twice_in_one_batch(populated: Catalog) -> None:
    with pytest.raises(AlreadyExistsError):
        populated.add_tagfiles([tagfile("f-1"), tagfile("f-1", dataset=DAOD)])
    assert populated.list_tagfiles(states=None) == []


def test_tagfile_needs_its_dataset(populated: Catalog) -> None:
    with pytest.raises(NotFoundError):
        populated.add_tagfiles([tagfile("f-1"), tagfile("f-2", dataset="no_such_dataset")])
    with pytest.raises(NotFoundError):
        populated.commit_tagfile(tagfile("f-3", dataset="no_such_dataset"))
    assert populated.list_tagfiles(states=None) == []


def test_tagfile_collection_must_be_its_datasets(populated: Catalog) -> None:
    with pytest.raises(CatalogError) as raised:
        populated.add_tagfile(tagfile("f-1", collection=OBJECTS))
    assert not isinstance(raised.value, NotFoundError | AlreadyExistsError)
    with pytest.raises(CatalogError):
        populated.commit_tagfile(tagfile("f-1", collection=OBJECTS))


@pytest.mark.parametrize(
    ("key_min", "key_max"),
    [((5, 1), (4, 1)), ((5, 1), ()), ((), (5, 1)), ((5, 2**64), (6, 1)), ((-(2**63) - 1,), (0,))],
    ids=["inverted", "no-max", "no-min", "beyond-uint64", "below-int64"],
)
def test_bad_key_range_is_refused(
    populated: Catalog, key_min: tuple[int, ...], key_max: tuple[int, ...]
) -> None:
    bad = tagfile("f-1", key_min=key_min, key_max=key_max)
    with pytest.raises(CatalogError):
        populated.add_tagfile(bad)
    with pytest.raises(CatalogError):
        populated.commit_tagfile(bad)
    assert populated.list_tagfiles(states=None) == []


def test_unknown_tagfile_is_not_found(populated: Catalog) -> None:
    with pytest.raises(NotFoundError):
        populated.get_tagfile("no-such-file")


# -- TagFiles: state transitions ---------------------------------------------
def test_committing_twice_fails(populated: Catalog) -> None:
    first = populated.commit_tagfile(tagfile("f-1", rows=1))

    with pytest.raises(CatalogError):
        populated.commit_tagfile(tagfile("f-1", rows=2))
    assert populated.get_tagfile("f-1") == first


def test_committing_a_retired_file_fails(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("f-1"))
    populated.retire_tagfiles(["f-1"])

    with pytest.raises(CatalogError):
        populated.commit_tagfile(tagfile("f-1"))
    assert populated.get_tagfile("f-1").state is FileState.RETIRED


def test_commit_cannot_move_a_file_to_another_dataset(populated: Catalog) -> None:
    populated.add_tagfile(tagfile("f-1", dataset=AOD))

    with pytest.raises(CatalogError):
        populated.commit_tagfile(tagfile("f-1", dataset=DAOD))
    assert populated.get_tagfile("f-1").state is FileState.WRITING


def test_retire(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("f-1"))
    populated.commit_tagfile(tagfile("f-2"))

    populated.retire_tagfiles(iter(["f-1"]))
    populated.retire_tagfiles(["f-1"])  # retiring again changes nothing

    assert ids(populated.list_tagfiles()) == ["f-2"]
    assert ids(populated.list_tagfiles(states=[FileState.RETIRED])) == ["f-1"]
    assert populated.get_tagfile("f-1").state is FileState.RETIRED


def test_retire_refuses_unknown_and_writing_files(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("f-1"))
    populated.add_tagfile(tagfile("f-2"))

    with pytest.raises(NotFoundError):
        populated.retire_tagfiles(["f-1", "no-such-file"])
    with pytest.raises(CatalogError):
        populated.retire_tagfiles(["f-1", "f-2"])
    assert populated.get_tagfile("f-1").state is FileState.COMMITTED  # all or nothing
    assert populated.get_tagfile("f-2").state is FileState.WRITING


def test_remove_writing_and_retired_files(populated: Catalog) -> None:
    populated.add_tagfile(tagfile("f-1"))
    populated.commit_tagfile(tagfile("f-2", message_ids=("m2",), guids=("g2",)))
    populated.retire_tagfiles(["f-2"])

    populated.remove_tagfile("f-1")
    populated.remove_tagfile("f-2")

    for file_id in ("f-1", "f-2"):
        with pytest.raises(NotFoundError):
            populated.get_tagfile(file_id)
    assert populated.list_tagfiles(states=None) == []
    assert populated.files_with_guid("g2") == []
    # The id is free again: crash debris can be re-registered.
    populated.add_tagfile(tagfile("f-1", rows=7))
    assert populated.get_tagfile("f-1").rows == 7


def test_remove_refuses_committed_and_unknown_files(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("f-1"))

    with pytest.raises(CatalogError):
        populated.remove_tagfile("f-1")
    with pytest.raises(NotFoundError):
        populated.remove_tagfile("no-such-file")
    assert populated.get_tagfile("f-1").state is FileState.COMMITTED


# -- TagFiles: compaction (supersedes) ----------------------------------------
def test_compacted_file_retires_what_it_supersedes(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("a-1", runs=(100, 110), message_ids=("m1",)))
    populated.commit_tagfile(tagfile("a-2", runs=(111, 120), message_ids=("m2",)))
    populated.commit_tagfile(tagfile("other", runs=(500, 500)))

    merged = populated.commit_tagfile(
        tagfile("b", runs=(100, 120), supersedes=("a-1", "a-2"), message_ids=("m1", "m2"))
    )

    assert ids(populated.list_tagfiles()) == ["b", "other"]
    retired = populated.list_tagfiles(states=[FileState.RETIRED])
    assert ids(retired) == ["a-1", "a-2"]
    assert {t.state for t in retired} == {FileState.RETIRED}
    assert sorted(ids(populated.list_tagfiles(states=None))) == ["a-1", "a-2", "b", "other"]
    assert populated.get_tagfile("a-1").state is FileState.RETIRED
    assert populated.get_tagfile("b") == merged
    assert ids(populated.list_tagfiles(first_key_range=(105, 105))) == ["b"]


def test_compaction_keeps_messages_absorbed_and_guids_found(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("a-1", message_ids=("m1",), guids=("g1",)))
    populated.commit_tagfile(tagfile("a-2", message_ids=("m2",), guids=("g2",)))
    # The compactor did not copy message ids or GUIDs: the records moved anyway.
    populated.commit_tagfile(tagfile("b", supersedes=("a-1", "a-2")))
    populated.commit_tagfile(tagfile("c", supersedes=("b",)))

    for old in ("a-1", "a-2", "b"):
        populated.remove_tagfile(old)  # garbage collection of retired files

    assert populated.absorbed_message_ids(["m1", "m2", "m3"]) == {"m1", "m2"}
    assert ids(populated.files_with_guid("g1")) == ["c"]
    populated.retire_tagfiles(["c"])  # nothing holds those records any more
    assert populated.absorbed_message_ids(["m1", "m2"]) == set()
    assert populated.files_with_guid("g1") == []


def test_a_committed_file_superseded_by_a_committed_file_reads_as_retired(
    populated: Catalog,
) -> None:
    populated.commit_tagfile(tagfile("a-1"))
    populated.commit_tagfile(tagfile("b", supersedes=("a-1",)))
    populated.remove_tagfile("a-1")
    # Re-registered as committed, but b still supersedes it: never both live.
    populated.add_tagfile(tagfile("a-1", state=FileState.COMMITTED))

    assert ids(populated.list_tagfiles()) == ["b"]
    assert populated.get_tagfile("a-1").state is FileState.RETIRED
    assert ids(populated.list_tagfiles(states=[FileState.RETIRED])) == ["a-1"]


def test_commit_superseding_an_unknown_file_fails(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("a-1"))

    with pytest.raises(NotFoundError):
        populated.commit_tagfile(tagfile("b", supersedes=("a-1", "no-such-file")))
    with pytest.raises(NotFoundError):
        populated.get_tagfile("b")
    assert populated.get_tagfile("a-1").state is FileState.COMMITTED


def test_a_file_cannot_supersede_itself(populated: Catalog) -> None:
    with pytest.raises(CatalogError):
        populated.commit_tagfile(tagfile("b", supersedes=("b",)))


def test_adding_committed_entries_applies_supersedes(populated: Catalog) -> None:
    populated.add_tagfiles(
        [
            tagfile("a-1", state=FileState.COMMITTED, message_ids=("m1",)),
            tagfile("b", state=FileState.COMMITTED, supersedes=("a-1",)),
            tagfile("w", supersedes=("a-1",)),  # a writing entry supersedes nothing yet
        ]
    )

    assert ids(populated.list_tagfiles()) == ["b"]
    assert ids(populated.list_tagfiles(states=[FileState.RETIRED])) == ["a-1"]
    assert populated.absorbed_message_ids(["m1"]) == {"m1"}


def test_batch_may_only_supersede_known_or_earlier_files(populated: Catalog) -> None:
    with pytest.raises(NotFoundError):
        populated.add_tagfiles(
            [
                tagfile("b", state=FileState.COMMITTED, supersedes=("a-1",)),
                tagfile("a-1", state=FileState.COMMITTED),
            ]
        )
    assert populated.list_tagfiles(states=None) == []


def test_commit_several_files_in_one_step(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("a-1", message_ids=("m1",)))
    populated.commit_tagfile(tagfile("x-1", kind=FileKind.EXTENSION, part="p"))
    populated.add_tagfiles([tagfile("x-2", kind=FileKind.EXTENSION, part="p"), tagfile("b")])

    committed = populated.commit_tagfiles(
        [
            tagfile("x-2", kind=FileKind.EXTENSION, part="p", supersedes=("x-1",)),
            tagfile("b", supersedes=("a-1",)),
        ]
    )

    assert [e.state for e in committed] == [FileState.COMMITTED] * 2
    assert ids(populated.list_tagfiles()) == ["b", "x-2"]
    assert ids(populated.list_tagfiles(states=[FileState.RETIRED])) == ["a-1", "x-1"]
    assert populated.absorbed_message_ids(["m1"]) == {"m1"}


def test_commit_several_files_checks_before_committing(populated: Catalog) -> None:
    populated.add_tagfiles([tagfile("a-1"), tagfile("b-1")])
    with pytest.raises(AlreadyExistsError):
        populated.commit_tagfiles([tagfile("a-1"), tagfile("a-1")])
    assert ids(populated.list_tagfiles(states=[FileState.WRITING])) == ["a-1", "b-1"]


# -- TagFiles: retirement time and concurrent compactions ---------------------
def test_retired_entries_carry_their_retirement_time(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("a-1"))
    populated.commit_tagfile(tagfile("x"))
    assert populated.get_tagfile("a-1").retired_at is None
    merged = populated.commit_tagfile(tagfile("b", supersedes=("a-1",)))
    before = time.time()
    populated.retire_tagfiles(["x"])

    assert populated.get_tagfile("a-1").retired_at == merged.committed_at
    assert merged.retired_at is None and populated.get_tagfile("b").retired_at is None
    x_retired = populated.get_tagfile("x").retired_at
    assert x_retired is not None and before <= x_retired <= time.time()
    # Retiring again keeps the first time.
    populated.retire_tagfiles(["x", "a-1"])
    assert populated.get_tagfile("x").retired_at == x_retired
    assert populated.get_tagfile("a-1").retired_at == merged.committed_at
    listed = {t.file_id: t.retired_at for t in populated.list_tagfiles(states=None)}
    assert listed == {"a-1": merged.committed_at, "b": None, "x": x_retired}


def test_retire_stamps_entries_retired_without_a_time(populated: Catalog) -> None:
    populated.add_tagfile(tagfile("old", state=FileState.RETIRED))
    assert populated.get_tagfile("old").retired_at is None

    populated.retire_tagfiles(["old"])

    stamped = populated.get_tagfile("old").retired_at
    assert stamped is not None and stamped <= time.time()


def test_commit_superseding_a_retired_file_is_refused(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("a-1"))
    populated.commit_tagfile(tagfile("a-2"))
    populated.commit_tagfile(tagfile("b", supersedes=("a-1", "a-2")))
    populated.add_tagfiles([tagfile("c-x", kind=FileKind.EXTENSION, part="p"), tagfile("c")])

    # The second compaction of the same inputs: the extension goes first in the batch.
    with pytest.raises(SupersededError, match="a-1, a-2"):
        populated.commit_tagfiles(
            [
                tagfile("c-x", kind=FileKind.EXTENSION, part="p"),
                tagfile("c", supersedes=("a-1", "a-2")),
            ]
        )

    assert ids(populated.list_tagfiles()) == ["b"]
    assert ids(populated.list_tagfiles(states=[FileState.WRITING])) == ["c", "c-x"]
    populated.retire_tagfiles(["b"])
    with pytest.raises(SupersededError, match="supersedes b"):
        populated.commit_tagfile(tagfile("d", supersedes=("b",)))
    with pytest.raises(NotFoundError):
        populated.get_tagfile("d")


def test_a_batch_cannot_supersede_one_file_twice(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("a-1"))
    with pytest.raises(SupersededError, match="a-1"):
        populated.add_tagfiles(
            [
                tagfile("b", state=FileState.COMMITTED, supersedes=("a-1",)),
                tagfile("c", state=FileState.COMMITTED, supersedes=("a-1",)),
            ]
        )
    with pytest.raises(SupersededError, match="a-1"):
        populated.commit_tagfiles(
            [tagfile("b", supersedes=("a-1",)), tagfile("c", supersedes=("a-1",))]
        )
    assert ids(populated.list_tagfiles(states=None)) == ["a-1"]
    # Refused commits leave nothing that holds the file back.
    populated.commit_tagfile(tagfile("b", supersedes=("a-1",)))
    assert ids(populated.list_tagfiles()) == ["b"]


def test_concurrent_compactions_commit_at_most_once(backend: Backend, populated: Catalog) -> None:
    """Two processes' catalogs, one commit each over the same inputs, at once."""
    populated.commit_tagfile(tagfile("a-1"))
    populated.commit_tagfile(tagfile("a-2"))
    catalogs = [populated, backend.open() if backend.persistent else populated]
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def compact(number: int) -> None:
        name = f"b-{number}"
        barrier.wait()
        try:
            catalogs[number].commit_tagfile(tagfile(name, supersedes=("a-1", "a-2")))
            outcomes[name] = "committed"
        except SupersededError:
            outcomes[name] = "refused"

    threads = [threading.Thread(target=compact, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes.values()) in (["committed", "refused"], ["refused", "refused"])
    live = ids(populated.list_tagfiles())
    assert live in (["a-1", "a-2"], ["b-0"], ["b-1"])


# -- TagFiles: listing --------------------------------------------------------
@pytest.fixture
def run_ranges(populated: Catalog) -> Catalog:
    """Committed files with known first-key (run) ranges, one without a key range."""
    populated.add_tagfiles(
        [
            tagfile("r100-200", runs=(100, 200), state=FileState.COMMITTED),
            tagfile("r150-300", runs=(150, 300), state=FileState.COMMITTED),
            tagfile("r400-500", runs=(400, 500), state=FileState.COMMITTED),
            tagfile("r-daod", dataset=DAOD, runs=(250, 260), state=FileState.COMMITTED),
            tagfile("no-keys", runs=None, kind=FileKind.DIRECTOR, state=FileState.COMMITTED),
            tagfile(
                "gaia",
                dataset=GAIA,
                collection=OBJECTS,
                key_min=(-(2**63),),
                key_max=(BIG,),
                state=FileState.COMMITTED,
            ),
        ]
    )
    return populated


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (200, 200, ["r100-200", "r150-300"]),  # bounds are inclusive
        (201, 249, ["r150-300"]),
        (301, 399, []),
        (50, 99, []),
        (500, 10_000, ["r400-500"]),
        (0, 2**32, ["r100-200", "r150-300", "r400-500", "r-daod"]),
        (300, 150, []),  # an empty interval
    ],
)
def test_first_key_range_keeps_intersecting_files(
    run_ranges: Catalog, lo: int, hi: int, expected: list[str]
) -> None:
    found = run_ranges.list_tagfiles(collection=EVENTS, first_key_range=(lo, hi))
    assert sorted(ids(found)) == sorted(expected)


def test_first_key_range_over_every_collection(run_ranges: Catalog) -> None:
    assert ids(run_ranges.list_tagfiles(first_key_range=(-5, -5))) == ["gaia"]
    assert ids(run_ranges.list_tagfiles(first_key_range=(BIG, 2**64 - 1))) == ["gaia"]
    everything = run_ranges.list_tagfiles(first_key_range=(-(2**63), 2**64 - 1))
    assert sorted(ids(everything)) == ["gaia", "r-daod", "r100-200", "r150-300", "r400-500"]
    assert ids(run_ranges.list_tagfiles(dataset=DAOD, first_key_range=(0, 1000))) == ["r-daod"]


def test_first_key_range_beyond_int64(populated: Catalog) -> None:
    # uint64 first components: SQLite's integer index clamps them, the exact check must not.
    populated.commit_tagfile(
        tagfile("high", dataset=GAIA, collection=OBJECTS, key_min=(BIG,), key_max=(BIG + 10,))
    )

    assert populated.list_tagfiles(first_key_range=(BIG + 11, 2**64 - 1)) == []
    assert populated.list_tagfiles(first_key_range=(0, BIG - 1)) == []
    assert ids(populated.list_tagfiles(first_key_range=(BIG + 10, BIG + 10))) == ["high"]


def test_filters_combine(run_ranges: Catalog) -> None:
    run_ranges.add_tagfile(tagfile("writing", runs=(120, 130)))
    run_ranges.add_tagfile(tagfile("index", runs=(120, 130), kind=FileKind.INDEX))

    assert ids(run_ranges.list_tagfiles(kinds=[FileKind.DIRECTOR])) == ["no-keys"]
    assert ids(run_ranges.list_tagfiles(dataset=AOD, kinds=[FileKind.MASTER])) == [
        "r100-200",
        "r150-300",
        "r400-500",
    ]
    assert run_ranges.list_tagfiles(kinds=[]) == []
    assert ids(run_ranges.list_tagfiles(states=[FileState.WRITING])) == ["index", "writing"]
    assert ids(
        run_ranges.list_tagfiles(
            states=[FileState.WRITING], kinds=[FileKind.INDEX], first_key_range=(125, 125)
        )
    ) == ["index"]
    assert len(run_ranges.list_tagfiles(states=None)) == 8
    assert ids(run_ranges.list_tagfiles(collection=OBJECTS)) == ["gaia"]
    assert run_ranges.list_tagfiles(dataset=GAIA, collection=EVENTS) == []


def test_listing_sorts_by_dataset_then_key_then_id(populated: Catalog) -> None:
    populated.add_tagfiles(
        [
            tagfile("z", dataset=DAOD, key_min=(1, 1), key_max=(1, 1)),
            tagfile("c", key_min=(10, 1), key_max=(10, 2)),  # 10 > 9 numerically
            tagfile("b", key_min=(9, BIG), key_max=(9, BIG)),
            tagfile("a", key_min=(9, 2), key_max=(9, 3)),
            tagfile("d", key_min=(9, 2), key_max=(9, 9)),  # same key_min: by file id
            tagfile("e", runs=None),
        ]
    )

    listed = populated.list_tagfiles(states=None)

    assert ids(listed) == ["e", "a", "d", "b", "c", "z"]


def test_listing_unknown_dataset_or_collection(populated: Catalog) -> None:
    with pytest.raises(NotFoundError):
        populated.list_tagfiles(dataset="no_such_dataset")
    with pytest.raises(NotFoundError):
        populated.list_tagfiles(collection="no_such_collection")
    with pytest.raises(NotFoundError):
        populated.list_tagfiles(collection="no_such_collection", first_key_range=(1, 2))


# -- lookups -----------------------------------------------------------------
def test_files_with_guid_lists_committed_files(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("f-2", dataset=DAOD, guids=("g-raw", "g-esd")))
    populated.commit_tagfile(tagfile("f-1", guids=("g-raw",)))
    populated.add_tagfile(tagfile("f-writing", guids=("g-raw",)))
    populated.commit_tagfile(tagfile("f-retired", guids=("g-raw",)))
    populated.retire_tagfiles(["f-retired"])

    assert ids(populated.files_with_guid("g-raw")) == ["f-1", "f-2"]
    assert ids(populated.files_with_guid("g-esd")) == ["f-2"]
    assert populated.files_with_guid("g-unknown") == []


def test_absorbed_message_ids(populated: Catalog) -> None:
    populated.commit_tagfile(tagfile("f-1", message_ids=("p1:1", "p1:2")))
    populated.add_tagfile(tagfile("f-2", message_ids=("p1:3",)))  # not committed yet

    assert populated.absorbed_message_ids(["p1:1", "p1:3", "p1:4", "p1:1"]) == {"p1:1"}
    assert populated.absorbed_message_ids([]) == set()
    populated.commit_tagfile(tagfile("f-2", message_ids=("p1:3",)))
    assert populated.absorbed_message_ids(iter(["p1:2", "p1:3"])) == {"p1:2", "p1:3"}


# -- trigger menus -----------------------------------------------------------
def test_trigger_menus(catalog: Catalog) -> None:
    l1 = TriggerMenu(key=10, level="L1", bits={0: "L1_EM12", 255: "L1_MU20"})
    hlt = TriggerMenu(key=10, level="HLT", bits={3: "HLT_e24_lhmedium", 700: "HLT_mu26"})
    older = TriggerMenu(key=9, level="L1", bits={1: "L1_J20"})
    for menu in (l1, hlt, older):
        catalog.put_trigger_menu(menu)

    catalog.put_trigger_menu(TriggerMenu(key=10, level="L1", bits={255: "L1_MU20", 0: "L1_EM12"}))
    with pytest.raises(AlreadyExistsError):
        catalog.put_trigger_menu(TriggerMenu(key=10, level="L1", bits={0: "L1_EM15"}))

    assert catalog.get_trigger_menu(10, "L1") == l1
    assert catalog.get_trigger_menu(10, "HLT").bit_of("HLT_mu26") == 700
    assert catalog.list_trigger_menus() == [older, hlt, l1]
    with pytest.raises(NotFoundError):
        catalog.get_trigger_menu(11, "L1")
    with pytest.raises(NotFoundError):
        catalog.get_trigger_menu(9, "HLT")


# -- lifecycle and concurrency -----------------------------------------------
def test_entries_survive_reopening(backend: Backend, populated: Catalog) -> None:
    if not backend.persistent:
        pytest.skip("an in-memory catalog ends with its connection")
    committed = populated.commit_tagfile(tagfile("f-1", message_ids=("m1",), guids=("g1",)))
    populated.put_trigger_menu(TriggerMenu(key=1, level="L1", bits={0: "L1_EM12"}))
    populated.close()

    reopened = backend.open()

    assert [c.name for c in reopened.list_collections()] == [EVENTS, OBJECTS]
    assert reopened.get_tagfile("f-1") == committed
    assert reopened.absorbed_message_ids(["m1"]) == {"m1"}
    assert reopened.list_trigger_menus()[0].bits == {0: "L1_EM12"}


def test_closed_catalog_refuses_work(catalog: Catalog) -> None:
    with catalog as same:
        same.create_collection(Collection(EVENTS, RecordKind.EVENTS))

    with pytest.raises(CatalogError):
        catalog.list_collections()
    catalog.close()  # closing twice is harmless


def test_threads_share_one_catalog(populated: Catalog) -> None:
    errors: list[BaseException] = []

    def register(worker: int) -> None:
        try:
            for i in range(20):
                entry = tagfile(f"t{worker}-{i}", message_ids=(f"t{worker}:{i}",))
                populated.add_tagfile(entry)
                populated.commit_tagfile(entry)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(populated.list_tagfiles()) == 120
    assert (
        len(populated.absorbed_message_ids(f"t{w}:{i}" for w in range(6) for i in range(20))) == 120
    )


# -- load_catalog and the optional driver -------------------------------------
def settings(values: dict[str, Any]) -> CatalogSettings:
    """``[catalog]`` settings validated as a configuration file's would be."""
    return CatalogSettings.model_validate(values)


def test_load_catalog_opens_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "catalog.sqlite"
    with load_catalog(settings({"type": "sqlite", "path": str(path)})) as catalog:
        assert isinstance(catalog, SQLiteCatalog)
        catalog.create_collection(Collection(EVENTS, RecordKind.EVENTS))
    assert path.exists()
    with load_catalog(settings({"path": ":memory:"})) as catalog:
        assert isinstance(catalog, SQLiteCatalog)
        assert catalog.list_collections() == []


def test_load_catalog_opens_hbase(monkeypatch: pytest.MonkeyPatch) -> None:
    import happybase_mock

    # Stand the mock in for the driver, to check the loader wiring without a server.
    monkeypatch.setitem(sys.modules, "happybase", happybase_mock)
    hbase = {"host": "hbase-thrift", "port": 9091, "table_prefix": "ei_load_"}

    catalog = load_catalog(settings({"type": "hbase", "hbase": hbase}))

    assert isinstance(catalog, HBaseCatalog)
    try:
        assert catalog.table_prefix == "ei_load_"
        catalog.create_collection(Collection(EVENTS, RecordKind.EVENTS))
        assert [c.name for c in catalog.list_collections()] == [EVENTS]
    finally:
        catalog.drop_tables()


def test_unreachable_hbase_is_a_catalog_error() -> None:
    pytest.importorskip("happybase")
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(CatalogError, match="HBase"):
        load_catalog(settings({"type": "hbase", "hbase": {"host": "127.0.0.1", "port": port}}))


def test_missing_happybase_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "happybase", None)  # import happybase now fails

    with pytest.raises(MissingExtraError) as raised:
        load_catalog(settings({"type": "hbase"}))

    assert raised.value.extra == "hbase"
    assert "pip install 'eventindex[hbase]'" in str(raised.value)


def test_unknown_catalog_type_is_a_config_error() -> None:
    values: dict[str, Any] = {"type": "cassandra"}
    unchecked = CatalogSettings.model_construct(**values)  # as if validation were bypassed
    with pytest.raises(ConfigError, match="cassandra"):
        load_catalog(unchecked)


def test_importing_catalog_does_not_import_happybase() -> None:
    code = "import sys, catalog; assert 'happybase' not in sys.modules, 'imported happybase'"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- SQLite specifics ---------------------------------------------------------
def _register_in_process(path: str, worker: int, files: int) -> None:
    """One producer process: register and commit ``files`` TagFiles in batches of 10."""
    with SQLiteCatalog(path) as catalog:
        for start in range(0, files, 10):
            batch = [
                tagfile(f"p{worker}-{i}", runs=(worker, worker), message_ids=(f"p{worker}:{i}",))
                for i in range(start, min(start + 10, files))
            ]
            catalog.add_tagfiles(batch)
            for entry in batch:
                catalog.commit_tagfile(entry)


def test_processes_share_one_sqlite_file(tmp_path: Path) -> None:
    path = str(tmp_path / "catalog.sqlite")
    with SQLiteCatalog(path) as catalog:
        catalog.create_collection(Collection(EVENTS, RecordKind.EVENTS))
        catalog.create_dataset(Dataset(AOD, EVENTS))
    workers, files = 4, 150
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_register_in_process, args=(path, worker, files))
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)

    assert [p.exitcode for p in processes] == [0] * workers
    with SQLiteCatalog(path) as catalog:
        listed = catalog.list_tagfiles()
        assert len(listed) == workers * files
        assert len(set(ids(listed))) == workers * files
        for worker in range(workers):
            assert len(catalog.list_tagfiles(first_key_range=(worker, worker))) == files
        every_message = [f"p{w}:{i}" for w in range(workers) for i in range(files)]
        assert len(catalog.absorbed_message_ids(every_message)) == workers * files


def test_sqlite_file_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    SQLiteCatalog(str(path)).close()
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_errors_become_catalog_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError):
        SQLiteCatalog(str(tmp_path))  # a folder, not a database file
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogError):
        SQLiteCatalog(str(garbage))


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    SQLiteCatalog(str(path)).close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE schema_version SET version = 99")
    raw.close()

    with pytest.raises(CatalogError, match="schema version 99"):
        SQLiteCatalog(str(path))


# -- HBase specifics (against happybase_mock) ---------------------------------
def test_hbase_row_keys_serve_the_scans(mock_hbase: HBaseCatalog) -> None:
    mock_hbase.add_tagfile(tagfile("f-1", runs=(284484, 284490)))
    tables = mock_hbase._tables

    assert tables["tagfiles"].row(f"{AOD}\x00f-1".encode())[b"s:state"] == b"writing"
    assert tables["tagfile_by_id"].row(b"f-1")[b"m:row"] == f"{AOD}\x00f-1".encode()
    keyrange = f"{EVENTS}\x00{284484 + 2**63:017x}\x00f-1".encode()
    assert tables["keyrange"].row(keyrange)[b"m:dataset"] == AOD.encode()


def test_hbase_commit_retires_the_superseded_rows(mock_hbase: HBaseCatalog) -> None:
    mock_hbase.commit_tagfile(tagfile("a-1"))
    mock_hbase.commit_tagfile(tagfile("b", supersedes=("a-1",)))

    # Not just hidden by the supersession rule: the old row itself says retired.
    assert mock_hbase._tables["tagfiles"].row(f"{AOD}\x00a-1".encode())[b"s:state"] == b"retired"


def test_hbase_crash_after_the_commit_point(
    mock_hbase: HBaseCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    mock_hbase.commit_tagfile(tagfile("a-1", message_ids=("m1",), guids=("g1",)))
    put_many = mock_hbase._put_many

    def crash_on_retire(table: str, rows: object) -> None:
        if table == "tagfiles":
            raise OSError("region server went away")
        put_many(table, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(mock_hbase, "_put_many", crash_on_retire)
    with pytest.raises(CatalogError):
        mock_hbase.commit_tagfile(tagfile("b", supersedes=("a-1",)))
    monkeypatch.undo()

    # a-1's row still says committed: the supersession rule hides it.
    assert mock_hbase._tables["tagfiles"].row(f"{AOD}\x00a-1".encode())[b"s:state"] == b"committed"
    assert ids(mock_hbase.list_tagfiles()) == ["b"]
    assert ids(mock_hbase.list_tagfiles(first_key_range=(284484, 284484))) == ["b"]
    assert mock_hbase.get_tagfile("a-1").state is FileState.RETIRED
    assert ids(mock_hbase.files_with_guid("g1")) == ["b"]
    assert mock_hbase.absorbed_message_ids(["m1"]) == {"m1"}
    with pytest.raises(CatalogError):
        mock_hbase.commit_tagfile(tagfile("a-1"))


def test_hbase_crash_before_the_commit_point(
    mock_hbase: HBaseCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    mock_hbase.commit_tagfile(tagfile("a-1", guids=("g1",)))
    put_many = mock_hbase._put_many

    def crash_on_messages(table: str, rows: object) -> None:
        if table == "messages":
            raise OSError("connection reset")
        put_many(table, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(mock_hbase, "_put_many", crash_on_messages)
    with pytest.raises(CatalogError):
        mock_hbase.commit_tagfile(tagfile("b", supersedes=("a-1",), message_ids=("m9",)))
    monkeypatch.undo()

    with pytest.raises(NotFoundError):
        mock_hbase.get_tagfile("b")
    assert ids(mock_hbase.list_tagfiles()) == ["a-1"]
    assert ids(mock_hbase.files_with_guid("g1")) == ["a-1"]  # the half-written index is ignored
    assert mock_hbase.absorbed_message_ids(["m9"]) == set()
    # The retry no longer supersedes a-1: the link the failed attempt left must not count.
    mock_hbase.commit_tagfile(tagfile("b", message_ids=("m9",)))
    assert ids(mock_hbase.list_tagfiles()) == ["a-1", "b"]
    assert mock_hbase.absorbed_message_ids(["m9"]) == {"m9"}


def test_hbase_driver_errors_become_catalog_errors(mock_hbase: HBaseCatalog) -> None:
    mock_hbase._connection.delete_table(mock_hbase.table_prefix + "collections", disable=True)

    with pytest.raises(CatalogError) as raised:
        mock_hbase.list_collections()
    assert isinstance(raised.value.__cause__, OSError)


def test_hbase_refuses_nul_in_names(mock_hbase: HBaseCatalog) -> None:
    with pytest.raises(CatalogError):
        mock_hbase.add_tagfile(tagfile("bad\x00id"))


def test_hbase_refuses_while_another_commit_is_in_flight(mock_hbase: HBaseCatalog) -> None:
    mock_hbase.commit_tagfile(tagfile("a-1"))
    # The intent of a commit of b that has not reached its commit point yet.
    started = repr(time.time()).encode()
    mock_hbase._tables["superseded"].put(b"a-1", {b"f:b": started})

    with pytest.raises(SupersededError, match="b"):
        mock_hbase.commit_tagfile(tagfile("c", supersedes=("a-1",)))
    assert b"f:c" not in mock_hbase._tables["superseded"].row(b"a-1")  # the intent is gone

    # An intent older than INTENT_SECONDS is debris of a crash: it no longer counts.
    stale = repr(time.time() - INTENT_SECONDS - 1).encode()
    mock_hbase._tables["superseded"].put(b"a-1", {b"f:b": stale})
    mock_hbase.commit_tagfile(tagfile("c", supersedes=("a-1",)))
    assert ids(mock_hbase.list_tagfiles()) == ["c"]


def test_hbase_double_commit_keeps_the_first(
    mock_hbase: HBaseCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The residual window: both commits passed their checks. Readers agree that
    the first commit holds and the later one (and only it) is void."""
    for name in ("a-1", "a-2", "a-3"):
        mock_hbase.commit_tagfile(tagfile(name, message_ids=(name,)))
    first = mock_hbase.commit_tagfile(tagfile("b", supersedes=("a-1", "a-2")))
    monkeypatch.setattr(mock_hbase, "_check_rivals", lambda entry, started: None)
    monkeypatch.setattr("catalog.hbase.check_supersedes_live", lambda *a: None)
    later = mock_hbase.commit_tagfile(tagfile("c", supersedes=("a-2", "a-3")))
    monkeypatch.undo()

    # a-3, which only the void commit superseded, was not marked retired: it stays live.
    assert ids(mock_hbase.list_tagfiles()) == ["a-3", "b"]
    void = mock_hbase.get_tagfile("c")
    assert void.state is FileState.RETIRED and void.retired_at == later.committed_at
    assert mock_hbase.get_tagfile("a-2").retired_at == first.committed_at
    assert mock_hbase.get_tagfile("a-3").state is FileState.COMMITTED
    # gc stamps the void file's row, so it stays retired once the others are forgotten.
    mock_hbase.retire_tagfiles(["c", "a-1", "a-2"])
    for name in ("a-1", "a-2", "c"):
        mock_hbase.remove_tagfile(name)
    assert ids(mock_hbase.list_tagfiles()) == ["a-3", "b"]
    assert mock_hbase.absorbed_message_ids(["a-1", "a-2", "a-3"]) == {"a-1", "a-2", "a-3"}


def test_sqlite_catalog_of_an_older_version_gains_the_retirement_time(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with SQLiteCatalog(str(path)) as catalog:
        populate_events(catalog)
        catalog.commit_tagfile(tagfile("a-1"))
        merged = catalog.commit_tagfile(tagfile("b", supersedes=("a-1",)))
    raw = sqlite3.connect(path)
    with raw:  # as an older version left it: no column, no stamps
        raw.execute("ALTER TABLE tagfiles DROP COLUMN retired_at")
    raw.close()

    with SQLiteCatalog(str(path)) as catalog:
        # The superseding file's commit time stands in for the missing stamp.
        assert catalog.get_tagfile("a-1").retired_at == merged.committed_at
        assert ids(catalog.list_tagfiles()) == ["b"]
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 1
    raw.close()


def populate_events(catalog: Catalog) -> None:
    catalog.create_collection(Collection(EVENTS, RecordKind.EVENTS))
    catalog.create_dataset(Dataset(AOD, EVENTS))
