"""Queries over a table partitioned by the spatial partitioner: chunk files keyed by
sub-chunk, pruned by the partitioning grid, never duplicated by overlap files."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from eventindex.query.scan import SharedScan, is_direct, run_direct, selected_units
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
    assert is_direct(table, plan, len(chosen), read_positions=False)
    rows = partitioned.table
    distance = angular_distance_deg(rows["ra"], rows["dec"], 10.0, 5.0)
    expected = np.sort(rows["object_id"].to_numpy()[distance <= 1.5])
    assert len(expected) > 50
    assert run_direct(table, plan, 10_000, chosen)["object_id"].to_pylist() == expected.tolist()


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
