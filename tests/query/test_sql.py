"""The query language: what it answers (checked against DuckDB on the same files) and
what it refuses (with a message naming the problem)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from eventindex.query.sql import SqlError, compile_query, parse_sql
from eventindex.query.tables import Cone, angular_distance_deg, resolve_table
from tests.query.scan_tables import (
    OBJECT_COLLECTION,
    OBJECT_DATASET,
    QueryStores,
    build_query_stores,
    run_everywhere,
)

EVENTS = "data15_13TeV.physics_Main"
RAW_PATTERN = "data15_13TeV.*.daq.RAW"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueryStores]:
    built = build_query_stores(tmp_path_factory.mktemp("sql"))
    try:
        yield built
    finally:
        built.events.close()


def duck(stores: QueryStores, table: str, sql: str) -> list[tuple[object, ...]]:
    """The same query by DuckDB over the table's files (``{files}`` stands for the table)."""
    files = ", ".join(f"'{uri}'" for uri in stores.unit_uris(table))
    relation = duckdb.sql(sql.format(files=f"read_parquet([{files}])"))
    assert relation is not None
    return relation.fetchall()


def rows(table: pa.Table) -> list[tuple[object, ...]]:
    return [tuple(row.values()) for row in table.to_pylist()]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            "SELECT COUNT(*), SUM(lumi_block), MIN(event_number), MAX(timestamp) FROM {t}",
            "SELECT COUNT(*), SUM(lumi_block), MIN(event_number), MAX(timestamp) FROM {files}",
        ),
        (
            "SELECT bcid, COUNT(*) AS n FROM {t} WHERE lumi_block BETWEEN 3 AND 9 "
            "AND NOT is_simulation GROUP BY bcid ORDER BY n DESC, bcid LIMIT 5",
            "SELECT bcid, COUNT(*) AS n FROM {files} WHERE lumi_block BETWEEN 3 AND 9 "
            "AND NOT is_simulation GROUP BY bcid ORDER BY n DESC, bcid LIMIT 5",
        ),
        (
            "SELECT run_number, event_number FROM {t} WHERE bcid IN (1, 2, 3, 500) "
            "OR (lumi_block > 20 AND bcid <> 7) ORDER BY event_number DESC LIMIT 7",
            "SELECT run_number, event_number FROM {files} WHERE bcid IN (1, 2, 3, 500) "
            "OR (lumi_block > 20 AND bcid <> 7) ORDER BY event_number DESC LIMIT 7",
        ),
        (
            "SELECT run_number, AVG(mc_event_weight) AS w, COUNT(lvl1_id) FROM {t} "
            "GROUP BY run_number ORDER BY run_number",
            "SELECT run_number, AVG(mc_event_weight), COUNT(lvl1_id) FROM {files} "
            "GROUP BY run_number ORDER BY run_number",
        ),
    ],
)
def test_event_queries_agree_with_duckdb(stores: QueryStores, ours: str, theirs: str) -> None:
    table = f'"{RAW_PATTERN}"'
    got = rows(run_everywhere(stores, ours.format(t=table)))
    expected = duck(stores, RAW_PATTERN, theirs)
    assert len(got) == len(expected) > 0
    for mine, other in zip(got, expected, strict=True):
        assert mine == pytest.approx(other)


def test_a_collection_is_every_dataset_and_has_a_dataset_column(stores: QueryStores) -> None:
    result = run_everywhere(
        stores, f"SELECT dataset, COUNT(*) AS n FROM {EVENTS} GROUP BY dataset ORDER BY dataset"
    )
    expected = {name: table.num_rows for name, table in stores.events.tables.items()}
    assert dict(rows(result)) == expected  # type: ignore[arg-type]


def test_empty_aggregates_are_zero_and_null(stores: QueryStores) -> None:
    result = run_everywhere(
        stores,
        f"SELECT COUNT(*) AS n, SUM(bcid) AS s, AVG(bcid) AS a FROM {EVENTS} WHERE bcid > 65535",
    )
    assert result.to_pylist() == [{"n": 0, "s": None, "a": None}]


def test_a_cone_is_the_exact_angular_distance(stores: QueryStores) -> None:
    ra0, dec0, radius = 350.0, -10.0, 25.0  # crosses ra = 0
    result = run_everywhere(
        stores,
        f"SELECT object_id FROM {OBJECT_COLLECTION} WHERE "
        f"scisql_s2PtInCircle(ra, dec, {ra0}, {dec0}, {radius}) = 1 ORDER BY object_id",
    )
    objects = stores.objects
    distance = angular_distance_deg(objects["ra"], objects["dec"], ra0, dec0)
    expected = np.sort(objects["object_id"].to_numpy()[distance <= radius])
    assert len(expected) > 20
    assert result["object_id"].to_pylist() == expected.tolist()
    outside = run_everywhere(
        stores,
        f"SELECT COUNT(*) AS n FROM {OBJECT_DATASET} WHERE NOT CONE(ra, dec, {ra0}, {dec0}, "
        f"{radius})",
    )
    assert outside["n"].to_pylist() == [objects.num_rows - len(expected)]


