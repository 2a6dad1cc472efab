"""Shared scans: one read of each unit serves every rider; joins mid-walk; failures,
cancellation, direct answers and restarts through the scan worker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from eventindex.config import QuerySettings
from eventindex.errors import EventIndexError
from eventindex.query.registry import QueryRegistry, QueryState
from eventindex.query.scan import (
    ScanWorker,
    SharedScan,
    UnitOutcome,
    direct_route,
    evaluate_unit,
    selected_units,
)
from eventindex.query.sql import compile_query
from eventindex.query.tables import ScanTable, resolve_table
from tests.query.scan_tables import (
    OBJECT_COLLECTION,
    QueryStores,
    build_query_stores,
    run_everywhere,
)

EVENTS = "data15_13TeV.physics_Main"
QUERIES = (
    f"SELECT COUNT(*) AS n, SUM(bcid) AS b FROM {EVENTS} WHERE lumi_block > 4",
    f"SELECT run_number, MAX(timestamp) AS t FROM {EVENTS} GROUP BY run_number ORDER BY run_number",
    f"SELECT dataset, AVG(mc_event_weight) AS w FROM {EVENTS} WHERE bcid < 900 "
    "GROUP BY dataset ORDER BY dataset",
    f"SELECT event_number, lumi_block FROM {EVENTS} WHERE bcid IN (3, 5) ORDER BY "
    "event_number LIMIT 20",
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryStores]:
    built = build_query_stores(tmp_path_factory.mktemp("scan"))
    try:
        yield built
    finally:
        built.events.close()


def settings(tmp_path: Path, **changes: object) -> QuerySettings:
    values: dict[str, object] = {
        "registry": str(tmp_path / "queries.sqlite"),
        "results_dir": str(tmp_path / "results"),
        "poll_seconds": 0.01,
    }
    values.update(changes)
    return QuerySettings.model_validate(values)


def test_one_read_per_unit_serves_every_query(stores: QueryStores) -> None:
    table = resolve_table(stores.catalog, EVENTS)
    walk = SharedScan(table, max_queries=8, max_rows=100_000)
    for number, sql in enumerate(QUERIES):
        walk.join(f"q{number}", compile_query(stores.catalog, sql, max_result_rows=10**5)[1])
    finished = {}
    while not walk.idle:
        for done in walk.step().finished:
            finished[done.query_id] = done
    assert walk.units_read == len(table.units)
    for number, sql in enumerate(QUERIES):
        done = finished[f"q{number}"]
        assert done.error is None
        assert done.units_done == done.units_shared == len(table.units)
        assert done.result is not None
        assert done.result.equals(run_everywhere(stores, sql))


def test_a_query_joining_mid_walk_finishes_where_it_joined(stores: QueryStores) -> None:
    table = resolve_table(stores.catalog, EVENTS)
    units = len(table.units)
    assert units >= 4
    walk = SharedScan(table, max_queries=8, max_rows=100_000)
    plan = compile_query(stores.catalog, QUERIES[0], max_result_rows=10**5)[1]
    walk.join("first", plan)
    walk.step()
    walk.step()
    late = walk.join("late", plan)
    assert late.joined_at == 2
    steps_after_join = 0
    finished_order = []
    while not walk.idle:
        report = walk.step()
        steps_after_join += 1
        finished_order += [(d.query_id, steps_after_join, d) for d in report.finished]
    (first_id, first_at, first), (late_id, late_at, late_done) = finished_order
    assert (first_id, first_at) == ("first", units - 2)
    assert (late_id, late_at) == ("late", units)
    assert late_done.units_shared == units - 2
    assert walk.units_read == units + 2
    assert late_done.result is not None and first.result is not None
    assert late_done.result.equals(first.result)


def test_a_failing_query_does_not_stop_the_walk(stores: QueryStores) -> None:
    table = resolve_table(stores.catalog, EVENTS)
    walk = SharedScan(table, max_queries=8, max_rows=500)
    good = compile_query(stores.catalog, QUERIES[0], max_result_rows=500)[1]
    too_big = compile_query(
        stores.catalog, f"SELECT event_number FROM {EVENTS}", max_result_rows=500
    )[1]
    walk.join("big", too_big)
    walk.join("good", good)
    finished = {}
    while not walk.idle:
        finished.update({d.query_id: d for d in walk.step().finished})
    assert finished["big"].error is not None and "500 rows" in finished["big"].error
    assert finished["big"].error_code == "too_many_rows"
    assert finished["good"].result is not None
    assert finished["good"].result.equals(run_everywhere(stores, QUERIES[0]))


def test_riders_skip_units_their_key_rules_out(stores: QueryStores) -> None:
    table = resolve_table(stores.catalog, EVENTS)
    run = stores.events.spec.run_numbers[0]
    sql = f"SELECT COUNT(*) AS n FROM {EVENTS} WHERE run_number = {run}"
    plan = compile_query(stores.catalog, sql, max_result_rows=100)[1]
    chosen = selected_units(table, plan)
    assert chosen is not None and 0 < len(chosen) < len(table.units)
    walk = SharedScan(table, max_queries=2, max_rows=100)
    walk.join("run", plan)
    results = []
    while not walk.idle:
        results += [d.result for d in walk.step().finished]
    assert walk.units_read == len(chosen)
    expected = sum(t.num_rows for name, t in stores.events.tables.items() if str(run) in name)
    assert results[0] is not None and results[0]["n"].to_pylist() == [expected]


def test_small_cones_and_key_picks_are_direct(stores: QueryStores) -> None:
    objects = resolve_table(stores.catalog, OBJECT_COLLECTION)
    small = compile_query(
        stores.catalog,
        f"SELECT object_id FROM {OBJECT_COLLECTION} WHERE CONE(ra, dec, 30, 10, 1)",
        max_result_rows=100,
    )[1]
    route = direct_route(objects, small, 2)
    assert route is not None and route.units == (0,)
    assert selected_units(objects, small) == [0]
    everywhere = compile_query(
        stores.catalog,
        f"SELECT object_id FROM {OBJECT_COLLECTION} WHERE CONE(ra, dec, 30, 10, 120)",
        max_result_rows=100,
    )[1]
    assert direct_route(objects, everywhere, 2) is None
    by_id = compile_query(
        stores.catalog,
        f"SELECT * FROM {OBJECT_COLLECTION} WHERE object_id = 17",
        max_result_rows=100,
    )[1]
    by_key = direct_route(objects, by_id, 0)
    # Read through the key index of every file whose key range may hold it.
    assert by_id.point_lookup and by_key is not None
    holders = tuple(i for i, u in enumerate(objects.units) if u.may_hold((17,), (17,)))
    assert by_key.units == holders
    assert set(by_key.bounds.values()) == {(((17,), (17,)),)}


def _submit(registry: QueryRegistry, stores: QueryStores, sql: str, who: str = "tester") -> str:
    _, plan = compile_query(stores.catalog, sql, max_result_rows=10**5)
    return registry.submit(sql, plan.table, who).id


def test_the_worker_answers_queued_queries(stores: QueryStores, tmp_path: Path) -> None:
    config = settings(tmp_path, max_queries_per_walk=2)
    with QueryRegistry(config.registry) as registry:
        ids = [_submit(registry, stores, sql) for sql in QUERIES]
        run = stores.events.spec.run_numbers[1]
        event = stores.events.tables[stores.events.dataset(run, "RAW")]["event_number"][5]
        pick = _submit(
            registry,
            stores,
            f"SELECT dataset, lumi_block FROM {EVENTS} WHERE run_number = {run} "
            f"AND event_number = {event} ORDER BY dataset",
        )
        bad = _submit(registry, stores, f"SELECT event_number FROM {EVENTS}")
        worker = ScanWorker(
            stores.catalog, registry, config.model_copy(update={"max_result_rows": 1000}), name="w1"
        )
        worker.run_once()
        # The cap: two seats on the walk, the other scans wait in the queue.
        assert worker.active == 2
        assert registry.get(pick).state is QueryState.DONE
        assert registry.get(pick).route == "direct"
        worker.run(threading.Event(), until_idle=True)
        for query_id, sql in zip(ids, QUERIES, strict=True):
            record = registry.get(query_id)
            assert record.state is QueryState.DONE, record.error
            assert record.route == "scan" and record.units_done == record.units_total
            assert record.result_path is not None
            assert pq.read_table(record.result_path).equals(run_everywhere(stores, sql))
        assert registry.get(bad).state is QueryState.FAILED
        assert registry.get(bad).error_code == "too_many_rows"
        picked = pq.read_table(registry.get(pick).result_path or "")
        holders = sorted(
            name
            for name, table in stores.events.tables.items()
            if str(run) in name and event.as_py() in table["event_number"].to_pylist()
        )
        assert picked["dataset"].to_pylist() == holders
        assert stores.events.dataset(run, "RAW") in holders


def test_cancel_and_restart(stores: QueryStores, tmp_path: Path) -> None:
    config = settings(tmp_path)
    with QueryRegistry(config.registry) as registry:
        keep = _submit(registry, stores, QUERIES[1])
        drop = _submit(registry, stores, QUERIES[2])
        first = ScanWorker(stores.catalog, registry, config, name="w")
        first.run_once()
        first.run_once()
        assert registry.get(keep).units_done == 2
        assert registry.cancel(drop).state is QueryState.CANCELLED
        first.run_once()
        assert drop not in first.walks[EVENTS].riders
        # The worker stops mid-walk; a new one of the same name resumes from the registry.
        second = ScanWorker(stores.catalog, registry, config, name="w")
        assert registry.get(keep).state is QueryState.QUEUED
        second.run(threading.Event(), until_idle=True)
        record = registry.get(keep)
        assert record.state is QueryState.DONE
        assert pq.read_table(record.result_path or "").equals(run_everywhere(stores, QUERIES[1]))
        assert registry.get(drop).state is QueryState.CANCELLED


def test_the_worker_process_runs_nicer_on_every_thread() -> None:
    # In a child process: niceness cannot be taken back without privileges.
    code = """
