"""Queries over a table partitioned by the spatial partitioner: chunk files keyed by
sub-chunk, pruned by the partitioning grid, never duplicated by overlap files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import pytest

from eventindex.config import QuerySettings
from eventindex.query.jobs import submit
from eventindex.query.registry import QueryRegistry, QueryState
from eventindex.query.scan import SharedScan, direct_route, run_direct, selected_units
from eventindex.query.sql import compile_query
from eventindex.query.tables import angular_distance_deg
from tests.spatial.partition_data import Partitioned, object_table, partition


@pytest.fixture(scope="module")
def sky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Partitioned, str]]:
    partitioned = partition(tmp_path_factory.mktemp("sky"), object_table())
    (dataset,) = [d.name for d in partitioned.catalog.list_datasets()]
    try:
        yield partitioned, dataset
    finally:
        partitioned.catalog.close()


def test_a_small_cone_reads_only_the_chunks_the_grid_names(
    sky: tuple[Partitioned, str],
) -> None:
    partitioned, dataset = sky
    sql = f'SELECT object_id FROM "{dataset}" WHERE CONE(ra, dec, 10, 5, 1.5) ORDER BY object_id'
    table, plan = compile_query(partitioned.catalog, sql, max_result_rows=10_000)
    assert not table.key_ordered and dataset in table.grids
    chosen = selected_units(table, plan, read_positions=False)
    assert chosen is not None and 0 < len(chosen) < len(table.units)
    route = direct_route(table, plan, len(chosen), read_positions=False)
    assert route is not None and list(route.units) == chosen
    rows = partitioned.table
    distance = angular_distance_deg(rows["ra"], rows["dec"], 10.0, 5.0)
    expected = np.sort(rows["object_id"].to_numpy()[distance <= 1.5])
    assert len(expected) > 50
    assert run_direct(table, plan, 10_000, route)["object_id"].to_pylist() == expected.tolist()


def test_full_scans_and_ids_see_every_object_once(sky: tuple[Partitioned, str]) -> None:
    partitioned, dataset = sky
    rows = partitioned.table
    wanted = int(rows["object_id"][17].as_py())
    queries = [
        f'SELECT COUNT(*) AS n, MAX(object_id) AS top FROM "{dataset}"',
        f'SELECT object_id, ra FROM "{dataset}" WHERE object_id = {wanted}',
    ]
    plans = [compile_query(partitioned.catalog, q, max_result_rows=100)[1] for q in queries]
    table = compile_query(partitioned.catalog, queries[0], max_result_rows=100)[0]
    # Chunk files are keyed by sub-chunk: an id equality must not prune by key range.
    assert selected_units(table, plans[1]) is None
    walk = SharedScan(table, max_queries=4, max_rows=100)
    for number, plan in enumerate(plans):
        walk.join(str(number), plan)
    done = {}
    while not walk.idle:
        done.update({d.query_id: d.result for d in walk.step().finished})
    assert done["0"] is not None and done["1"] is not None
    assert done["0"].to_pylist() == [
        {"n": rows.num_rows, "top": int(np.max(rows["object_id"].to_numpy()))}
    ]
    assert done["1"]["object_id"].to_pylist() == [wanted]


def test_objects_by_id_are_read_through_the_director(
    sky: tuple[Partitioned, str], tmp_path: Path
) -> None:
    partitioned, dataset = sky
    rows = partitioned.table
    wanted = [int(rows["object_id"][i].as_py()) for i in (3, 2500, 5999)]
    absent = 2  # ids are 7k + 3
    listed = ", ".join(str(i) for i in [*wanted, absent])
    sql = f'SELECT object_id, mag FROM "{dataset}" WHERE object_id IN ({listed}) ORDER BY object_id'
    table, plan = compile_query(partitioned.catalog, sql, max_result_rows=100)
    # Without the catalog only a scan could answer it; the director names one key per id.
    assert direct_route(table, plan, 0) is None
    route = direct_route(table, plan, 0, catalog=partitioned.catalog)
    assert route is not None and 1 <= len(route.units) <= 3 < len(table.units)
    assert sorted(int(low[2]) for b in route.bounds.values() for low, _ in b) == sorted(wanted)
    answer = run_direct(table, plan, 100, route)
    expected = rows.filter(pa.compute.is_in(rows["object_id"], pa.array(wanted)))
    assert answer["object_id"].to_pylist() == sorted(wanted)
    by_id = dict(zip(expected["object_id"].to_pylist(), expected["mag"].to_pylist(), strict=True))
    assert answer["mag"].to_pylist() == [by_id[i] for i in sorted(wanted)]
    count = f'SELECT COUNT(*) AS n FROM "{dataset}" WHERE object_id = {absent}'
    table, plan = compile_query(partitioned.catalog, count, max_result_rows=100)
    nothing = direct_route(table, plan, 0, catalog=partitioned.catalog)
    assert nothing is not None and nothing.units == ()
    assert run_direct(table, plan, 100, nothing).to_pylist() == [{"n": 0}]

    # Submitted, it is answered at once, without a worker.
    config = QuerySettings.model_validate(
        {"registry": str(tmp_path / "q.sqlite"), "results_dir": str(tmp_path / "results")}
    )
    with QueryRegistry(config.registry) as registry:
        record = submit(partitioned.catalog, registry, config, sql, "tester")
        assert record.state is QueryState.DONE and record.route == "direct"
        assert pq.read_table(record.result_path or "").equals(answer)
