"""``eventindex spark partition --local`` then ``eventindex objects get|cone``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from eventindex.cli.app import app
from eventindex.spatial.regions import angular_separation
from tests.spatial.partition_data import object_table


def test_partition_get_and_cone(tmp_path: Path) -> None:
    table = object_table(2000)
    pq.write_table(table, tmp_path / "objects.parquet")
    base = [
        "--store", str(tmp_path / "store"),
        "--catalog", str(tmp_path / "catalog.sqlite"),
        "--set", "spatial.num_stripes=12",
        "--set", "spatial.num_sub_stripes=3",
        "--set", "spatial.overlap_arcsec=1800",
    ]  # fmt: skip
    runner = CliRunner()
    done = runner.invoke(
        app,
        [*base, "spark", "partition", str(tmp_path / "objects.parquet"), "-n", "sky", "--local",
         "-o", "json"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["rows"] == 2000 and summary["dataset"] == "sky.Object"
    assert summary["parameters"]["spatial.num_stripes"] == "12"

    row = table.slice(7, 1).to_pylist()[0]
    got = runner.invoke(app, [*base, "objects", "get", str(row["object_id"]), "-o", "json"])
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["objects"][0]["ra"] == row["ra"]
    assert runner.invoke(app, [*base, "objects", "get", "1"]).exit_code == 1

    cone = runner.invoke(app, [*base, "objects", "cone", "10", "5", "3600", "-o", "json"])
    assert cone.exit_code == 0, cone.output
    distance = angular_separation(10.0, 5.0, table["ra"], table["dec"])
    expected = sorted(table["object_id"].to_numpy()[distance <= 1.0].tolist())
    assert sorted(o["object_id"] for o in json.loads(cone.stdout)["objects"]) == expected
    bad = runner.invoke(app, [*base, "objects", "cone", "400", "5", "10"])
    assert bad.exit_code != 0
    again = runner.invoke(
        app,
        [*base, "spark", "partition", str(tmp_path / "objects.parquet"), "-n", "sky", "--local"],
    )
    assert again.exit_code != 0  # the table exists already


def test_chunks_per_file_setting_and_children(tmp_path: Path) -> None:
    from catalog.sqlite import SQLiteCatalog
    from eventindex.spatial.partition import CHUNKS_PER_FILE_ATTRIBUTE

    table = object_table(1000)
    pq.write_table(table, tmp_path / "objects.parquet")
    sources = table.select(["object_id"]).append_column("source_id", table["object_id"])
    pq.write_table(sources, tmp_path / "sources.parquet")
    base = [
        "--store", str(tmp_path / "store"),
        "--catalog", str(tmp_path / "catalog.sqlite"),
        "--set", "spatial.num_stripes=12",
        "--set", "spatial.num_sub_stripes=3",
    ]  # fmt: skip
    partition = ["spark", "partition", "-n", "sky", "--local"]
    runner = CliRunner()
    bad = runner.invoke(
        app, [*base, "--set", "spatial.chunks_per_file=0", *partition, str(tmp_path)]
    )
    assert bad.exit_code != 0 and "chunks_per_file" in f"{bad.output}{bad.exception}"
    done = runner.invoke(
        app,
        [*base, "--set", "spatial.chunks_per_file=8", *partition,
         str(tmp_path / "objects.parquet")],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    child = runner.invoke(
        app,
        [*base, *partition, str(tmp_path / "sources.parquet"), "--table", "Source",
         "--director", "sky.Object", "--child-key", "source_id"],
    )  # fmt: skip
    assert child.exit_code == 0, child.output
    with SQLiteCatalog(str(tmp_path / "catalog.sqlite")) as catalog:
        for name in ("sky.Object", "sky.Source"):
            assert catalog.get_dataset(name).attributes[CHUNKS_PER_FILE_ATTRIBUTE] == "8"
