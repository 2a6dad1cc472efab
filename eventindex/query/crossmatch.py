"""Crossmatch and near-neighbour joins of catalogs partitioned on the same grid.

Every pair closer than the overlap radius meets in the home sub-chunk of its
left row: there the right rows are the sub-chunk's own rows plus its overlap
copies. So a run of chunks is matched alone (``match_task``: a left chunk file
against the right chunk and overlap files of the same chunks) with no data from
any other chunk, which is what lets a Spark job run one task per file group.
Inside a task, the rows of the smaller side are sorted by (cell, dec); each row
of the other side bisects its declination window in its own cell and the
candidates are kept by exact angular distance, all vectorised.
"""

from __future__ import annotations

import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eventindex.errors import StorageError, ValidationError
from eventindex.query.objects import ObjectTable
from eventindex.spatial.partition import CHUNK_ID, OBJECT_ID, SUB_CHUNK_ID, parse_part
from eventindex.spatial.regions import Region, angular_separation
from eventindex.storage import resolve

MATCH_SCHEMA = pa.schema(
    [
        pa.field("left_id", pa.int64(), nullable=False),
        pa.field("right_id", pa.int64(), nullable=False),
        pa.field("distance_arcsec", pa.float64(), nullable=False),
    ]
)
_KEY_STRIDE = 1000.0  # > 180: a cell's rank and dec + 90 packed in one sortable float
_MATCH_COLUMNS = [OBJECT_ID, "ra", "dec", CHUNK_ID, SUB_CHUNK_ID]


class MatchMode(enum.StrEnum):
    NEAREST = "nearest"  # the closest right row of each left row
    ALL = "all"  # every pair within the radius


@dataclass(frozen=True)
class MatchSpec:
    radius_arcsec: float
    mode: MatchMode = MatchMode.NEAREST
    self_join: bool = False  # a catalog against itself: a row never matches itself

    @property
    def radius_deg(self) -> float:
        return self.radius_arcsec / 3600.0


def check_match(left: ObjectTable, right: ObjectTable, spec: MatchSpec) -> None:
    """Refuse a radius outside (0, overlap] or catalogs on different grids."""
    radius = spec.radius_arcsec
    if not (np.isfinite(radius) and radius > 0.0):
        raise ValidationError(f"radius must be positive arcseconds, not {radius!r}")
    if left.chunker != right.chunker:
        raise ValidationError(
            f"{left.name} and {right.name} are partitioned differently "
            f"({left.chunker.parameters()} vs {right.chunker.parameters()}): repartition one"
        )
    overlap_arcsec = right.chunker.overlap * 3600.0
    if radius > overlap_arcsec * (1 + 1e-12):
        raise ValidationError(
            f"radius {radius} arcsec exceeds the overlap of {right.name} "
            f"({overlap_arcsec:g} arcsec): pairs could span chunks; repartition with a "
            "larger overlap"
        )


def _cells(table: pa.Table) -> np.ndarray:
    """(chunk, sub-chunk) of each row packed in one int64."""
    cells: np.ndarray = table.column(CHUNK_ID).to_numpy().astype(np.int64) << 32
    cells |= table.column(SUB_CHUNK_ID).to_numpy().astype(np.int64)
    return cells


def _candidates(
    sorted_keys: np.ndarray, keys: np.ndarray, slack: float
) -> tuple[np.ndarray, np.ndarray]:
    """(row of ``keys``, position in ``sorted_keys``) of every key within ``slack``."""
    low = np.searchsorted(sorted_keys, keys - slack, side="left")
    high = np.searchsorted(sorted_keys, keys + slack, side="right")
    counts = high - low
    total = int(counts.sum())
    rows = np.repeat(np.arange(len(keys)), counts)
    positions = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    positions += np.repeat(low, counts)
    return rows, positions