def test_angular_distance_matches_known_separations() -> None:
    assert angular_distance_deg([0.0], [90.0], 123.0, 0.0)[0] == pytest.approx(90.0)
    assert angular_distance_deg([359.5], [0.0], 0.5, 0.0)[0] == pytest.approx(1.0)
    assert angular_distance_deg([10.0], [60.0], 10.0, 60.0)[0] == 0.0
    arcsec = 1.0 / 3600.0
    assert angular_distance_deg([10.0 + arcsec], [0.0], 10.0, 0.0)[0] == pytest.approx(
        arcsec, rel=1e-6
    )


def test_cone_pruning_box() -> None:
    cone = Cone("ra", "dec", 359.0, 0.0, 2.0)
    assert cone.may_intersect((0.0, 10.0), (-5.0, 5.0))  # across ra = 0
    assert not cone.may_intersect((20.0, 30.0), (-5.0, 5.0))
    assert not cone.may_intersect((350.0, 360.0), (10.0, 20.0))
    assert Cone("ra", "dec", 0.0, 89.0, 2.0).may_intersect((180.0, 190.0), (88.0, 90.0))


def test_plans_carry_key_ranges_and_cones(stores: QueryStores) -> None:
    table, plan = compile_query(
        stores.catalog,
        f"SELECT * FROM {EVENTS} WHERE run_number = 284484 AND event_number IN (7, 5)",
        max_result_rows=10,
    )
    assert plan.point_lookup
    assert plan.key_bounds == (((284484, 5), (284484, 5)), ((284484, 7), (284484, 7)))
    _, ranged = compile_query(
        stores.catalog,
        f"SELECT bcid FROM {EVENTS} WHERE run_number BETWEEN 10 AND 284484 AND bcid > 4",
        max_result_rows=10,
    )
    assert ranged.key_bounds == (((10,), (284484,)),) and not ranged.point_lookup
    assert set(ranged.columns) == {"bcid", "run_number"}
    _, cone = compile_query(
        stores.catalog,
        f"SELECT object_id FROM {OBJECT_COLLECTION} WHERE CONE(ra, dec, 1, 2, 0.5) AND mag_g < 20",
        max_result_rows=10,
    )
    assert cone.cone == Cone("ra", "dec", 1.0, 2.0, 0.5)
    assert "dataset" in table.schema.names


def test_table_units_are_ordered(stores: QueryStores) -> None:
    chunks = resolve_table(stores.catalog, OBJECT_COLLECTION)
    assert [u.part for u in chunks.units] == [str(i) for i in range(6)]
    raw = resolve_table(stores.catalog, RAW_PATTERN)
    assert {u.dataset for u in raw.units} == {
        stores.events.dataset(run, "RAW") for run in stores.events.spec.run_numbers
    }


