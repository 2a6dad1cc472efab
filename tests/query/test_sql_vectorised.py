"""numpy evaluation of shared units: block by block it gives what Arrow's kernels give
(the same rows, the same aggregate values and types), it falls back on them where it
must (nulls, NaN under MIN/MAX, strings, mixed signedness), and queries on one unit
share the work they have in common."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

import eventindex.query.sql as sql_module
from eventindex.query.sql import QueryAccumulator, UnitColumns, compile_query, feed_unit, plan_query
from eventindex.query.tables import DATASET_COLUMN, ScanTable, TableUnit
from eventindex.records.schema import RecordKind
from tests.query.scan_tables import OBJECT_COLLECTION, QueryStores, build_query_stores

EVENTS = "data15_13TeV.physics_Main"
RAW = '"data15_13TeV.*.daq.RAW"'


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryStores]:
    built = build_query_stores(tmp_path_factory.mktemp("vectorised"))
    try:
        yield built
    finally:
        built.events.close()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of an odd size, so that runs, LIMITs and groups straddle block edges."""
    monkeypatch.setattr(sql_module, "BLOCK_ROWS", 337)


def same(ours: pa.Table, theirs: pa.Table) -> None:
    """Equal tables: same schema and rows; floats to 1e-12 (summed in another order)."""
    assert ours.schema == theirs.schema
    assert ours.num_rows == theirs.num_rows
    for name in ours.column_names:
        left, right = ours[name].to_pylist(), theirs[name].to_pylist()
        if pa.types.is_floating(ours.schema.field(name).type):
            assert all(
                (a is None and b is None)
                or (math.isnan(a) and math.isnan(b))
                or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
                for a, b in zip(left, right, strict=True)
            ), name
        else:
            assert left == right, name


def by_arrow(table: ScanTable, accumulator: QueryAccumulator) -> pa.Table:
    for unit in table.units:
        accumulator.add_by_arrow(table.read_unit(unit, accumulator.plan.columns))
    return accumulator.result()


QUERIES = [
    # one group per file (constant keys), sorted runs, random keys, two keys, strings, bools
    f"SELECT run_number, COUNT(*) AS n, AVG(mc_event_weight) AS w, SUM(bcid) AS b FROM {EVENTS} "
    "WHERE lumi_block > 3 GROUP BY run_number ORDER BY run_number",
    f"SELECT lumi_block, MAX(bcid) AS m, MIN(timestamp) AS t, COUNT(lvl1_id) AS c FROM {RAW} "
    "WHERE bcid > 900 GROUP BY lumi_block ORDER BY lumi_block",
    f"SELECT bcid, COUNT(*) AS n, SUM(lumi_block) AS s FROM {EVENTS} WHERE lumi_block < 12 "
    "GROUP BY bcid ORDER BY n DESC, bcid LIMIT 20",
    f"SELECT run_number, lumi_block, COUNT(*) AS n FROM {EVENTS} WHERE NOT (bcid BETWEEN 10 AND "
    "1500) GROUP BY run_number, lumi_block ORDER BY run_number, lumi_block",
    f"SELECT dataset, COUNT(*) AS n, MAX(mc_event_weight) AS w FROM {EVENTS} "
    "GROUP BY dataset ORDER BY dataset",
    f"SELECT is_simulation, COUNT(*) AS n FROM {EVENTS} GROUP BY is_simulation",
    # scattered keys under a dense mask (arithmetic) and a sparse one (indexing)
    f"SELECT bcid, MIN(mc_event_weight) AS w, MAX(timestamp) AS t, SUM(event_number) AS e "
    f"FROM {EVENTS} WHERE lumi_block > 2 GROUP BY bcid ORDER BY bcid",
    f"SELECT bcid, MAX(mc_event_weight) AS w, SUM(lumi_block) AS s, COUNT(*) AS n "
    f"FROM {EVENTS} WHERE bcid < 60 GROUP BY bcid ORDER BY bcid",
    f"SELECT MIN(mc_event_weight) AS lo, MAX(mc_event_weight) AS hi, MIN(bcid) AS b, "
    f"SUM(mc_event_weight) AS s FROM {EVENTS} WHERE lumi_block > 2",
    f"SELECT SUM(lumi_block) AS s, MIN(mc_event_weight) AS lo, MAX(bcid) AS hi "
    f"FROM {EVENTS} WHERE bcid < 60",
    f"SELECT lumi_block, SUM(bcid) AS s, AVG(mc_event_weight) AS w FROM {EVENTS} "
    "WHERE bcid > 900 GROUP BY lumi_block ORDER BY lumi_block",
    f"SELECT event_number, timestamp FROM {EVENTS} LIMIT 700",
    # totals: exact sums past 2^53 (event numbers), MIN/MAX of floats, strings, empty
    f"SELECT SUM(event_number) AS e, MIN(mc_event_weight) AS lo, MAX(mc_event_weight) AS hi, "
    f"COUNT(*) AS n FROM {EVENTS} WHERE bcid IN (3, 5, 7, 11) OR lumi_block = 4",
    f"SELECT MIN(dataset) AS first, MAX(dataset) AS last FROM {EVENTS} WHERE bcid < 2000",
    f"SELECT COUNT(*) AS n, SUM(bcid) AS s, MIN(bcid) AS m FROM {EVENTS} WHERE bcid > 65535",
    # conditions numpy states and those it leaves to Arrow
    f"SELECT COUNT(*) AS n FROM {EVENTS} WHERE bcid > lumi_block AND event_number > lvl1_id",
    f"SELECT COUNT(*) AS n FROM {EVENTS} WHERE bcid IN (1.5, 2, 3) OR lumi_block > 2.5",
    f"SELECT COUNT(*) AS n FROM {EVENTS} WHERE dataset <> 'x' AND NOT is_calibration "
    f"AND lumi_block IN ({', '.join(str(i) for i in range(1, 40, 2))})",
    f"SELECT COUNT(*) AS n FROM {EVENTS} WHERE mc_event_weight IS NULL OR bcid = 7",
    # rows: the first ones (LIMIT without ORDER BY), ordered, nested columns
    f"SELECT run_number, event_number, bcid FROM {EVENTS} WHERE bcid < 300 LIMIT 500",
    f"SELECT event_number, dataset FROM {EVENTS} WHERE lumi_block = 3 ORDER BY event_number "
    "DESC LIMIT 40",
    f"SELECT event_number, l1_tbp, smk FROM {RAW} WHERE bcid = 17",
    f"SELECT object_id, ra FROM {OBJECT_COLLECTION} WHERE CONE(ra, dec, 40, -20, 30) "
    "ORDER BY object_id",
    f"SELECT band, COUNT(*) AS n, AVG(mag_g) AS g FROM {OBJECT_COLLECTION} "
    "WHERE mag_g < 20 GROUP BY band ORDER BY band",
]


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("sql", QUERIES)
def test_numpy_gives_what_arrow_gives(stores: QueryStores, sql: str) -> None:
    table, plan = compile_query(stores.catalog, sql, max_result_rows=100_000)
    ours = plan.accumulator(100_000)
    for unit in table.units:
        ours.add(table.read_unit(unit, plan.columns))
    theirs = by_arrow(table, plan.accumulator(100_000))
    same(ours.result(), theirs)
    assert ours.result().num_rows > 0


