"""Crossmatch and near-neighbour joins of catalogs partitioned on the same grid.

Every pair closer than the overlap radius meets in the home sub-chunk of its
left row: there the right rows are the sub-chunk's own rows plus its overlap
copies. So a chunk is matched alone (``match_task``: left chunk file against
right chunk + overlap files) with no data from any other chunk, which is what
lets a Spark job run one task per chunk. Inside a chunk, right rows are sorted
by (sub-chunk, dec); each left row bisects its declination window and the
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
from eventindex.spatial.partition import OBJECT_ID, SUB_CHUNK_ID
from eventindex.spatial.regions import Region, angular_separation
from eventindex.storage import resolve

MATCH_SCHEMA = pa.schema(
    [
        pa.field("left_id", pa.int64(), nullable=False),
        pa.field("right_id", pa.int64(), nullable=False),
        pa.field("distance_arcsec", pa.float64(), nullable=False),
    ]
)
_KEY_STRIDE = 1000.0  # > 180: sub-chunk id and dec + 90 packed in one sortable float
_MATCH_COLUMNS = [OBJECT_ID, "ra", "dec", SUB_CHUNK_ID]


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


def match_rows(left: pa.Table, right: pa.Table, spec: MatchSpec) -> pa.Table:
    """Pairs of one chunk: ``left`` its home rows, ``right`` its home and overlap rows
    (columns ``object_id``, ``ra``, ``dec``, ``sub_chunk_id``)."""
    if left.num_rows == 0 or right.num_rows == 0:
        return MATCH_SCHEMA.empty_table()
    radius = spec.radius_deg
    r_sub = right.column(SUB_CHUNK_ID).to_numpy().astype(np.float64)
    r_dec = right.column("dec").to_numpy()
    r_key = r_sub * _KEY_STRIDE + (r_dec + 90.0)
    order = np.argsort(r_key, kind="stable")
    r_key = r_key[order]
    r_ra = right.column("ra").to_numpy()[order]
    r_dec = r_dec[order]
    r_id = right.column(OBJECT_ID).to_numpy()[order]

    l_sub = left.column(SUB_CHUNK_ID).to_numpy().astype(np.float64)
    l_dec = left.column("dec").to_numpy()
    l_key = l_sub * _KEY_STRIDE + (l_dec + 90.0)
    slack = radius * (1.0 + 1e-9) + 1e-9  # rounding of the packed key never drops a pair
    low = np.searchsorted(r_key, l_key - slack, side="left")
    high = np.searchsorted(r_key, l_key + slack, side="right")
    counts = high - low
    total = int(counts.sum())
    if total == 0:
        return MATCH_SCHEMA.empty_table()
    left_index = np.repeat(np.arange(left.num_rows), counts)
    right_index = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    right_index += np.repeat(low, counts)
    l_ra = left.column("ra").to_numpy()
    l_id = left.column(OBJECT_ID).to_numpy()
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
    """The files one chunk's match reads: left home rows, right home and overlap rows."""

    chunk_id: int
    left_uri: str
    right_uris: tuple[str, ...]


def _read_rows(uri: str) -> pa.Table:
    # A whole-file read needs no key index: plain Parquet, the four columns only.
    filesystem, path = resolve(uri)
    try:
        return pq.read_table(path, columns=_MATCH_COLUMNS, filesystem=filesystem)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{uri}: cannot read: {exc}") from exc


def match_task(task: ChunkTask, spec: MatchSpec, region: Region | None = None) -> pa.Table:
    """Pairs whose left row lives in the task's chunk (and in ``region`` when given)."""
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
    """What metadata decides: the left's chunks where the right holds rows (home or
    overlap), within ``region`` when given, with the files each one reads."""
    chunks = set(left.chunk_files) & (set(right.chunk_files) | set(right.overlap_files))
    if region is not None:
        chunks &= set(region.chunks(left.chunker))
    return [
        ChunkTask(
            chunk_id,
            left.chunk_files[chunk_id].uri,
            tuple(
                files[chunk_id].uri
                for files in (right.chunk_files, right.overlap_files)
                if chunk_id in files
            ),
        )
        for chunk_id in sorted(chunks)
    ]


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