@pytest.mark.parametrize(
    ("sql", "code", "words"),
    [
        ("SELECT * FROM sky_sim a JOIN sky_sim b ON a.ra = b.ra", "unsupported", "joins"),
        ("SELECT * FROM (SELECT ra FROM sky_sim)", "unsupported", "subqueries"),
        ("SELECT ra FROM sky_sim WHERE ra IN (SELECT 1)", "unsupported", "subqueries"),
        ("SELECT COUNT(*) OVER () FROM sky_sim", "unsupported", "window"),
        ("SELECT ra FROM sky_sim UNION SELECT ra FROM sky_sim", "unsupported", "UNION"),
        ("SELECT DISTINCT band FROM sky_sim", "unsupported", "DISTINCT"),
        ("SELECT band FROM sky_sim GROUP BY band HAVING COUNT(*) > 1", "unsupported", "HAVING"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "unsupported", "WITH"),
        ("DELETE FROM sky_sim", "unsupported", "only SELECT"),
        ("SELECT 1; SELECT 2", "syntax", "one statement"),
        ("SELECT ra FROM", "syntax", ""),
        ("", "syntax", "empty"),
        ("SELECT ra", "syntax", "FROM"),
        ("SELECT nope FROM sky_sim", "unknown_column", "no column 'nope'"),
        ("SELECT ra FROM sky_sim WHERE nope = 1", "unknown_column", "nope"),
        ("SELECT ra FROM no_such_table", "unknown_table", "no table 'no_such_table'"),
        ('SELECT ra FROM "nothing.*"', "unknown_table", "no dataset matches"),
        ("SELECT ra FROM sky_sim WHERE band = 3", "type_error", "band"),
        ("SELECT ra FROM sky_sim WHERE ra = 'x'", "type_error", "ra"),
        ("SELECT SUM(band) FROM sky_sim", "type_error", "SUM(band)"),
        (
            "SELECT run_number FROM data15_13TeV.physics_Main WHERE run_number = -1",
            "type_error",
            "outside the range",
        ),
        (
            "SELECT run_number FROM data15_13TeV.physics_Main WHERE l1_tbp = 'ab'",
            "type_error",
            "cannot be compared",
        ),
        ("SELECT ra FROM sky_sim WHERE band = object_id", "type_error", "cannot compare"),
        ("SELECT sqrt(ra) FROM sky_sim", "unsupported", "sqrt"),
        ("SELECT ra FROM sky_sim WHERE lower(band) = 'g'", "unsupported", "lower"),
        ("SELECT ra + 1 FROM sky_sim", "unsupported", "SELECT takes columns"),
        ("SELECT COUNT(DISTINCT band) FROM sky_sim", "unsupported", "DISTINCT"),
        ("SELECT band, ra FROM sky_sim GROUP BY band", "unsupported", "GROUP BY"),
        ("SELECT ra FROM sky_sim ORDER BY dec", "unsupported", "ORDER BY"),
        ("SELECT ra, ra FROM sky_sim", "unsupported", "twice"),
        ("SELECT ra FROM sky_sim LIMIT 99999999", "too_many_rows", "LIMIT"),
        ("SELECT ra FROM sky_sim WHERE CONE(ra, dec, 1, 2)", "syntax", "cone takes"),
        ("SELECT ra FROM sky_sim WHERE CONE(ra, dec, 1, 95, 1)", "type_error", "dec"),
        ("SELECT ra FROM sky_sim WHERE CONE(ra, band, 1, 5, 1)", "type_error", "numeric"),
        (
            "SELECT ra FROM sky_sim WHERE scisql_s2PtInCircle(ra, dec, 1, 5, 1) = 2",
            "unsupported",
            "compared with 1",
        ),
        ("SELECT ra FROM sky_sim WHERE ra = NULL", "type_error", "IS NULL"),
    ],
)
def test_refused_with_a_reason(stores: QueryStores, sql: str, code: str, words: str) -> None:
    with pytest.raises(SqlError) as caught:
        compile_query(stores.catalog, sql, max_result_rows=1000)
    assert caught.value.code == code, str(caught.value)
    assert words in str(caught.value)


def test_dotted_and_quoted_table_names() -> None:
    assert parse_sql("SELECT a FROM data15_13TeV.physics_Main")[0] == "data15_13TeV.physics_Main"
    name = "data15_13TeV.00284484.physics_Main.daq.RAW"
    assert parse_sql(f'SELECT a FROM "{name}"')[0] == name
    assert math.isfinite(1.0)


@pytest.mark.parametrize(
    "where",
    [
        "lumi_block IN (1, 2) OR NOT (bcid BETWEEN 100 AND 2000)",
        "is_simulation OR (bcid > lumi_block AND timestamp_ns <= 500000000)",
        "NOT (mc_event_weight IS NULL) AND bcid < 1800 AND run_number <> 7",
    ],
)
def test_the_expression_and_the_row_mask_agree(stores: QueryStores, where: str) -> None:
    table, plan = compile_query(
        stores.catalog, f"SELECT event_number FROM {EVENTS} WHERE {where}", max_result_rows=10
    )
    assert plan.filter is not None and plan.row_mask is not None
    data = table.read_unit(table.units[0], plan.columns)
    by_expression = data.filter(plan.filter)
    assert 0 < by_expression.num_rows < data.num_rows
    assert by_expression.equals(data.filter(plan.row_mask(data)))


def test_the_cone_expression_and_mask_agree(stores: QueryStores) -> None:
    table, plan = compile_query(
        stores.catalog,
        f"SELECT object_id FROM {OBJECT_COLLECTION} WHERE CONE(ra, dec, 50, 30, 20)",
        max_result_rows=10,
    )
    assert plan.filter is not None and plan.row_mask is not None
    data = table.read_unit(table.units[0], plan.columns)
    assert data.filter(plan.filter).equals(data.filter(plan.row_mask(data)))
    assert data.filter(plan.filter).num_rows > 0