@pytest.mark.usefixtures("small_blocks")
def test_queries_fed_together_answer_as_alone(stores: QueryStores) -> None:
    compiled = [compile_query(stores.catalog, q, max_result_rows=100_000) for q in QUERIES[:16]]
    event_plans = [plan for table, plan in compiled if table.name == EVENTS]
    table = compiled[0][0]
    together = [p.accumulator(100_000) for p in event_plans]
    alone = [p.accumulator(100_000) for p in event_plans]
    columns = sorted({c for p in event_plans for c in p.columns})
    for unit in table.units:
        data = table.read_unit(unit, columns)
        assert feed_unit(together, data) == [None] * len(together)
        for accumulator in alone:
            accumulator.add(data)
    for shared, single in zip(together, alone, strict=True):
        assert shared.result().equals(single.result())


def test_a_shared_condition_is_computed_once_per_unit(stores: QueryStores) -> None:
    where = "WHERE bcid BETWEEN 100 AND 900 AND lumi_block <> 3"
    first = compile_query(
        stores.catalog, f"SELECT COUNT(*) AS n FROM {EVENTS} {where}", max_result_rows=10
    )
    second = compile_query(
        stores.catalog, f"SELECT MAX(bcid) AS m FROM {EVENTS} {where}", max_result_rows=10
    )
    other = compile_query(
        stores.catalog,
        f"SELECT COUNT(*) AS n FROM {EVENTS} WHERE lumi_block <> 3",
        max_result_rows=10,
    )
    table = first[0]
    unit = UnitColumns(table.read_unit(table.units[0], ["lumi_block", "bcid"]))
    conditions = [c[1].condition for c in (first, second, other)]
    assert all(c is not None for c in conditions)
    first_mask = unit.mask(conditions[0])  # type: ignore[arg-type]
    assert first_mask is not None and 0 < first_mask.sum() < unit.rows
    assert unit.mask(conditions[1]) is first_mask  # type: ignore[arg-type]
    # The shared sub-condition (lumi_block <> 3) is the same array for the third query.
    inner = conditions[2]
    assert inner is not None
    assert unit._vector(inner) is unit._vector(conditions[0].arguments[1])  # type: ignore[union-attr]


