"""The Qserv sky grid: stripes, sub-stripes, chunks, sub-chunks and their overlap.

The sphere is cut into ``S`` declination stripes of height ``H = 180/S``, each
into ``s`` sub-stripes of height ``h = H/s``. A stripe is cut in right
ascension into chunks, and the sub-stripes of a chunk into sub-chunks, so that
cells stay roughly square at every declination (``segments``). Ids follow
Qserv: ``chunkId = 2·S·stripe + chunk`` and ``subChunkId = (subStripe -
stripe·s)·M + (subChunk - chunk·nsc)``; the grid is the one
``lsst.sphgeom.Chunker(S, s)`` computes (the tests hold them together).

A row is also copied, flagged as overlap, into every other sub-chunk whose
box dilated by ``R`` (in declination) and by ``alpha`` (in right ascension,
the widest a circle of radius ``R`` gets inside that sub-stripe) contains it.
So every pair of rows closer than ``R`` meets in the home sub-chunk of either
row: near-neighbour joins and crossmatches need no other chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from eventindex.errors import ValidationError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

POLE_MARGIN_DEG = 1.0 / 3600.0
ARCSEC = 1.0 / 3600.0
ARCMIN = 1.0 / 60.0
# Rows per block of ``Chunker.assign``: a block's temporaries fit in a core's L2 cache.
ASSIGN_BLOCK = 1 << 16


def segments(lat_min: float, lat_max: float, width: float) -> int:
    """How many cells of angular width ``width`` (degrees) fit around the latitude band.

    The band's widest latitude decides: the cells are cut so that two points of
    one cell in that row are never more than ``width`` apart in longitude at it.
    """
    lat = max(abs(lat_min), abs(lat_max))
    if lat > 90.0 - POLE_MARGIN_DEG or width >= 180.0:
        return 1
    lat_rad = math.radians(lat)
    width_rad = math.radians(width)
    x = math.cos(width_rad) - math.sin(lat_rad) ** 2
    u = math.cos(lat_rad) ** 2
    y = math.sqrt(abs(u * u - x * x))
    return math.floor(360.0 / abs(math.degrees(math.atan2(y, x))))


def max_alpha(radius: float, lat: float) -> float:
    """The widest half-extent in longitude (degrees) of a circle of ``radius`` degrees
    whose centre lies at most ``|lat|`` from the equator: 180 when it reaches a pole."""
    if abs(lat) + radius > 90.0 - POLE_MARGIN_DEG:
        return 180.0
    r = math.radians(radius)
    a = math.radians(abs(lat))
    return math.degrees(
        abs(math.atan(math.sin(r) / math.sqrt(abs(math.cos(a - r) * math.cos(a + r)))))
    )


class SpatialError(ValidationError, ValueError):
    """A sky position, region or grid parameter is out of range; the message says which.

    A ``ValidationError`` (the CLI reports it in one line) and a ``ValueError``."""


def check_positions(ra: npt.ArrayLike, dec: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """``ra`` and ``dec`` as float64 arrays, refused (``SpatialError``) when any value is
    NaN, ``ra`` is outside [0, 360) or ``dec`` outside [-90, 90]."""
    ra_array = np.asarray(ra, dtype=np.float64)
    dec_array = np.asarray(dec, dtype=np.float64)
    if ra_array.shape != dec_array.shape:
        raise SpatialError(f"ra and dec differ in shape: {ra_array.shape} vs {dec_array.shape}")
    _check_range("ra", ra_array, 0.0, 360.0, upper_open=True)
    _check_range("dec", dec_array, -90.0, 90.0, upper_open=False)
    return ra_array, dec_array


def _check_range(
    name: str, values: FloatArray, low: float, high: float, *, upper_open: bool
) -> None:
    bad = ~((values >= low) & ((values < high) if upper_open else (values <= high)))
    if bad.any():
        where = np.flatnonzero(bad.ravel())
        row = int(where[0])
        value = float(values.ravel()[row])
        interval = f"[{low:g}, {high:g}{')' if upper_open else ']'}"
        what = "NaN" if math.isnan(value) else f"{value!r}"
        raise SpatialError(
            f"{name} must be in {interval} degrees: row {row} has {what} "
            f"({len(where)} bad value{'s' if len(where) > 1 else ''})"
        )


@dataclass(frozen=True)
class Overlap:
    """Where rows are copied as overlap: ``rows[i]`` goes to (``chunk_ids[i]``,
    ``sub_chunk_ids[i]``), a sub-chunk other than its home."""

    rows: IntArray
    chunk_ids: IntArray
    sub_chunk_ids: IntArray


@dataclass(frozen=True)
class Chunker:
    """The Qserv grid of ``num_stripes`` stripes, ``num_sub_stripes`` sub-stripes per
    stripe and an overlap of ``overlap`` degrees. Defaults are Qserv's: 85, 12, 1 arcmin."""

    num_stripes: int = 85
    num_sub_stripes: int = 12
    overlap: float = ARCMIN
    # Per stripe: chunks; per sub-stripe: sub-chunks per chunk, sub-chunk width, alpha.
    chunks_per_stripe: IntArray = field(init=False, repr=False, compare=False)
    sub_chunks_per_chunk: IntArray = field(init=False, repr=False, compare=False)
    sub_chunk_width: FloatArray = field(init=False, repr=False, compare=False)
    overlap_alpha: FloatArray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.num_stripes <= 2048:
            raise SpatialError(f"num_stripes must be in [1, 2048], not {self.num_stripes}")
        if not 1 <= self.num_sub_stripes <= 256:
            raise SpatialError(f"num_sub_stripes must be in [1, 256], not {self.num_sub_stripes}")
        if not (math.isfinite(self.overlap) and 0.0 <= self.overlap <= 10.0):
            raise SpatialError(f"overlap must be in [0, 10] degrees, not {self.overlap}")
        if self.sub_stripe_height < self.overlap:
            raise SpatialError(
                f"overlap {self.overlap} deg exceeds the sub-stripe height "
                f"{self.sub_stripe_height} deg: use fewer stripes or sub-stripes"
            )
        s = self.num_sub_stripes
        height = self.stripe_height
        sub_height = self.sub_stripe_height
        chunks = np.array(
            [
                segments(i * height - 90.0, (i + 1) * height - 90.0, height)
                for i in range(self.num_stripes)
            ],
            dtype=np.int64,
        )
        per_chunk = np.empty(self.num_stripes * s, dtype=np.int64)
        width = np.empty(self.num_stripes * s, dtype=np.float64)
        alpha = np.empty(self.num_stripes * s, dtype=np.float64)
        for k in range(self.num_stripes * s):
            lat_min, lat_max = k * sub_height - 90.0, (k + 1) * sub_height - 90.0
            nc = int(chunks[k // s])
            per_chunk[k] = segments(lat_min, lat_max, sub_height) // nc
            width[k] = 360.0 / (per_chunk[k] * nc)
            alpha[k] = max_alpha(self.overlap, max(abs(lat_min), abs(lat_max)))
        object.__setattr__(self, "chunks_per_stripe", chunks)
        object.__setattr__(self, "sub_chunks_per_chunk", per_chunk)
        object.__setattr__(self, "sub_chunk_width", width)
        object.__setattr__(self, "overlap_alpha", alpha)

    # -- grid sizes --------------------------------------------------------
    @property
    def stripe_height(self) -> float:
        return 180.0 / self.num_stripes

    @property
    def sub_stripe_height(self) -> float:
        return 180.0 / (self.num_stripes * self.num_sub_stripes)

    @property
    def max_sub_chunks_per_chunk(self) -> int:
        """Qserv's ``M``: sub-chunk ids of a sub-stripe row are ``row·M + column``."""
        return int(self.sub_chunks_per_chunk.max())

    @property
    def num_chunks(self) -> int:
        return int(self.chunks_per_stripe.sum())

    def parameters(self) -> dict[str, str]:
        """The grid as catalog attributes (strings), read back by ``from_parameters``."""
        return {
            "spatial.num_stripes": str(self.num_stripes),
            "spatial.num_sub_stripes": str(self.num_sub_stripes),
            "spatial.overlap_deg": repr(self.overlap),
        }

    @classmethod
    def from_parameters(cls, attributes: dict[str, str]) -> Chunker:
        try:
            return cls(
                int(attributes["spatial.num_stripes"]),
                int(attributes["spatial.num_sub_stripes"]),
                float(attributes["spatial.overlap_deg"]),
            )
        except KeyError as exc:
            raise SpatialError(f"no partitioning parameter {exc.args[0]!r} recorded") from None

    def all_chunks(self) -> IntArray:
        """Every chunk id of the grid, in order."""
        stripes = np.repeat(np.arange(self.num_stripes), self.chunks_per_stripe)
        starts = np.cumsum(self.chunks_per_stripe) - self.chunks_per_stripe
        columns = np.arange(len(stripes)) - np.repeat(starts, self.chunks_per_stripe)
        return 2 * self.num_stripes * stripes + columns

    def stripe_of(self, chunk_id: int) -> int:
        return chunk_id // (2 * self.num_stripes)

    def is_chunk(self, chunk_id: int) -> bool:
        stripe, column = divmod(chunk_id, 2 * self.num_stripes)
        return 0 <= stripe < self.num_stripes and column < int(self.chunks_per_stripe[stripe])

    def sub_chunks_of(self, chunk_id: int) -> IntArray:
        """Every sub-chunk id of one chunk, in order."""
        if not self.is_chunk(chunk_id):
            raise SpatialError(f"{chunk_id} is not a chunk id of this grid")
        stripe = self.stripe_of(chunk_id)
        rows = np.arange(self.num_sub_stripes)
        counts = self.sub_chunks_per_chunk[stripe * self.num_sub_stripes + rows]
        row_of = np.repeat(rows, counts)
        starts = np.cumsum(counts) - counts
        column = np.arange(len(row_of)) - np.repeat(starts, counts)
        return row_of * self.max_sub_chunks_per_chunk + column

    # -- locating ----------------------------------------------------------
    def _cells(self, ra: FloatArray, dec: FloatArray) -> tuple[IntArray, IntArray]:
        """(sub-stripe, global sub-chunk column) of each position."""
        total_sub_stripes = self.num_stripes * self.num_sub_stripes
        sub_stripe = np.floor((dec + 90.0) / self.sub_stripe_height).astype(np.int64)
        np.minimum(sub_stripe, total_sub_stripes - 1, out=sub_stripe)
        stripe = sub_stripe // self.num_sub_stripes
        per_row = self.chunks_per_stripe[stripe] * self.sub_chunks_per_chunk[sub_stripe]
        column = np.floor(ra / self.sub_chunk_width[sub_stripe]).astype(np.int64)
        np.minimum(column, per_row - 1, out=column)
        return sub_stripe, column

    def _ids(self, sub_stripe: IntArray, column: IntArray) -> tuple[IntArray, IntArray]:
        stripe = sub_stripe // self.num_sub_stripes
        nsc = self.sub_chunks_per_chunk[sub_stripe]
        chunk = column // nsc
        chunk_id = 2 * self.num_stripes * stripe + chunk
        sub_chunk_id = (sub_stripe - stripe * self.num_sub_stripes) * (
            self.max_sub_chunks_per_chunk
        ) + (column - chunk * nsc)
        return chunk_id, sub_chunk_id

    def locate(self, ra: npt.ArrayLike, dec: npt.ArrayLike) -> tuple[IntArray, IntArray]:
        """(chunkId, subChunkId) of every position, vectorised; positions are validated."""
        ra_array, dec_array = check_positions(ra, dec)
        return self._ids(*self._cells(ra_array, dec_array))

    def overlap_of(self, ra: npt.ArrayLike, dec: npt.ArrayLike) -> Overlap:
        """Every (row, chunk, sub-chunk) a row is copied into as overlap, sorted by row.

        A row belongs to the overlap of a sub-chunk other than its home when its
        declination is within ``R`` of the sub-chunk's rows of declination and its
        right ascension within that sub-stripe's ``alpha`` of the sub-chunk's.
        """
        return self.assign(ra, dec)[2]

    def assign(self, ra: npt.ArrayLike, dec: npt.ArrayLike) -> tuple[IntArray, IntArray, Overlap]:
        """``locate`` and ``overlap_of`` at once (positions validated and cut once).

        The work runs in blocks of ``ASSIGN_BLOCK`` rows: NumPy's temporaries then
        stay in the CPU cache, which makes it several times faster on large batches.
        """
        ra_array, dec_array = check_positions(ra, dec)
        n = len(ra_array)
        chunk_ids = np.empty(n, dtype=np.int64)
        sub_chunk_ids = np.empty(n, dtype=np.int64)
        rows, chunks, subs = [], [], []
        for start in range(0, n, ASSIGN_BLOCK):
            block_ra = ra_array[start : start + ASSIGN_BLOCK]
            block_dec = dec_array[start : start + ASSIGN_BLOCK]
            home_stripe, home_column = self._cells(block_ra, block_dec)
            chunk, sub = self._ids(home_stripe, home_column)
            chunk_ids[start : start + len(chunk)] = chunk
            sub_chunk_ids[start : start + len(sub)] = sub
            if self.overlap == 0.0:
                continue
            row, sub_stripe, column = self._overlap_cells(
                block_ra, block_dec, home_stripe, home_column
            )
            copy_chunk, copy_sub = self._ids(sub_stripe, column)
            rows.append(row + start)
            chunks.append(copy_chunk)
            subs.append(copy_sub)
        if not rows:
            empty = np.empty(0, dtype=np.int64)
            return chunk_ids, sub_chunk_ids, Overlap(empty, empty, empty)
        overlap = Overlap(np.concatenate(rows), np.concatenate(chunks), np.concatenate(subs))
        return chunk_ids, sub_chunk_ids, overlap

    def _overlap_cells(
        self, ra: FloatArray, dec: FloatArray, home_stripe: IntArray, home_column: IntArray
    ) -> tuple[IntArray, IntArray, IntArray]:
        """(row, sub-stripe, column) of every overlap copy of one block, sorted by row."""
        total_sub_stripes = self.num_stripes * self.num_sub_stripes
        height = self.sub_stripe_height
        rows_out, stripes_out, columns_out = [], [], []
        for step in (-1, 0, 1):
            if step:
                # Declination reach: the target row's band dilated by R.
                target = home_stripe + step
                lat_min = target * height - 90.0
                inside = (
                    (target >= 0)
                    & (target < total_sub_stripes)
                    & (dec >= lat_min - self.overlap)
                    & (dec <= lat_min + height + self.overlap)
                )
                rows = np.flatnonzero(inside)
                if not len(rows):
                    continue
                stripe_row = target[rows]
                lon = ra[rows]
            else:
                rows = np.arange(len(ra))
                stripe_row = home_stripe
                lon = ra
            width = self.sub_chunk_width[stripe_row]
            alpha = self.overlap_alpha[stripe_row]
            per_row = (
                self.chunks_per_stripe[stripe_row // self.num_sub_stripes]
                * self.sub_chunks_per_chunk[stripe_row]
            )
            first = np.floor((lon - alpha) / width).astype(np.int64)
            last = np.floor((lon + alpha) / width).astype(np.int64)
            count = np.minimum(last - first + 1, per_row)
            if not step:
                # In its own row a point reaching one column reaches only its home: most
                # rows stop here, before any copy is made.
                reach = np.flatnonzero(count > 1)
                if not len(reach):
                    continue
                rows, stripe_row, per_row = reach, stripe_row[reach], per_row[reach]
                first, count = first[reach], count[reach]
            full = count >= per_row
            first[full] = 0
            repeated = np.repeat(np.arange(len(rows)), count)
            offsets = np.arange(len(repeated)) - np.repeat(np.cumsum(count) - count, count)
            columns = (first[repeated] + offsets) % per_row[repeated]
            row = rows[repeated]
            sub_stripe = stripe_row[repeated]
            if not step:
                elsewhere = columns != home_column[row]
                row, sub_stripe, columns = row[elsewhere], sub_stripe[elsewhere], columns[elsewhere]
            rows_out.append(row)
            stripes_out.append(sub_stripe)
            columns_out.append(columns)
        if not rows_out:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, empty
        row = np.concatenate(rows_out)
        order = np.argsort(row, kind="stable")
        return row[order], np.concatenate(stripes_out)[order], np.concatenate(columns_out)[order]

    # -- cell geometry -----------------------------------------------------
    def sub_chunk_box(self, chunk_id: int, sub_chunk_id: int) -> tuple[float, float, float, float]:
        """(ra_min, ra_max, dec_min, dec_max) of one sub-chunk, in degrees."""
        boxes = self.sub_chunk_boxes(np.array([chunk_id]), np.array([sub_chunk_id]))
        ra_min, ra_max, dec_min, dec_max = (float(b[0]) for b in boxes)
        return ra_min, ra_max, dec_min, dec_max

    def sub_chunk_boxes(
        self, chunk_ids: npt.ArrayLike, sub_chunk_ids: npt.ArrayLike
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """(ra_min, ra_max, dec_min, dec_max) arrays of sub-chunks (valid ids), in degrees.
        The last column of a sub-stripe ends at 360 exactly (``locate`` clamps to it)."""
        chunk_id = np.asarray(chunk_ids, dtype=np.int64)
        stripe = chunk_id // (2 * self.num_stripes)
        chunk = chunk_id - 2 * self.num_stripes * stripe
        row, col = np.divmod(
            np.asarray(sub_chunk_ids, dtype=np.int64), self.max_sub_chunks_per_chunk
        )
        sub_stripe = stripe * self.num_sub_stripes + row
        nsc = self.sub_chunks_per_chunk[sub_stripe]
        width = self.sub_chunk_width[sub_stripe]
        column = chunk * nsc + col
        last = column == self.chunks_per_stripe[stripe] * nsc - 1
        ra_max = np.where(last, 360.0, (column + 1) * width)
        west: FloatArray = (column * width).astype(np.float64)
        east: FloatArray = ra_max.astype(np.float64)
        south: FloatArray = (sub_stripe * self.sub_stripe_height - 90.0).astype(np.float64)
        north: FloatArray = south + self.sub_stripe_height
        return west, east, south, north

    def chunk_boxes(
        self, chunk_ids: npt.ArrayLike
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """(ra_min, ra_max, dec_min, dec_max) arrays of chunks (valid ids), in degrees."""
        chunk_id = np.asarray(chunk_ids, dtype=np.int64)
        stripe = chunk_id // (2 * self.num_stripes)
        chunk = chunk_id - 2 * self.num_stripes * stripe
        count = self.chunks_per_stripe[stripe]
        width = 360.0 / count
        ra_max = np.where(chunk == count - 1, 360.0, (chunk + 1) * width)
        west: FloatArray = (chunk * width).astype(np.float64)
        east: FloatArray = ra_max.astype(np.float64)
        south: FloatArray = (stripe * self.stripe_height - 90.0).astype(np.float64)
        north: FloatArray = south + self.stripe_height
        return west, east, south, north
