"""Crossmatch and self-join against a brute-force reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from eventindex.errors import ValidationError
from eventindex.query.crossmatch import MatchMode, MatchSpec, crossmatch
from eventindex.query.objects import ObjectCatalogs, ObjectTable
from eventindex.spatial.chunker import Chunker
from eventindex.spatial.partition import PartitionedWriter, partition_local
from eventindex.spatial.regions import Box, angular_separation
from tests.spatial.partition_data import GRID, OPTIONS

SQ = np.newaxis


def catalogs(n: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """A left catalog round chunk corners (ra 0 wrap, a stripe edge, near a pole) and a
    right one with a perturbed copy of most left rows plus unrelated rows."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [30.0, 15.0], [100.0, -75.0], [200.0, 84.0]])
    pick = rng.integers(0, len(centres), n)
    ra = (centres[pick, 0] + rng.normal(0, 1.0, n)) % 360.0
    dec = np.clip(centres[pick, 1] + rng.normal(0, 1.0, n), -90, 90)
    left = pa.table({"object_id": np.arange(n, dtype=np.int64), "ra": ra, "dec": dec})
    moved = rng.random(n) < 0.8
    shift = rng.normal(0, 20.0 / 3600.0, (n, 2))
    r_ra = np.where(moved, ra + shift[:, 0], rng.uniform(0, 360, n)) % 360.0
    r_dec = np.clip(np.where(moved, dec + shift[:, 1], rng.uniform(-90, 90, n)), -90, 90)
    right = pa.table({"object_id": np.arange(n, dtype=np.int64) + 10**9, "ra": r_ra, "dec": r_dec})
    return left, right


def brute(
    left: pa.Table, right: pa.Table, radius_arcsec: float, self_join: bool
) -> set[tuple[int, int]]:
    distance = angular_separation(
        left["ra"].to_numpy()[:, SQ],
        left["dec"].to_numpy()[:, SQ],
        right["ra"].to_numpy()[SQ, :],
        right["dec"].to_numpy()[SQ, :],
    )
    li, ri = np.nonzero(distance <= radius_arcsec / 3600.0)
    lid, rid = left["object_id"].to_numpy()[li], right["object_id"].to_numpy()[ri]
    keep = lid != rid if self_join else np.ones(len(li), bool)
    return set(zip(lid[keep].tolist(), rid[keep].tolist(), strict=True))


@pytest.fixture(scope="module")
def tables(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[pa.Table, pa.Table, ObjectTable, ObjectTable]]:
    from catalog.sqlite import SQLiteCatalog

    tmp = tmp_path_factory.mktemp("xmatch")
    catalog = SQLiteCatalog(str(tmp / "c.sqlite"))
    left, right = catalogs(2500, 4)
    partition_local(
        [left], PartitionedWriter(catalog, str(tmp / "s"), "left", "Object", GRID, OPTIONS)
    )
    partition_local(
        [right], PartitionedWriter(catalog, str(tmp / "s"), "right", "Object", GRID, OPTIONS)
    )
    opened = ObjectCatalogs(catalog)
    yield left, right, opened.table("left"), opened.table("right")
    catalog.close()


@pytest.mark.parametrize("radius", [30.0, 600.0, 1800.0])
def test_all_pairs_match_brute_force(
    tables: tuple[pa.Table, pa.Table, ObjectTable, ObjectTable], radius: float
) -> None:
    left, right, lt, rt = tables
    found = crossmatch(lt, rt, MatchSpec(radius, MatchMode.ALL))
    pairs = list(zip(found["left_id"].to_pylist(), found["right_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == brute(left, right, radius, False)


def test_nearest_matches_brute_force(
    tables: tuple[pa.Table, pa.Table, ObjectTable, ObjectTable],
) -> None:
    left, right, lt, rt = tables
    found = crossmatch(lt, rt, MatchSpec(60.0, MatchMode.NEAREST))
    distance = angular_separation(
        left["ra"].to_numpy()[:, SQ],
        left["dec"].to_numpy()[:, SQ],
        right["ra"].to_numpy()[SQ, :],
        right["dec"].to_numpy()[SQ, :],
    )
    best = np.argmin(distance, axis=1)
    has = distance[np.arange(len(best)), best] <= 60.0 / 3600.0
    expected = {int(i): int(right["object_id"][int(best[i])].as_py()) for i in np.flatnonzero(has)}
    assert (
        dict(zip(found["left_id"].to_pylist(), found["right_id"].to_pylist(), strict=True))
        == expected
    )


def test_self_join_and_region(tables: tuple[pa.Table, pa.Table, ObjectTable, ObjectTable]) -> None:
    left, _, lt, _ = tables
    found = crossmatch(lt, lt, MatchSpec(300.0, MatchMode.ALL, self_join=True))
    pairs = set(zip(found["left_id"].to_pylist(), found["right_id"].to_pylist(), strict=True))
    assert pairs == brute(left, left, 300.0, True) and pairs
    box = Box(358.0, 2.0, -2.0, 2.0)
    inside = box.contains(left["ra"].to_numpy(), left["dec"].to_numpy())
    sub = crossmatch(lt, lt, MatchSpec(300.0, MatchMode.ALL, self_join=True), region=box)
    assert set(zip(sub["left_id"].to_pylist(), sub["right_id"].to_pylist(), strict=True)) == brute(
        left.filter(pa.array(inside)), left, 300.0, True
    )


def test_bad_matches_are_refused(
    tables: tuple[pa.Table, pa.Table, ObjectTable, ObjectTable], tmp_path: Path
) -> None:
    _, right, lt, rt = tables
    with pytest.raises(ValidationError, match="exceeds the overlap"):
        crossmatch(lt, rt, MatchSpec(1801.0))
    with pytest.raises(ValidationError, match="positive"):
        crossmatch(lt, rt, MatchSpec(0.0))
    from catalog.sqlite import SQLiteCatalog

    other = SQLiteCatalog(str(tmp_path / "o.sqlite"))
    partition_local(
        [right],
        PartitionedWriter(
            other, str(tmp_path / "s"), "odd", "Object", Chunker(12, 3, 0.25), OPTIONS
        ),
    )
    with pytest.raises(ValidationError, match="partitioned differently"):
        crossmatch(lt, ObjectCatalogs(other).table("odd"), MatchSpec(1.0))


@pytest.mark.parametrize("chunks_per_file", [1, 5])
def test_files_cut_into_other_runs_of_chunks_still_match(
    tables: tuple[pa.Table, pa.Table, ObjectTable, ObjectTable],
    tmp_path: Path,
    chunks_per_file: int,
) -> None:
    """A right table whose files hold other runs of chunks than the left's: each task
    reads every right file sharing a chunk with it, and pairs stay exact, once each."""
    from catalog.sqlite import SQLiteCatalog

    left, right, lt, _ = tables
    other = SQLiteCatalog(str(tmp_path / "o.sqlite"))
    writer = PartitionedWriter(
        other, str(tmp_path / "s"), "cut", "Object", GRID, OPTIONS, chunks_per_file=chunks_per_file
    )
    partition_local([right], writer)
    rt = ObjectCatalogs(other).table("cut")
    assert len(rt.chunk_files) > len(lt.chunk_files)
    found = crossmatch(lt, rt, MatchSpec(600.0, MatchMode.ALL))
    pairs = list(zip(found["left_id"].to_pylist(), found["right_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == brute(left, right, 600.0, False)
    back = crossmatch(rt, lt, MatchSpec(600.0, MatchMode.ALL))
    assert set(zip(back["right_id"].to_pylist(), back["left_id"].to_pylist(), strict=True)) == set(
        pairs
    )
    other.close()