def _loose_table() -> tuple[ScanTable, pa.Table]:
    """A table with nulls, NaN, signed and unsigned 64-bit columns and strings."""
    data = pa.table(
        {
            "g": pa.array([1, 1, 2, 2, 3, 3, 3, 1], pa.int32()),
            "x": pa.array([5, None, 7, 1, 2, 9, 4, 3], pa.int64()),
            "f": pa.array([1.5, float("nan"), 0.5, 2.5, -1.0, 3.0, 0.0, 4.0], pa.float64()),
            "u": pa.array([2**62 + 1, 1, 2, 3, 4, 5, 6, 7], pa.uint64()),
            "i": pa.array([-1, 1, 2, 3, 4, 5, 6, 7], pa.int64()),
            "s": pa.array(["a", "b", None, "d", "e", "f", "g", "h"]),
            "h": pa.array([-2.5, math.inf, 0.5, -math.inf, -0.0, 3.25, -7.0, 1e300]),
        }
    )
    unit = TableUnit("f1", "loose", "/nonexistent", data.num_rows, (0,), (1,))
    schema = data.schema.append(pa.field(DATASET_COLUMN, pa.string(), nullable=False))
    table = ScanTable("loose", "loose", RecordKind.OBJECTS, ("g",), schema, (unit,), True)
    return table, data


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT g, COUNT(*) AS n, COUNT(x) AS c, SUM(x) AS s, MIN(x) AS m FROM loose GROUP BY g",
        "SELECT g, MIN(f) AS lo, MAX(f) AS hi, SUM(f) AS s FROM loose GROUP BY g ORDER BY g",
        "SELECT MIN(f) AS lo, MAX(f) AS hi FROM loose WHERE g < 3",
        "SELECT COUNT(*) AS n FROM loose WHERE u > i",
        "SELECT g, u FROM loose WHERE u >= i ORDER BY g, u",
        "SELECT COUNT(*) AS n FROM loose WHERE s IS NULL OR s > 'c'",
        "SELECT g, COUNT(*) AS n FROM loose WHERE NOT (x > 3) GROUP BY g ORDER BY g",
        "SELECT g, MIN(i) AS lo, MAX(i) AS hi, SUM(i) AS s FROM loose WHERE i > -5 GROUP BY g",
        "SELECT g, MIN(h) AS lo, MAX(h) AS hi, SUM(h) AS s FROM loose WHERE g > 1 GROUP BY g",
        "SELECT MIN(h) AS lo, MAX(h) AS hi, MIN(i) AS i, SUM(h) AS s FROM loose WHERE g <> 2",
    ],
)
@pytest.mark.parametrize("block_rows", [3, 1000])
def test_nulls_nan_and_mixed_types_match_arrow(
    sql: str, block_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_module, "BLOCK_ROWS", block_rows)
    table, data = _loose_table()
    plan = plan_query(sql, table, max_result_rows=100)
    ours = plan.accumulator(100)
    ours.add(data)
    theirs = plan.accumulator(100)
    theirs.add_by_arrow(data)
    result = ours.result()
    same(result, theirs.result())
    if "MIN(f)" in sql and "GROUP BY" not in sql:
        # Arrow's MIN/MAX skip NaN: so does ours.
        assert result.to_pylist() == [{"lo": 0.5, "hi": 4.0}]


@pytest.mark.parametrize("where", ["", "WHERE g > 0", "WHERE v > 0 AND g <> 7"])
def test_integer_sums_are_exact_past_two_to_the_53(where: str) -> None:
    big = 2**61 + 1
    data = pa.table({"g": pa.array([1, 1, 1, 2], pa.int32()), "v": pa.array([big] * 4, pa.int64())})
    unit = TableUnit("f1", "big", "/nonexistent", data.num_rows, (0,), (1,))
    table = ScanTable("big", "big", RecordKind.OBJECTS, ("g",), data.schema, (unit,), False)
    plan = plan_query(
        f"SELECT g, SUM(v) AS s FROM big {where} GROUP BY g ORDER BY g", table, max_result_rows=9
    )
    accumulator = plan.accumulator(9)
    accumulator.add(data)
    assert accumulator.result().to_pylist() == [{"g": 1, "s": 3 * big}, {"g": 2, "s": big}]
    assert float(3 * big) != 3 * big  # a float64 sum would have lost it


def test_group_codes_of_runs_and_of_scattered_keys() -> None:
    rows = 10_000
    sorted_keys = np.repeat(np.arange(40, dtype=np.uint32) + 7, rows // 40)
    scattered = np.random.default_rng(3).integers(0, 500, rows).astype(np.uint16)
    unit = UnitColumns(pa.table({"lumi": sorted_keys, "bcid": scattered}))
    runs = unit.groups(("lumi",))
    assert runs is not None and runs.starts is not None and len(runs.starts) == 40
    assert runs.size == 40 and runs.codes is not None and runs.codes.dtype == np.uint8
    assert runs.keys(np.array([0, 39]))[0].to_pylist() == [7, 46]
    spread = unit.groups(("bcid",))
    assert spread is not None and spread.starts is None
    both = unit.groups(("lumi", "bcid"))
    width = int(scattered.max()) - int(scattered.min()) + 1
    assert both is not None and both.size == 40 * width and both.starts is None
    for block in unit.blocks(999):
        sliced = block.groups(("lumi",))
        assert sliced is not None and sliced.starts is not None and sliced.starts[0] == 0
        assert sliced.codes is not None and len(sliced.codes) == block.rows
        assert sliced.run_codes is not None
        assert np.array_equal(sliced.run_codes, sliced.codes[sliced.starts])
