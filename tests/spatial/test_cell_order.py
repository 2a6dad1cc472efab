"""``cell_order``: the (chunk, sub-chunk, object id) order by each of its three ways."""

from __future__ import annotations

import numpy as np
import pytest

from eventindex.spatial.chunker import Chunker
from eventindex.spatial.partition import cell_order

CHUNKER = Chunker()


def reference(chunk: np.ndarray, sub: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.lexsort((ids, sub, chunk))


def positions(n: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, spread, n)
    dec = rng.uniform(-spread / 4, spread / 4, n)
    return CHUNKER.locate(ra, dec)


@pytest.mark.parametrize(
    ("n", "spread"),
    [
        (50_000, 5.0),  # a few thousand cells: ranked into 16-bit keys
        (200_000, 360.0),  # more than 2^16 cells over the sky: the packed sort
        (1, 1.0),
        (2, 1.0),
    ],
)
def test_rising_ids_sort_by_cell_then_id(n: int, spread: float) -> None:
    chunk, sub = positions(n, n, spread)
    ids = np.arange(n, dtype=np.int64) * 3
    assert np.array_equal(cell_order(chunk, sub, ids, CHUNKER), reference(chunk, sub, ids))


def test_shuffled_ids_sort_by_cell_then_id() -> None:
    chunk, sub = positions(30_000, 7, 3.0)
    ids = np.random.default_rng(1).permutation(30_000).astype(np.int64)
    assert np.array_equal(cell_order(chunk, sub, ids, CHUNKER), reference(chunk, sub, ids))


def test_equal_ids_keep_their_input_order() -> None:
    chunk, sub = positions(10_000, 3, 2.0)
    ids = np.repeat(np.arange(5_000, dtype=np.int64), 2)
    order = cell_order(chunk, sub, ids, CHUNKER)
    assert np.array_equal(order, np.lexsort((np.arange(10_000), ids, sub, chunk)))


def test_too_many_cells_for_16_bit_keys_in_a_narrow_band() -> None:
    """A band of stripes holds more than 2^16 cells within a lookup table's reach."""
    rng = np.random.default_rng(5)
    n = 400_000
    chunk, sub = CHUNKER.locate(rng.uniform(0.0, 360.0, n), rng.uniform(-4.0, 4.0, n))
    cells = chunk.astype(np.int64) * 10_000 + sub
    assert len(np.unique(cells)) > 1 << 16
    ids = np.arange(n, dtype=np.int64)
    assert np.array_equal(cell_order(chunk, sub, ids, CHUNKER), reference(chunk, sub, ids))