import json, os, threading
from pathlib import Path
import pyarrow
from eventindex.config import QuerySettings
from eventindex.query.scan import background_worker
started, stop = threading.Event(), threading.Event()
def idle():
    started.set()
    stop.wait(10)
thread = threading.Thread(target=idle)
thread.start()
started.wait()
before = os.getpriority(os.PRIO_PROCESS, 0)
after = background_worker(QuerySettings(worker_nice=3, worker_threads=1))
tasks = [int(t.name) for t in Path("/proc/self/task").iterdir()]
nice = sorted({os.getpriority(os.PRIO_PROCESS, t) for t in tasks})
stop.set()
thread.join()
print(json.dumps([before, after, nice, pyarrow.cpu_count(), len(tasks)]))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    before, after, nice, threads, tasks = json.loads(result.stdout)
    assert after == min(19, before + 3)
    assert tasks >= 2 and nice == [after]  # the thread started before, too
    assert threads == 1


class InProcessEvaluator:
    """A ``ScanEvaluator`` that runs each step's units here, as Spark's tasks would."""

    def __init__(self, units_per_step: int, *, broken: bool = False) -> None:
        self.units_per_step = units_per_step
        self.broken = broken
        self.steps: list[list[int]] = []

    def evaluate(
        self,
        table: ScanTable,
        work: Sequence[tuple[int, Sequence[tuple[str, str]]]],
        max_rows: int,
    ) -> list[UnitOutcome]:
        self.steps.append([unit for unit, _ in work])
        if self.broken:
            raise EventIndexError("executor lost")
        return [evaluate_unit(table, unit, queries, max_rows) for unit, queries in work]


