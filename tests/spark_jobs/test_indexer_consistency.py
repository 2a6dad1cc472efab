"""The Indexer and the consistency check on the shared local SparkSession."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from catalog.model import FileKind
from catalog.verify import verify_catalog
from eventindex.query.consistency import load_report, summary_lines
from eventindex.query.trigger_index import INDEX_PART
from eventindex.query.triggers import TriggerIndex
from eventindex.storage import delete_file
from spark_jobs.consistency import (
    MISSING_HERE,
    NOT_UPSTREAM,
    Pair,
    duplicate_copies,
    duplicated,
    first_in_key_order,
    patterns,
    plan_check,
    presence,
    problem_events,
    run_check,
    store_reports,
)
from spark_jobs.indexer import plan_index, run_index
from spark_jobs.session import python_for_workers
from tests.generated_store import GeneratedStore

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    python_for_workers()
    generated = GeneratedStore.create(tmp_path_factory.mktemp("spark-jobs"))
    try:
        yield generated
    finally:
        generated.close()


def test_index_on_spark_equals_the_in_process_transform(spark: Any, store: GeneratedStore) -> None:
    tasks, skipped = plan_index(store.catalog, str(store.root), "*.daq.RAW")
    assert len(tasks) == 2 and skipped == 0
    summary = run_index(store.catalog, tasks, spark=spark)
    assert summary.files == 2 and summary.events == sum(t.master_rows for t in tasks)
    indexes = [
        e for e in store.catalog.list_tagfiles(kinds=[FileKind.INDEX]) if e.part == INDEX_PART
    ]
    assert {e.attributes["master"] for e in indexes} == {t.master_id for t in tasks}
    assert verify_catalog(store.catalog, str(store.root)).ok(strict=True)
    names = next(m for m in store.catalog.list_trigger_menus() if m.level == "HLT").bits.values()
    expression = " OR ".join(list(names)[:3])
    index = TriggerIndex(store.catalog)
    from_index = index.count(expression, dataset="*.daq.RAW")
    assert from_index.unindexed_files == 0
    # Rebuilding supersedes the old index in one commit: still one index per master.
    again, _ = plan_index(store.catalog, str(store.root), "*.daq.RAW", rebuild=True)
    assert {t.replaces for t in again} == {(e.file_id,) for e in indexes}
    run_index(store.catalog, again, spark=spark)
    live = [e for e in store.catalog.list_tagfiles(kinds=[FileKind.INDEX]) if e.part == INDEX_PART]
    assert len(live) == 2 and not {e.file_id for e in live} & {e.file_id for e in indexes}
    index.refresh()
    assert index.count(expression, dataset="*.daq.RAW").passed == from_index.passed
    # In-memory indexing of unindexed masters (AOD here) gives what the per-row masks say.
    assert index.count(expression, dataset="*.merge.AOD.r7562_p2521").unindexed_files == 2


def test_check_transform_on_a_small_frame(spark: Any) -> None:
    events = spark.createDataFrame(
        [
            (0, 0, 0, 0, 1, 10),
            (0, 0, 0, 0, 1, 11),
            (0, 0, 0, 0, 1, 12),  # upstream
            (0, 1, 1, 1, 1, 10),
            (0, 1, 1, 2, 1, 10),
            (0, 1, 1, 1, 1, 13),  # downstream: 10 twice, 13 extra, 11-12 lost
            (0, 2, 2, 3, 1, 10),  # a skim of dataset 1: keeps only 10
            (0, 2, 2, 3, 1, -5),  # event 2**64 - 5 (a signed long on Spark): absent upstream
        ],
        "cluster int, slot int, dataset int, file int, run_number long, event_number long",
    )
    pairs = [Pair(0, 1, 0, 0, 1, skim=False), Pair(1, 2, 0, 1, 2, skim=True)]
    present = presence(events, 1)
    assert sorted(
        (r["event_number"], r["rows"], r["mask0"], r["duplicated"])
        for r in present.withColumn("duplicated", duplicated(1)).collect()
    ) == [
        (-5, 1, 0b100, False),
        (10, 4, 0b111, True),
        (11, 1, 1, False),
        (12, 1, 1, False),
        (13, 1, 0b010, False),
    ]
    assert sorted(tuple(r) for r in patterns(present, 1).collect()) == [
        (0, 1, 0b001, False, 2),
        (0, 1, 0b010, False, 1),
        (0, 1, 0b100, False, 1),
        (0, 1, 0b111, True, 1),
    ]
    assert sorted(tuple(r) for r in problem_events(present, 1, pairs).collect()) == [
        (1, MISSING_HERE, 1, 11),
        (1, MISSING_HERE, 1, 12),
        (1, NOT_UPSTREAM, 1, 13),
        (2, NOT_UPSTREAM, 1, -5),
    ]
    keys = present.where(duplicated(1)).select("cluster", "run_number", "event_number")
    assert [tuple(r) for r in duplicate_copies(events, keys).collect()] == [(1, 1, 10, 2, [1, 2])]
    # Unsigned key order: 2**64 - 5 comes after 13.
    first = first_in_key_order(problem_events(present, 1, pairs), ["problem"], 1)
    assert sorted((r["problem"], r["event_number"]) for r in first.collect()) == [
        (MISSING_HERE, 11),
        (NOT_UPSTREAM, 13),
    ]
    # A cluster of more than 64 datasets takes a second mask word.
    wide = spark.createDataFrame(
        [(0, 3, 1, 7), (0, 70, 1, 7), (0, 70, 1, 7)],
        "cluster int, slot int, run_number long, event_number long",
    )
    [row] = presence(wide, 2).withColumn("duplicated", duplicated(2)).collect()
    assert (row["mask0"], row["mask1"], row["rows"], row["duplicated"]) == (8, 64, 3, True)


def test_slots_put_datasets_that_can_share_events_in_one_cluster(store: GeneratedStore) -> None:
    plan = plan_check(store.catalog, store.spec.collection)
    by_run: dict[int, set[int]] = {}
    for dataset in plan.datasets:
        cluster, _ = plan.slots[dataset.name]
        by_run.setdefault(int(dataset.attributes["run_number"]), set()).add(cluster)
    # One cluster per run (its RAW, AODs and DAOD), distinct slots inside it.
    assert all(len(clusters) == 1 for clusters in by_run.values())
    assert len({c for clusters in by_run.values() for c in clusters}) == len(by_run)
    assert len(set(plan.slots.values())) == len(plan.datasets) and plan.words == 1


def test_check_finds_injected_problems_and_stores_the_report(
    spark: Any, store: GeneratedStore, tmp_path: Path
) -> None:
    run = store.spec.first_run
    clean = run_check(spark, plan_check(store.catalog, store.spec.collection, run, run))
    assert clean["problems"] == 0, summary_lines(clean)
    assert clean["events"] == sum(
        store.tables[store.dataset(run, fmt, tag)].num_rows
        for fmt, tag in (("RAW", ""), ("AOD", "r7562"), ("AOD", "r9264"), ("DAOD_PHYS", ""))
    )
    # Inject: an AOD file whose rows repeat 5 RAW events and lose 3; a second-run file deleted.
    aod = store.dataset(run, "AOD", "r7562")
    table = store.tables[aod]
    repeated, dropped = table.slice(0, 5), table.slice(5, 3)
    dataset = store.catalog.get_dataset(aod)
    [master] = store.catalog.list_tagfiles(dataset=aod, kinds=[FileKind.MASTER])
    rest = pa.concat_tables([repeated, table.slice(8)])
    extra = store.writer.write(rest, dataset, supersedes=[master.file_id])
    duplicate_file = store.writer.write(repeated, dataset)
    victim = store.catalog.list_tagfiles(
        dataset=store.dataset(run + 1, "RAW"), kinds=[FileKind.MASTER]
    )[0]
    delete_file(victim.uri)
    plan = plan_check(store.catalog, store.spec.collection)
    assert [f.file_id for f in plan.missing] == [victim.file_id]
    report = run_check(spark, plan)
    entry = report["datasets"][aod]
    assert entry["duplicates"]["events"] == 5
    first = entry["duplicates"]["listed"][0]
    assert sorted(first["files"]) == sorted([extra.file_id, duplicate_file.file_id])
    assert (first["run_number"], first["event_number"]) == (run, table["event_number"][0].as_py())
    assert entry["missing_from_this"]["events"] == 3
    assert [e["event_number"] for e in entry["missing_from_this"]["listed"]] == dropped[
        "event_number"
    ].to_pylist()
    assert report["datasets"][victim.dataset]["missing_files"] == [victim.uri]
    assert (
        report["problems"]
        == 5
        + 3
        + 1
        + report["datasets"][store.dataset(run + 1, "AOD", "r7562")]["missing_upstream"]["events"]
        + report["datasets"][store.dataset(run + 1, "AOD", "r9264")]["missing_upstream"]["events"]
    )
    text = "\n".join(summary_lines(report))
    assert "MISSING FILE" in text and "DUPLICATE" in text and "problem(s)" in text
    store_reports(store.catalog, str(store.root), report, plan)
    store_reports(store.catalog, str(store.root), report, plan)  # supersedes the first
    served = load_report(store.catalog, aod)
    assert served["duplicates"]["events"] == 5 and served["collection"] == store.spec.collection
    assert json.loads(json.dumps(served)) == served