def match_rows(left: pa.Table, right: pa.Table, spec: MatchSpec) -> pa.Table:
    """Pairs of a run of chunks: ``left`` its home rows, ``right`` its home and overlap
    rows (columns ``object_id``, ``ra``, ``dec``, ``chunk_id``, ``sub_chunk_id``)."""
    if left.num_rows == 0 or right.num_rows == 0:
        return MATCH_SCHEMA.empty_table()
    radius = spec.radius_deg
    # Only cells of the left rows can hold pairs: a dense rank of them, packed with
    # dec into one float key, so one sort and one bisect serve every cell at once.
    l_cells, r_cells = _cells(left), _cells(right)
    cells = np.unique(l_cells)
    r_rank = np.searchsorted(cells, r_cells)
    r_in = r_rank < len(cells)
    r_in[r_in] = cells[r_rank[r_in]] == r_cells[r_in]
    r_rows = np.flatnonzero(r_in)
    if len(r_rows) == 0:
        return MATCH_SCHEMA.empty_table()
    l_key = np.searchsorted(cells, l_cells) * _KEY_STRIDE + (left.column("dec").to_numpy() + 90.0)
    r_key = r_rank[r_rows] * _KEY_STRIDE + (right.column("dec").to_numpy()[r_rows] + 90.0)
    # Rounding of the packed keys never drops a pair: the slack covers a few ulps.
    top = max(float(np.abs(l_key).max()), float(np.abs(r_key).max()))
    slack = radius * (1.0 + 1e-9) + 8.0 * float(np.spacing(top))
    # Sort the smaller side, bisect with the larger one.
    if len(l_key) <= len(r_key):
        l_order = np.argsort(l_key)
        found_r, at = _candidates(l_key[l_order], r_key, slack)
        left_index, right_index = l_order[at], r_rows[found_r]
    else:
        r_order = np.argsort(r_key)
        left_index, at = _candidates(r_key[r_order], l_key, slack)
        right_index = r_rows[r_order[at]]
    if len(left_index) == 0:
        return MATCH_SCHEMA.empty_table()
    l_ra, l_dec = left.column("ra").to_numpy(), left.column("dec").to_numpy()
    r_ra, r_dec = right.column("ra").to_numpy(), right.column("dec").to_numpy()
    l_id, r_id = left.column(OBJECT_ID).to_numpy(), right.column(OBJECT_ID).to_numpy()
    distance = angular_separation(
        l_ra[left_index], l_dec[left_index], r_ra[right_index], r_dec[right_index]
    )
    keep = distance <= radius
    if spec.self_join:
        keep &= l_id[left_index] != r_id[right_index]
    left_index, right_index, distance = left_index[keep], right_index[keep], distance[keep]
    if spec.mode is MatchMode.NEAREST and len(left_index):
        # Closest first within each left row (ties: smaller right id), then one per row.
        ranked = np.lexsort((r_id[right_index], distance, left_index))
        left_index, right_index, distance = (
            left_index[ranked],
            right_index[ranked],
            distance[ranked],
        )
        first = np.concatenate([[True], left_index[1:] != left_index[:-1]])
        left_index, right_index, distance = left_index[first], right_index[first], distance[first]
    return pa.table(
        {
            "left_id": pa.array(l_id[left_index], pa.int64()),
            "right_id": pa.array(r_id[right_index], pa.int64()),
            "distance_arcsec": pa.array(distance * 3600.0, pa.float64()),
        },
        schema=MATCH_SCHEMA,
    )


@dataclass(frozen=True)
class ChunkTask:
    """The files one task reads: the left chunk file of a run of chunks
    (``first``..``last``), and the right chunk and overlap files sharing chunks with it."""

    first: int
    last: int
    left_uri: str
    right_uris: tuple[str, ...]


def _read_rows(uri: str) -> pa.Table:
    # A whole-file read needs no key index: plain Parquet, the match columns only. Right
    # files cut into other runs of chunks may hold rows of other cells: the match skips
    # them.
    filesystem, path = resolve(uri)
    try:
        return pq.read_table(path, columns=_MATCH_COLUMNS, filesystem=filesystem)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{uri}: cannot read: {exc}") from exc


def match_task(task: ChunkTask, spec: MatchSpec, region: Region | None = None) -> pa.Table:
    """Pairs whose left row lives in the task's chunks (and in ``region`` when given)."""
    left_rows = _read_rows(task.left_uri)
    if region is not None:
        ra, dec = left_rows.column("ra").to_numpy(), left_rows.column("dec").to_numpy()
        left_rows = left_rows.filter(pa.array(region.contains(ra, dec)))
    if left_rows.num_rows == 0 or not task.right_uris:
        return MATCH_SCHEMA.empty_table()
    right_rows = pa.concat_tables([_read_rows(uri) for uri in task.right_uris])
    return match_rows(left_rows, right_rows, spec)


def plan_chunks(
    left: ObjectTable, right: ObjectTable, region: Region | None = None
) -> list[ChunkTask]:
    """What metadata decides: a task per left chunk file whose chunks the right holds
    rows of (home or overlap), within ``region`` when given, with the files it reads."""
    wanted = None if region is None else set(region.chunks(left.chunker))
    tasks = []
    for entry in left.chunk_files:
        first, last = parse_part(entry.part)
        if wanted is not None and not any(first <= c <= last for c in wanted):
            continue
        right_files = [
            e
            for files in (right.chunk_files, right.overlap_files)
            for e in files.overlapping(first, last)
            if e.key_min[0] <= last and e.key_max[0] >= first
        ]
        if right_files:
            tasks.append(ChunkTask(first, last, entry.uri, tuple(e.uri for e in right_files)))
    return tasks


def crossmatch(
    left: ObjectTable,
    right: ObjectTable,
    spec: MatchSpec,
    region: Region | None = None,
    *,
    threads: int = 4,
) -> pa.Table:
    """Every match (or the nearest one per left row) in this process, chunk by chunk,
    sorted by left id then distance."""
    check_match(left, right, spec)
    tasks = plan_chunks(left, right, region)
    # Parquet decoding and most of NumPy's work release the GIL: a few threads overlap I/O.
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pieces = list(pool.map(lambda task: match_task(task, spec, region), tasks))
    result = pa.concat_tables([MATCH_SCHEMA.empty_table(), *pieces])
    return result.sort_by(
        [("left_id", "ascending"), ("distance_arcsec", "ascending"), ("right_id", "ascending")]
    )
