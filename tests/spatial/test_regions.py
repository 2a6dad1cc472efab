"""Regions: exact containment, pruning that never misses a row, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from eventindex.spatial.chunker import Chunker, SpatialError
from eventindex.spatial.regions import Box, Circle, Polygon, Region, angular_separation

QSERV = Chunker()


def _sky(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 360.0, n), np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))


def _near(ra: float, dec: float, spread: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dec_values = np.clip(dec + rng.uniform(-spread, spread, n), -90.0, 90.0)
    return (ra + rng.uniform(-spread, spread, n)) % 360.0, dec_values


@pytest.mark.parametrize(
    "region",
    [
        Circle(10.0, 20.0, 1.0),
        Circle(0.01, -30.0, 0.05),
        Circle(180.0, 89.9, 0.5),
        Box(359.5, 0.5, -1.0, 1.0),
        Box(100.0, 102.0, 40.0, 41.0),
        Polygon([(10.0, 10.0), (12.0, 10.0), (12.0, 12.0), (10.0, 12.0)]),
        Polygon([(359.0, -1.0), (1.0, -1.0), (0.0, 1.0)]),
    ],
    ids=repr,
)
def test_pruning_keeps_every_row_inside(region: Region) -> None:
    if isinstance(region, Circle):
        centre = (region.ra, region.dec)
    elif isinstance(region, Box):
        centre = (region.ra_min, region.dec_min)
    else:
        assert isinstance(region, Polygon)
        centre = region.vertices[0]
    ra, dec = _near(centre[0], centre[1], 3.0, 20000, 1)
    inside = region.contains(ra, dec)
    assert inside.any()
    chunk, sub = QSERV.locate(ra[inside], dec[inside])
    touched = region.sub_chunks(QSERV)
    for c, s in zip(chunk, sub, strict=True):
        assert int(s) in touched[int(c)]
    assert sorted(touched) == region.chunks(QSERV)


def test_circle_contains_is_exact() -> None:
    ra, dec = _sky(50000, 2)
    circle = Circle(200.0, -40.0, 30.0)
    distance = angular_separation(200.0, -40.0, ra, dec)
    assert np.array_equal(circle.contains(ra, dec), distance <= 30.0)


def test_tiny_circle_is_exact() -> None:
    ra, dec = _near(45.0, 45.0, 2.0 / 3600.0, 20000, 3)
    circle = Circle(45.0, 45.0, 1.0 / 3600.0)
    distance = angular_separation(45.0, 45.0, ra, dec)
    decided = np.abs(distance - 1.0 / 3600.0) > 1e-12
    assert np.array_equal(circle.contains(ra, dec)[decided], (distance <= 1.0 / 3600.0)[decided])


def test_polygon_orientation_does_not_matter() -> None:
    ra, dec = _near(11.0, 11.0, 2.0, 5000, 4)
    square = [(10.0, 10.0), (12.0, 10.0), (12.0, 12.0), (10.0, 12.0)]
    assert np.array_equal(
        Polygon(square).contains(ra, dec), Polygon(square[::-1]).contains(ra, dec)
    )
    assert Polygon(square).contains(np.array([11.0]), np.array([11.0]))[0]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: Circle(10.0, 0.0, 0.0), "radius must be in"),
        (lambda: Circle(10.0, 0.0, -1.0), "radius must be in"),
        (lambda: Circle(10.0, 0.0, float("nan")), "radius must be in"),
        (lambda: Circle(360.0, 0.0, 1.0), "ra must be in"),
        (lambda: Circle(10.0, -91.0, 1.0), "dec must be in"),
        (lambda: Box(1.0, 2.0, 5.0, 4.0), "dec_min 5.0 is above"),
        (lambda: Box(1.0, 1.0, 4.0, 5.0), "zero width"),
        (lambda: Polygon([(0.0, 0.0), (1.0, 0.0)]), "at least 3 vertices"),
        (lambda: Polygon([(0.0, 0.0), (0.0, 0.0), (1.0, 1.0)]), "coincide"),
        (lambda: Polygon([(0.0, 0.0), (1.0, 0.0), (2.0, 0.0)]), "great circle"),
        (
            lambda: Polygon([(0.0, 0.0), (2.0, 0.0), (1.0, 0.5), (2.0, 2.0), (0.0, 2.0)]),
            "not convex",
        ),
        (lambda: Polygon([(0.0, 0.0), (2.0, 2.0), (2.0, 0.0), (0.0, 2.0)]), "not convex"),
    ],
)
def test_bad_regions_are_refused(make: object, message: str) -> None:
    with pytest.raises(SpatialError, match=message):
        make()  # type: ignore[operator]
