"""Sky regions (circle, box, convex polygon): validated, with an exact per-row test.

Each region answers two questions, split as lsdb splits its searches: which
chunks and sub-chunks it may touch (``lsst.sphgeom`` prunes the grid, from
metadata alone; a polygon then drops the cells of its bounding box that it
cannot reach, ``Polygon.may_touch``) and which rows it holds (``contains``,
vectorised, exact).
Angles are degrees; right ascension in [0, 360), declination in [-90, 90].
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from lsst import sphgeom

from eventindex.spatial.chunker import (
    Chunker,
    FloatArray,
    IntArray,
    SpatialError,
    check_positions,
)

BoolArray = npt.NDArray[np.bool_]
# Pruning regions are widened by this much, so rounding at a cell edge never drops a row.
_PRUNE_MARGIN_DEG = 1e-9
# A cell is outside a great circle's hemisphere when its nearest point is below this
# (dot products of unit vectors, well above their rounding error).
_PRUNE_MARGIN_DOT = -1e-12
# Cells tested against a polygon at a time: bounds the (cells, edges) temporaries.
_PRUNE_BLOCK = 1 << 15


def unit_vectors(ra: FloatArray, dec: FloatArray) -> FloatArray:
    """(n, 3) unit vectors of positions given in degrees."""
    ra_rad = np.radians(ra)
    dec_rad = np.radians(dec)
    cos_dec = np.cos(dec_rad)
    return np.stack([cos_dec * np.cos(ra_rad), cos_dec * np.sin(ra_rad), np.sin(dec_rad)], axis=-1)


def angular_separation(
    ra1: npt.ArrayLike, dec1: npt.ArrayLike, ra2: npt.ArrayLike, dec2: npt.ArrayLike
) -> FloatArray:
    """Great-circle distance in degrees (haversine: exact for tiny angles too)."""
    lon1, lat1 = np.radians(np.asarray(ra1, np.float64)), np.radians(np.asarray(dec1, np.float64))
    lon2, lat2 = np.radians(np.asarray(ra2, np.float64)), np.radians(np.asarray(dec2, np.float64))
    half = (
        np.sin((lat2 - lat1) / 2.0) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2.0) ** 2
    )
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(half, 0.0, 1.0))))  # type: ignore[no-any-return]


def box_max_dot(
    normals: FloatArray,
    ra_min: FloatArray,
    ra_max: FloatArray,
    dec_min: FloatArray,
    dec_max: FloatArray,
) -> FloatArray:
    """(cells, normals): the largest ``n·x`` over each lon/lat box (degrees, ``ra_min <
    ra_max``, possibly beyond [0, 360)) of each unit normal ``n``, exactly.

    On the box ``n·x = cos(dec)·r·cos(ra - ra0) + n_z·sin(dec)``: since ``cos(dec) ≥ 0``
    the best ``ra`` is ``ra0`` if the box holds it, else the nearer edge, whatever the
    ``dec``; then ``a·cos(dec) + n_z·sin(dec)`` peaks at ``atan2(n_z, a)`` if the box
    holds it, else at the nearer edge.
    """
    r = np.hypot(normals[:, 0], normals[:, 1])[None, :]
    nz = normals[:, 2][None, :]
    ra0 = np.degrees(np.arctan2(normals[:, 1], normals[:, 0]))[None, :]
    lo, hi = ra_min[:, None], ra_max[:, None]
    width = hi - lo
    holds_ra0 = (width >= 360.0) | (np.mod(ra0 - lo, 360.0) <= width)
    edge = np.maximum(np.cos(np.radians(lo - ra0)), np.cos(np.radians(hi - ra0)))
    a = r * np.where(holds_ra0, 1.0, edge)
    peak = np.degrees(np.arctan2(nz, a))
    south, north = dec_min[:, None], dec_max[:, None]
    holds_peak = (peak >= south) & (peak <= north)

    def at(dec: FloatArray) -> FloatArray:
        rad = np.radians(dec)
        value: FloatArray = a * np.cos(rad) + nz * np.sin(rad)
        return value

    best: FloatArray = np.where(holds_peak, np.hypot(a, nz), np.maximum(at(south), at(north)))
    return best


def chord_squared(radius_deg: float) -> float:
    """Squared chord length of an angle: compare with squared vector distances."""
    return float((2.0 * math.sin(math.radians(radius_deg) / 2.0)) ** 2)


def _check_angle(name: str, value: float, low: float, high: float) -> float:
    number = float(value)
    if not (low <= number <= high):
        raise SpatialError(f"{name} must be in [{low:g}, {high:g}] degrees, not {value!r}")
    return number


def _check_point(ra: float, dec: float, where: str) -> tuple[float, float]:
    try:
        check_positions(np.array([ra]), np.array([dec]))
    except SpatialError as exc:
        raise SpatialError(f"{where}: {exc}".replace(": row 0 has", ": got")) from None
    return float(ra), float(dec)


class Region(abc.ABC):
    """A region of the sky."""

    @abc.abstractmethod
    def to_sphgeom(self) -> sphgeom.Region:
        """An ``lsst.sphgeom`` region covering this one (slightly widened) for pruning."""

    @abc.abstractmethod
    def contains(self, ra: FloatArray, dec: FloatArray) -> BoolArray:
        """Which positions lie inside, exactly."""

    def sub_chunks(self, chunker: Chunker) -> dict[int, IntArray]:
        """The chunks the region may touch, each with the sub-chunks it may touch."""
        grid = sphgeom.Chunker(chunker.num_stripes, chunker.num_sub_stripes)
        touched = grid.getSubChunksIntersecting(self.to_sphgeom())
        return {int(chunk): np.asarray(sorted(subs), dtype=np.int64) for chunk, subs in touched}

    def chunks(self, chunker: Chunker) -> list[int]:
        grid = sphgeom.Chunker(chunker.num_stripes, chunker.num_sub_stripes)
        return sorted(int(c) for c in grid.getChunksIntersecting(self.to_sphgeom()))


@dataclass(frozen=True)
class Circle(Region):
    """Every position within ``radius`` degrees (great circle) of (ra, dec)."""

    ra: float
    dec: float
    radius: float

    def __post_init__(self) -> None:
        _check_point(self.ra, self.dec, "circle centre")
        if not (math.isfinite(self.radius) and 0.0 < self.radius <= 180.0):
            raise SpatialError(f"radius must be in (0, 180] degrees, not {self.radius!r}")

    def to_sphgeom(self) -> sphgeom.Region:
        centre = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(self.ra, self.dec))
        radius = min(self.radius + _PRUNE_MARGIN_DEG, 180.0)
        return sphgeom.Circle(centre, sphgeom.Angle.fromDegrees(radius))

    def contains(self, ra: FloatArray, dec: FloatArray) -> BoolArray:
        centre = unit_vectors(np.array([self.ra]), np.array([self.dec]))[0]
        delta = unit_vectors(ra, dec) - centre
        inside: BoolArray = np.einsum("ij,ij->i", delta, delta) <= chord_squared(self.radius)
        return inside


@dataclass(frozen=True)
class Box(Region):
    """ra in [ra_min, ra_max] (wrapping through 0 when ra_min > ra_max), dec in
    [dec_min, dec_max]."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    def __post_init__(self) -> None:
        _check_angle("ra_min", self.ra_min, 0.0, 360.0)
        _check_angle("ra_max", self.ra_max, 0.0, 360.0)
        _check_angle("dec_min", self.dec_min, -90.0, 90.0)
        _check_angle("dec_max", self.dec_max, -90.0, 90.0)
        if self.dec_min > self.dec_max:
            raise SpatialError(f"dec_min {self.dec_min} is above dec_max {self.dec_max}")
        if self.ra_min == self.ra_max:
            raise SpatialError(f"box of zero width: ra_min = ra_max = {self.ra_min}")

    def to_sphgeom(self) -> sphgeom.Region:
        lon = sphgeom.NormalizedAngleInterval.fromDegrees(self.ra_min, self.ra_max)
        lat = sphgeom.AngleInterval.fromDegrees(self.dec_min, self.dec_max)
        return sphgeom.Box(lon, lat).dilatedBy(sphgeom.Angle.fromDegrees(_PRUNE_MARGIN_DEG))

    def contains(self, ra: FloatArray, dec: FloatArray) -> BoolArray:
        in_dec = (dec >= self.dec_min) & (dec <= self.dec_max)
        if self.ra_min < self.ra_max:
            in_ra = (ra >= self.ra_min) & (ra <= self.ra_max)
        else:
            in_ra = (ra >= self.ra_min) | (ra <= self.ra_max)
        inside: BoolArray = in_dec & in_ra
        return inside


