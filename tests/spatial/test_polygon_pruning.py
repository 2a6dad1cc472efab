"""Polygons prune the grid tighter than their bounding box, and never drop a cell they hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lsst import sphgeom

from eventindex.spatial.chunker import Chunker
from eventindex.spatial.regions import Polygon, box_max_dot, unit_vectors

QSERV = Chunker(85, 12, 1.0 / 60.0)
COARSE = Chunker(12, 3, 0.5)


def _lonlat(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    ra = np.degrees(np.arctan2(unit[..., 1], unit[..., 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(unit[..., 2], -1.0, 1.0)))
    return ra, dec


def _random_polygon(rng: np.random.Generator, ra: float, dec: float, size: float) -> Polygon:
    """A convex polygon: 3-8 points of a small circle of ``size`` degrees around (ra, dec),
    at sorted random bearings no two closer than 10 degrees."""
    count = int(rng.integers(3, 9))
    while True:
        bearings = np.sort(rng.uniform(0.0, 2.0 * np.pi, count))
        gaps = np.diff(np.concatenate([bearings, [bearings[0] + 2.0 * np.pi]]))
        if gaps.min() > np.radians(10.0) and gaps.max() < np.pi * 0.95:
            break
    centre = unit_vectors(np.array([ra]), np.array([dec]))[0]
    east = np.cross([0.0, 0.0, 1.0], centre)
    east = east / np.linalg.norm(east) if np.linalg.norm(east) > 1e-9 else np.array([0, 1.0, 0])
    north = np.cross(centre, east)
    radius = np.radians(size)
    corners = np.cos(radius) * centre + np.sin(radius) * (
        np.cos(bearings)[:, None] * east + np.sin(bearings)[:, None] * north
    )
    ras, decs = _lonlat(corners)
    return Polygon(list(zip(ras.tolist(), decs.tolist(), strict=True)))


def _points_inside(rng: np.random.Generator, polygon: Polygon, n: int) -> np.ndarray:
    """Positive mixes of the vertices (inside by convexity): spread, hugging an edge, and
    the vertices themselves."""
    corners = polygon._corners
    weights = rng.dirichlet(np.ones(len(corners)), n)
    hugging = rng.dirichlet(np.ones(len(corners)), n)
    hugging[np.arange(n), rng.integers(0, len(corners), n)] *= 1e-9
    mixed = np.concatenate([weights, hugging]) @ corners
    return np.concatenate([mixed, corners])


CASES = [
    (10.0, 20.0, 3.0),  # plain
    (359.5, -5.0, 2.0),  # crossing ra = 0
    (0.2, 40.0, 8.0),  # crossing ra = 0, wide
    (123.0, 88.5, 2.0),  # around the north pole
    (250.0, -89.0, 3.0),  # around the south pole
    (45.0, 60.0, 0.3),  # small, high latitude
    (180.0, 0.0, 20.0),  # large
]


@pytest.mark.parametrize("chunker", [QSERV, COARSE], ids=["qserv", "coarse"])
@pytest.mark.parametrize(("ra", "dec", "size"), CASES)
def test_polygon_pruning_keeps_every_cell_of_a_point_inside(
    chunker: Chunker, ra: float, dec: float, size: float
) -> None:
    rng = np.random.default_rng(int(ra * 100 + dec * 10 + size))
    for _ in range(4):
        polygon = _random_polygon(rng, ra, dec, size)
        sub_chunks = polygon.sub_chunks(chunker)
        kept = {(c, int(s)) for c, subs in sub_chunks.items() for s in subs}
        chunks = set(polygon.chunks(chunker))
        # Brute force: every point of the polygon lies in a kept chunk and sub-chunk.
        vectors = _points_inside(rng, polygon, 3000)
        ras, decs = _lonlat(vectors)
        # Plus uniform random points of the polygon's cap that it contains.
        cap = rng.normal(size=(20000, 3)) * np.radians(size * 1.2) + polygon._corners.mean(0)
        cap_ra, cap_dec = _lonlat(cap)
        ras, decs = np.concatenate([ras, cap_ra]), np.concatenate([decs, cap_dec])
        inside = polygon.contains(ras, decs)
        assert inside.sum() > 3000
        chunk, sub = chunker.locate(ras[inside], decs[inside])
        assert set(zip(chunk.tolist(), sub.tolist(), strict=True)) <= kept
        assert set(chunk.tolist()) <= chunks
        # Tighter than (or as tight as) the bounding box, and consistent with chunks().
        grid = sphgeom.Chunker(chunker.num_stripes, chunker.num_sub_stripes)
        bbox = polygon.to_sphgeom()
        boxed = {(int(c), int(s)) for c, subs in grid.getSubChunksIntersecting(bbox) for s in subs}
        assert kept <= boxed
        assert set(sub_chunks) <= chunks <= {int(c) for c in grid.getChunksIntersecting(bbox)}
        assert all(len(subs) and list(subs) == sorted(subs) for subs in sub_chunks.values())


def test_a_thin_diagonal_polygon_touches_fewer_cells_than_its_box() -> None:
    # A strip 0.05 degrees wide from (10, 10) to (30, 25).
    polygon = Polygon([(10.0, 10.0), (30.0, 25.0), (30.0, 25.05), (10.0, 10.05)])
    grid = sphgeom.Chunker(QSERV.num_stripes, QSERV.num_sub_stripes)
    box = polygon.to_sphgeom()
    box_chunks = {int(c) for c in grid.getChunksIntersecting(box)}
    box_subs = sum(len(s) for _, s in grid.getSubChunksIntersecting(box))
    chunks = polygon.chunks(QSERV)
    subs = sum(len(s) for s in polygon.sub_chunks(QSERV).values())
    assert len(chunks) < len(box_chunks) / 3
    assert subs < box_subs / 10
    # Every chunk the strip's centre line passes through is kept.
    t = np.linspace(0.0, 1.0, 2001)[:, None]
    ras, decs = _lonlat((1 - t) * unit_vectors(np.array([10.0]), np.array([10.025])) +
                        t * unit_vectors(np.array([30.0]), np.array([25.025])))  # fmt: skip
    assert set(QSERV.locate(ras, decs)[0].tolist()) <= set(chunks)


def test_box_max_dot_matches_dense_sampling() -> None:
    rng = np.random.default_rng(5)
    normals = rng.normal(size=(40, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    normals[0] = [0.0, 0.0, 1.0]  # the equator: no preferred longitude
    lo = rng.uniform(-10.0, 350.0, 30)
    hi = lo + np.concatenate([rng.uniform(0.1, 60.0, 29), [360.0]])
    south = rng.uniform(-90.0, 80.0, 30)
    north = np.minimum(south + rng.uniform(0.1, 40.0, 30), 90.0)
    best = box_max_dot(normals, lo, hi, south, north)
    u = np.linspace(0.0, 1.0, 201)
    for i in range(30):
        ra = (lo[i] + u[:, None] * (hi[i] - lo[i])) + 0.0 * u[None, :]
        dec = south[i] + u[None, :] * (north[i] - south[i]) + 0.0 * u[:, None]
        sampled = (unit_vectors(ra.ravel(), dec.ravel()) @ normals.T).max(axis=0)
        # Exact maximum: never below a sample, and within the sampling step of the best one.
        assert np.all(best[i] >= sampled - 1e-12)
        assert np.all(best[i] - sampled < 2e-3)


def test_polygon_searches_match_brute_force(tmp_path: Path) -> None:
    from eventindex.query.objects import ObjectCatalogs
    from tests.spatial.partition_data import GRID, object_table, partition

    table = object_table(20000)
    done = partition(tmp_path, table)
    objects = ObjectCatalogs(done.catalog).table("sky.Object")
    ra, dec = table["ra"].to_numpy(), table["dec"].to_numpy()
    rng = np.random.default_rng(11)
    try:
        for centre_ra, centre_dec, size in [*CASES, (10.0, 5.0, 2.5), (0.0, 89.0, 15.0)]:
            polygon = _random_polygon(rng, centre_ra, centre_dec, max(size * 3, 6.0))
            found = objects.search(polygon, ["object_id"])["object_id"].to_numpy()
            expected = table["object_id"].to_numpy()[polygon.contains(ra, dec)]
            assert len(expected) > 0
            assert sorted(found.tolist()) == sorted(expected.tolist())
            assert objects.plan_search(polygon).sub_chunks.keys() <= set(polygon.chunks(GRID))
    finally:
        objects.close()