def test_batched_steps_give_the_local_answers(stores: QueryStores) -> None:
    table = resolve_table(stores.catalog, EVENTS)
    units = len(table.units)
    evaluator = InProcessEvaluator(units_per_step=2)
    walk = SharedScan(table, max_queries=8, max_rows=100_000, evaluator=evaluator)
    plans = [compile_query(stores.catalog, sql, max_result_rows=10**5)[1] for sql in QUERIES]
    walk.join("first", plans[0])
    finished = {d.query_id: d for d in walk.step().finished}
    late = walk.join("late", plans[1])
    assert late.joined_at == 2 % units
    while not walk.idle:
        finished.update({d.query_id: d for d in walk.step().finished})
    # Each rider read every unit once; only the late rider's last two units were read
    # a second time.
    assert finished["first"].units_done == finished["late"].units_done == units
    assert finished["late"].units_shared == units - 2
    assert sum(len(step) for step in evaluator.steps) == walk.units_read == units + 2
    for name, sql in (("first", QUERIES[0]), ("late", QUERIES[1])):
        result = finished[name].result
        assert result is not None and result.equals(run_everywhere(stores, sql))

    broken = SharedScan(
        table, max_queries=8, max_rows=100, evaluator=InProcessEvaluator(3, broken=True)
    )
    broken.join("a", plans[0])
    broken.join("b", plans[2])
    failed = broken.step().finished
    assert broken.idle and {d.query_id for d in failed} == {"a", "b"}
    assert all(d.error is not None and "executor lost" in d.error for d in failed)
