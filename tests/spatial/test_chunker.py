"""The grid against lsst.sphgeom.Chunker, and locate / overlap against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lsst import sphgeom

from eventindex.spatial.chunker import ARCMIN, Chunker, SpatialError, max_alpha
from eventindex.spatial.regions import angular_separation

QSERV = Chunker()
SMALL = Chunker(18, 4, 0.5)  # coarse enough to check every cell by brute force


def _edge_points(
    chunker: Chunker, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random points plus poles, ra = 0 and just below 360, and exact stripe edges."""
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    edges = (
        np.arange(chunker.num_stripes * chunker.num_sub_stripes + 1) * (chunker.sub_stripe_height)
        - 90.0
    )
    edge_dec = np.clip(edges, -90.0, 90.0)
    extra_ra = np.concatenate(
        [np.zeros(len(edge_dec)), np.full(len(edge_dec), np.nextafter(360.0, 0.0))]
    )
    extra_dec = np.concatenate([edge_dec, edge_dec])
    poles_ra = np.array([0.0, 123.4, 0.0, 359.9])
    poles_dec = np.array([90.0, 90.0, -90.0, -90.0])
    return np.concatenate([ra, extra_ra, poles_ra]), np.concatenate([dec, extra_dec, poles_dec])


@pytest.mark.parametrize("stripes,subs", [(85, 12), (18, 4), (340, 3), (1, 1)])
def test_grid_matches_sphgeom(stripes: int, subs: int) -> None:
    ours = Chunker(stripes, subs, 0.0)
    theirs = sphgeom.Chunker(stripes, subs)
    assert ours.all_chunks().tolist() == list(theirs.getAllChunks())
    for chunk in theirs.getAllChunks()[:: max(1, len(theirs.getAllChunks()) // 300)]:
        assert ours.sub_chunks_of(chunk).tolist() == list(theirs.getAllSubChunks(chunk))


def test_sub_chunk_boxes_match_sphgeom() -> None:
    theirs = sphgeom.Chunker(85, 12)
    rng = np.random.default_rng(3)
    chunks = theirs.getAllChunks()
    for chunk in rng.choice(chunks, 60):
        subs = QSERV.sub_chunks_of(int(chunk))
        for sub in rng.choice(subs, 3):
            stripe = QSERV.stripe_of(int(chunk))
            row, col = divmod(int(sub), QSERV.max_sub_chunks_per_chunk)
            sub_stripe = stripe * 12 + row
            nsc = int(QSERV.sub_chunks_per_chunk[sub_stripe])
            column = (int(chunk) - 2 * 85 * stripe) * nsc + col
            box = theirs.getSubChunkBoundingBox(sub_stripe, column)
            ra_min, ra_max, dec_min, dec_max = QSERV.sub_chunk_box(int(chunk), int(sub))
            assert box.getLon().getA().asDegrees() == pytest.approx(ra_min, abs=1e-7)
            assert box.getLat().getA().asDegrees() == pytest.approx(dec_min, abs=1e-7)
            assert box.getLat().getB().asDegrees() == pytest.approx(dec_max, abs=1e-7)
            assert box.getLon().getB().asDegrees() % 360.0 == pytest.approx(
                ra_max % 360.0, abs=1e-7
            )


def test_locate_agrees_with_sphgeom_pruning() -> None:
    """The cell we locate a point in is one sphgeom says a tiny circle round it touches."""
    rng = np.random.default_rng(7)
    ra, dec = _edge_points(QSERV, rng, 400)
    chunk, sub = QSERV.locate(ra, dec)
    grid = sphgeom.Chunker(85, 12)
    for r, d, c, s in zip(ra, dec, chunk, sub, strict=True):
        centre = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(r, d))
        touched = grid.getSubChunksIntersecting(
            sphgeom.Circle(centre, sphgeom.Angle.fromDegrees(1e-7))
        )
        assert int(s) in dict(touched).get(int(c), []), (r, d, c, s)


@settings(max_examples=200, deadline=None)
@given(
    ra=st.floats(0.0, 360.0, exclude_max=True),
    dec=st.floats(-90.0, 90.0),
)
def test_locate_is_inside_its_box(ra: float, dec: float) -> None:
    chunk, sub = QSERV.locate([ra], [dec])
    assert QSERV.is_chunk(int(chunk[0]))
    assert int(sub[0]) in QSERV.sub_chunks_of(int(chunk[0]))
    ra_min, ra_max, dec_min, dec_max = QSERV.sub_chunk_box(int(chunk[0]), int(sub[0]))
    assert ra_min - 1e-9 <= ra <= ra_max + 1e-9  # cell edges are computed, not exact
    assert dec_min - 1e-9 <= dec <= dec_max + 1e-9


def _all_cells(chunker: Chunker) -> tuple[np.ndarray, ...]:
    chunks, subs, boxes = [], [], []
    for chunk in chunker.all_chunks():
        for sub in chunker.sub_chunks_of(int(chunk)):
            chunks.append(int(chunk))
            subs.append(int(sub))
            boxes.append(chunker.sub_chunk_box(int(chunk), int(sub)))
    return np.array(chunks), np.array(subs), np.array(boxes)


def test_overlap_matches_brute_force() -> None:
    """Each point's overlap cells are exactly the other cells whose dilated box holds it."""
    rng = np.random.default_rng(11)
    ra, dec = _edge_points(SMALL, rng, 300)
    cells_chunk, cells_sub, boxes = _all_cells(SMALL)
    height = SMALL.sub_stripe_height
    rows = np.floor((boxes[:, 2] + 90.0) / height + 0.5).astype(int)
    alpha = np.array(
        [
            max_alpha(SMALL.overlap, max(abs(r * height - 90), abs((r + 1) * height - 90)))
            for r in rows
        ]
    )
    home_chunk, home_sub = SMALL.locate(ra, dec)
    found = SMALL.overlap_of(ra, dec)
    for i in range(len(ra)):
        in_dec = (dec[i] >= boxes[:, 2] - SMALL.overlap) & (dec[i] <= boxes[:, 3] + SMALL.overlap)
        within = (ra[i] >= boxes[:, 0]) & (ra[i] <= boxes[:, 1])
        below = (boxes[:, 0] - ra[i]) % 360.0
        above = (ra[i] - boxes[:, 1]) % 360.0
        lon_gap = np.where(within, 0.0, np.minimum(below, above))
        in_lon = (lon_gap <= alpha) | (alpha >= 180.0)
        home = (cells_chunk == home_chunk[i]) & (cells_sub == home_sub[i])
        expected = set(
            zip(
                cells_chunk[in_dec & in_lon & ~home],
                cells_sub[in_dec & in_lon & ~home],
                strict=True,
            )
        )
        mine = found.rows == i
        got = set(
            zip(found.chunk_ids[mine].tolist(), found.sub_chunk_ids[mine].tolist(), strict=True)
        )
        assert got == {(int(c), int(s)) for c, s in expected}, (ra[i], dec[i])


@pytest.mark.parametrize("chunker", [QSERV, SMALL], ids=["qserv", "small"])
def test_close_pairs_meet_in_a_home_cell(chunker: Chunker) -> None:
    """Every pair closer than the overlap: the second point is home or overlap in the
    first point's home cell (what joins rely on)."""
    rng = np.random.default_rng(5)
    ra, dec = _edge_points(chunker, rng, 3000)
    bearing = rng.uniform(0.0, 2 * np.pi, len(ra))
    distance = np.radians(rng.uniform(0.0, chunker.overlap, len(ra)))
    lat, lon = np.radians(dec), np.radians(ra)
    lat2 = np.arcsin(
        np.sin(lat) * np.cos(distance) + np.cos(lat) * np.sin(distance) * np.cos(bearing)
    )
    lon2 = lon + np.arctan2(
        np.sin(bearing) * np.sin(distance) * np.cos(lat),
        np.cos(distance) - np.sin(lat) * np.sin(lat2),
    )
    ra2 = np.degrees(lon2) % 360.0
    ra2[ra2 >= 360.0] = 0.0
    dec2 = np.clip(np.degrees(lat2), -90.0, 90.0)
    keep = angular_separation(ra, dec, ra2, dec2) <= chunker.overlap
    ra, dec, ra2, dec2 = ra[keep], dec[keep], ra2[keep], dec2[keep]
    home1 = np.stack(chunker.locate(ra, dec), axis=1)
    home2 = np.stack(chunker.locate(ra2, dec2), axis=1)
    overlap2 = chunker.overlap_of(ra2, dec2)
    copies = {
        (int(r), int(c), int(s))
        for r, c, s in zip(overlap2.rows, overlap2.chunk_ids, overlap2.sub_chunk_ids, strict=True)
    }
    for i in range(len(ra)):
        same = tuple(home1[i]) == tuple(home2[i])
        assert same or (i, int(home1[i, 0]), int(home1[i, 1])) in copies, (
            ra[i],
            dec[i],
            ra2[i],
            dec2[i],
        )


@pytest.mark.parametrize(
    "ra,dec,message",
    [
        ([360.0], [0.0], "ra must be in [0, 360)"),
        ([-0.1], [0.0], "ra must be in"),
        ([1.0], [90.5], "dec must be in [-90, 90]"),
        ([float("nan")], [0.0], "NaN"),
        ([1.0], [float("nan")], "NaN"),
    ],
)
def test_bad_positions_are_refused(ra: list[float], dec: list[float], message: str) -> None:
    with pytest.raises(
        SpatialError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        QSERV.locate(ra, dec)


def test_bad_grids_are_refused() -> None:
    with pytest.raises(SpatialError, match="exceeds the sub-stripe height"):
        Chunker(85, 12, 1.0)
    with pytest.raises(SpatialError, match="num_stripes"):
        Chunker(0, 12)
    assert Chunker.from_parameters(QSERV.parameters()) == QSERV
    assert QSERV.overlap == ARCMIN