class Polygon(Region):
    """A convex spherical polygon: vertices (ra, dec) in order, either orientation.

    Fewer than three distinct vertices, coincident or antipodal neighbours, three
    vertices on one great circle, or a vertex on the outer side of an edge
    (not convex) are refused.
    """

    def __init__(self, vertices: Sequence[tuple[float, float]]) -> None:
        if len(vertices) < 3:
            raise SpatialError(f"a polygon needs at least 3 vertices, got {len(vertices)}")
        points = [_check_point(ra, dec, f"vertex {i}") for i, (ra, dec) in enumerate(vertices)]
        self.vertices: tuple[tuple[float, float], ...] = tuple(points)
        ras, decs = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        corners = unit_vectors(ras, decs)
        normals = np.cross(corners, np.roll(corners, -1, axis=0))
        lengths = np.linalg.norm(normals, axis=1)
        short = np.flatnonzero(lengths < 1e-12)
        if len(short):
            i = int(short[0])
            raise SpatialError(
                f"degenerate polygon: vertices {i} and {(i + 1) % len(points)} coincide "
                "or are antipodal"
            )
        normals /= lengths[:, None]
        # side[i, j]: which side of edge i vertex j lies on.
        side = normals @ corners.T
        n = len(points)
        on_edge = np.zeros((n, n), dtype=bool)
        on_edge[np.arange(n), np.arange(n)] = True
        on_edge[np.arange(n), (np.arange(n) + 1) % n] = True
        others = side[~on_edge]
        if np.all(np.abs(others) < 1e-12):
            raise SpatialError("degenerate polygon: every vertex lies on one great circle")
        if np.all(others > -1e-12):
            self._normals = normals
        elif np.all(others < 1e-12):
            self._normals = -normals  # clockwise: flip so the inside is positive
        else:
            raise SpatialError("polygon is not convex (or its edges cross)")
        if np.any(np.abs(others) < 1e-12):
            raise SpatialError("degenerate polygon: three vertices lie on one great circle")
        self._corners = corners

    def __repr__(self) -> str:
        return f"Polygon({list(self.vertices)!r})"

    def to_sphgeom(self) -> sphgeom.Region:
        polygon = sphgeom.ConvexPolygon([sphgeom.UnitVector3d(*v) for v in self._corners])
        # A convex polygon cannot be dilated in sphgeom: prune with its bounding box, widened.
        box = polygon.getBoundingBox()
        return box.dilatedBy(sphgeom.Angle.fromDegrees(_PRUNE_MARGIN_DEG))

    def contains(self, ra: FloatArray, dec: FloatArray) -> BoolArray:
        inside: BoolArray = np.all(unit_vectors(ra, dec) @ self._normals.T >= 0.0, axis=1)
        return inside

    def sub_chunks(self, chunker: Chunker) -> dict[int, IntArray]:
        """The sub-chunks of the bounding box's that the polygon itself may touch."""
        grid = sphgeom.Chunker(chunker.num_stripes, chunker.num_sub_stripes)
        touched = grid.getSubChunksIntersecting(self.to_sphgeom())
        if not touched:
            return {}
        # Chunks first (few): the sub-chunks of those kept alone are then tested.
        chunk_ids = np.array([c for c, _ in touched], dtype=np.int64)
        near = self.may_touch(*chunker.chunk_boxes(chunk_ids))
        subs = [
            np.asarray(sorted(s), dtype=np.int64)
            for (_, s), n in zip(touched, near, strict=True)
            if n
        ]
        if not subs:
            return {}
        chunk = np.repeat(chunk_ids[near], [len(s) for s in subs])
        sub = np.concatenate(subs)
        keep = self.may_touch(*chunker.sub_chunk_boxes(chunk, sub))
        chunk, sub = chunk[keep], sub[keep]
        cuts = np.flatnonzero(np.diff(chunk)) + 1
        return {
            int(c[0]): s
            for c, s in zip(np.split(chunk, cuts), np.split(sub, cuts), strict=True)
            if len(c)
        }

    def chunks(self, chunker: Chunker) -> list[int]:
        """The chunks of the bounding box's that the polygon itself may touch."""
        found = np.asarray(super().chunks(chunker), dtype=np.int64)
        return [int(c) for c in found[self.may_touch(*chunker.chunk_boxes(found))]]

    def may_touch(
        self, ra_min: FloatArray, ra_max: FloatArray, dec_min: FloatArray, dec_max: FloatArray
    ) -> BoolArray:
        """Which lon/lat boxes (cells of the grid) the polygon may overlap: conservative,
        never false for a box that holds a point of the polygon.

        A box is dropped when one great circle separates it from the polygon: an edge
        of the polygon with the whole box outside it, or a meridian side of a box
        narrower than 180 degrees with every vertex beyond it. Convex sets that touch
        have no such circle; a box near a vertex but outside may keep none either, and
        is kept. Boxes are widened by the pruning margin first.
        """
        keep = np.zeros(len(ra_min), dtype=bool)
        for start in range(0, len(ra_min), _PRUNE_BLOCK):
            block = slice(start, start + _PRUNE_BLOCK)
            lo = ra_min[block] - _PRUNE_MARGIN_DEG
            hi = ra_max[block] + _PRUNE_MARGIN_DEG
            south = np.maximum(dec_min[block] - _PRUNE_MARGIN_DEG, -90.0)
            north = np.minimum(dec_max[block] + _PRUNE_MARGIN_DEG, 90.0)
            inside = np.all(
                box_max_dot(self._normals, lo, hi, south, north) >= _PRUNE_MARGIN_DOT, axis=1
            )
            # A box of width ≤ 180 lies east of its west meridian and west of its east one.
            x, y = self._corners[:, 0][None, :], self._corners[:, 1][None, :]
            lo_rad, hi_rad = np.radians(lo)[:, None], np.radians(hi)[:, None]
            east_of_west = -np.sin(lo_rad) * x + np.cos(lo_rad) * y
            west_of_east = np.sin(hi_rad) * x - np.cos(hi_rad) * y
            beyond = np.all(east_of_west < _PRUNE_MARGIN_DOT, axis=1) | np.all(
                west_of_east < _PRUNE_MARGIN_DOT, axis=1
            )
            keep[block] = inside & ~((hi - lo < 180.0) & beyond)
        return keep
