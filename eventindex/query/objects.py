"""Object catalogs: pick an object by id, and search a cone, box or polygon.

Split as lsdb splits its searches: ``plan_search`` decides from metadata
alone which chunk files and which sub-chunks a region may touch (the grid,
pruned by ``lsst.sphgeom``, intersected with the chunks the catalog holds);
``ObjectTable.search`` then reads only those key ranges, keeps the rows of the
touched sub-chunks and filters them exactly (angular distance for a cone).
A pick bisects the director files by key range, reads the object's
(chunk, sub-chunk) and then reads that one key of the chunk file that holds the
chunk (files hold runs of whole chunks, named by their part ``"first-last"``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import sys
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from catalog.base import Catalog
from catalog.model import Dataset, FileKind, TagFile
from eventindex.errors import NotFoundError, ValidationError
from eventindex.query.open_files import OpenFiles
from eventindex.records.schema import RecordKind
from eventindex.spatial.chunker import Chunker, IntArray, SpatialError
from eventindex.spatial.partition import (
    CHUNK_ID,
    DIRECTOR_ROLE,
    LAYOUT,
    LAYOUT_ATTRIBUTE,
    OBJECT_ID,
    ROLE_ATTRIBUTE,
    SUB_CHUNK_ID,
    parse_part,
)
from eventindex.spatial.regions import Circle, Region, angular_separation
from eventindex.storage import QUERY_INDEX, MapFileReader

DISTANCE_COLUMN = "distance_arcsec"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ChunkFiles:
    """The files of one kind (chunk or overlap) of a table, by the run of chunks each
    holds: ``file_of(chunk_id)`` bisects their first chunks."""

    def __init__(self, entries: Sequence[TagFile]) -> None:
        spans = sorted(((*parse_part(e.part), e) for e in entries), key=lambda s: s[:2])
        self.entries = [e for _, _, e in spans]
        self.firsts = [first for first, _, _ in spans]
        self.lasts = [last for _, last, _ in spans]
        for before, after in itertools.pairwise(spans):
            if after[0] <= before[1]:
                raise ValidationError(
                    f"files {before[2].uri} and {after[2].uri} hold the same chunks"
                )

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[TagFile]:
        return iter(self.entries)

    def file_of(self, chunk_id: int) -> TagFile | None:
        """The file whose run holds ``chunk_id`` (it may hold no row of it)."""
        index = bisect.bisect_right(self.firsts, chunk_id) - 1
        if index < 0 or self.lasts[index] < chunk_id:
            return None
        return self.entries[index]

    def overlapping(self, first: int, last: int) -> list[TagFile]:
        """The files whose runs share a chunk with ``[first, last]``."""
        start = max(0, bisect.bisect_right(self.firsts, first) - 1)
        stop = bisect.bisect_right(self.firsts, last)
        return [e for i, e in enumerate(self.entries[start:stop], start) if self.lasts[i] >= first]


@dataclass(frozen=True)
class SearchPlan:
    """What metadata decides: for each chunk the region may touch and the catalog holds,
    the chunk file holding it and the sub-chunks to keep."""

    region: Region
    sub_chunks: dict[int, IntArray]
    files: dict[int, TagFile]

    @property
    def chunks(self) -> list[int]:
        return sorted(self.files)


class ObjectTable:
    """One partitioned table (a dataset with chunk, overlap and director files).

    Readers of the files it touches are kept open (an LRU of ``max_open_files``)
    and are safe to share between threads.
    """

    def __init__(self, catalog: Catalog, dataset: Dataset, *, max_open_files: int = 2048) -> None:
        self.dataset = dataset
        self.chunker = Chunker.from_parameters(dataset.attributes)
        layout = dataset.attributes.get(LAYOUT_ATTRIBUTE)
        if layout != LAYOUT:
            raise ValidationError(
                f"{dataset.name} is laid out as {layout or 'one file per chunk'}, not "
                f"{LAYOUT}: partition it again"
            )
        entries = catalog.list_tagfiles(
            dataset=dataset.name, kinds=[FileKind.CHUNK, FileKind.OVERLAP, FileKind.DIRECTOR]
        )
        self.chunk_files = ChunkFiles([e for e in entries if e.kind is FileKind.CHUNK])
        self.overlap_files = ChunkFiles([e for e in entries if e.kind is FileKind.OVERLAP])
        directors = sorted(
            (e for e in entries if e.kind is FileKind.DIRECTOR), key=lambda e: e.key_min
        )
        self._director = directors
        self._director_starts = [e.key_min[0] for e in directors]
        self.rows = sum(e.rows for e in self.chunk_files)
        self._files = OpenFiles(max_open_files)

    @property
    def name(self) -> str:
        return self.dataset.name

    def reader(self, entry: TagFile) -> MapFileReader:
        return self._files.reader(entry)

    def close(self) -> None:
        self._files.close()

    # -- by id -----------------------------------------------------------
    def locate(self, object_id: int) -> tuple[int, int] | None:
        """(chunk id, sub-chunk id) of an object, from the director index."""
        if not INT64_MIN <= object_id <= INT64_MAX:
            raise ValidationError(f"object id {object_id} is not a 64-bit integer")
        index = bisect.bisect_right(self._director_starts, object_id) - 1
        if index < 0 or self._director[index].key_max[0] < object_id:
            return None
        found = self.reader(self._director[index]).get((object_id,), [CHUNK_ID, SUB_CHUNK_ID])
        if found is None:
            return None
        return int(found[CHUNK_ID]), int(found[SUB_CHUNK_ID])

    def locate_many(self, object_ids: np.ndarray) -> tuple[IntArray, IntArray, np.ndarray]:
        """(chunk ids, sub-chunk ids, found) of many objects, from the director index."""
        ids = np.asarray(object_ids, dtype=np.int64)
        chunk = np.zeros(len(ids), dtype=np.int64)
        sub = np.zeros(len(ids), dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        keys = [(int(i),) for i in ids]
        for entry in self._director:
            answer = self.reader(entry).get_many(keys, [CHUNK_ID, SUB_CHUNK_ID])
            where = answer.column(QUERY_INDEX).to_numpy()
            chunk[where] = answer.column(CHUNK_ID).to_numpy()
            sub[where] = answer.column(SUB_CHUNK_ID).to_numpy()
            found[where] = True
        return chunk, sub, found

    def get(self, object_id: int, columns: Sequence[str] | None = None) -> dict[str, Any] | None:
        """The object's row (every column, or ``columns``), or ``None``."""
        cell = self.locate(object_id)
        if cell is None:
            return None
        chunk_id, sub_chunk_id = cell
        entry = self.chunk_files.file_of(chunk_id)
        if entry is None:
            return None
        return self.reader(entry).get((chunk_id, sub_chunk_id, object_id), columns)

    # -- by region -------------------------------------------------------
    def plan_search(self, region: Region) -> SearchPlan:
        """The chunk files and sub-chunks a region may touch (no file is read)."""
        touched = region.sub_chunks(self.chunker)
        files = {}
        for chunk_id in touched:
            entry = self.chunk_files.file_of(int(chunk_id))
            # The file's key range says whether it holds any row of the chunk.
            if entry is not None and entry.key_min[0] <= chunk_id <= entry.key_max[0]:
                files[int(chunk_id)] = entry
        return SearchPlan(region, {c: touched[c] for c in files}, files)

    def search(
        self,
        region: Region,
        columns: Sequence[str] | None = None,
        *,
        limit: int | None = None,
    ) -> pa.Table:
        """Rows inside ``region`` (every column, or ``columns`` plus ``object_id``, ``ra``,
        ``dec``), by chunk then sub-chunk then id; cones add ``distance_arcsec``."""
        plan = self.plan_search(region)
        wanted = None if columns is None else _with_position(columns)
        pieces = []
        found = 0
        for chunk_id in plan.chunks:
            subs = plan.sub_chunks[chunk_id]
            reader = self.reader(plan.files[chunk_id])
            read_columns = None if wanted is None else [*wanted, SUB_CHUNK_ID]
            low, high = (chunk_id, int(subs[0])), (chunk_id, int(subs[-1]))
            for table in reader.scan(low, high, read_columns):
                keep = np.isin(table.column(SUB_CHUNK_ID).to_numpy(), subs)
                ra = table.column("ra").to_numpy()
                dec = table.column("dec").to_numpy()
                keep &= region.contains(ra, dec)
                if not keep.any():
                    continue
                piece = table.filter(pa.array(keep))
                if wanted is not None:
                    piece = piece.select(wanted)
                pieces.append(piece)
                found += piece.num_rows
            if limit is not None and found >= limit:
                break
        if not pieces:
            schema = self._schema(wanted)
            result = schema.empty_table()
        else:
            result = pa.concat_tables(pieces)
        if isinstance(region, Circle):
            distance = angular_separation(
                region.ra,
                region.dec,
                result.column("ra").to_numpy(),
                result.column("dec").to_numpy(),
            )
            result = result.append_column(DISTANCE_COLUMN, pa.array(distance * 3600.0))
        if limit is not None and result.num_rows > limit:
            result = result.slice(0, limit)
        return result

    def _schema(self, wanted: Sequence[str] | None) -> pa.Schema:
        if not self.chunk_files:
            return pa.schema([(OBJECT_ID, pa.int64()), ("ra", pa.float64()), ("dec", pa.float64())])
        schema = self.reader(self.chunk_files.entries[0]).schema
        names = schema.names if wanted is None else wanted
        return pa.schema([schema.field(n) for n in names])

    def columns(self) -> list[str]:
        return list(self._schema(None).names)


def _with_position(columns: Sequence[str]) -> list[str]:
    if isinstance(columns, str):
        raise TypeError("columns must be a sequence of column names, not one string")
    return list(dict.fromkeys([OBJECT_ID, "ra", "dec", *columns]))


class ObjectCatalogs:
    """Every partitioned object table of a catalog, opened on first use.

    A name is a dataset (``sky.Object``) or an object collection holding one
    director table (``sky``); ``None`` means the only such table. Tables older
    than ``refresh_seconds`` are reopened if the catalog's change token says it
    changed since they were opened, so newly partitioned data shows.
    """

    def __init__(self, catalog: Catalog, *, refresh_seconds: float = 30.0) -> None:
        self.catalog = catalog
        self.refresh_seconds = refresh_seconds
        # name -> (when last found current, the change token it was opened at, table)
        self._tables: dict[str, tuple[float, Hashable, ObjectTable]] = {}
        self._lock = threading.Lock()

    def _object_tables(self, collection: str | None = None) -> list[Dataset]:
        tables: list[Dataset] = []
        for coll in self.catalog.list_collections():
            if coll.kind is not RecordKind.OBJECTS or (collection and coll.name != collection):
                continue
            tables.extend(
                d
                for d in self.catalog.list_datasets(coll.name)
                if d.attributes.get(ROLE_ATTRIBUTE) == DIRECTOR_ROLE
            )
        return tables

    def resolve(self, name: str | None) -> Dataset:
        """The dataset a name means; ``NotFoundError`` naming what is there otherwise."""
        if name is not None:
            try:
                dataset = self.catalog.get_dataset(name)
            except NotFoundError:
                dataset = None
            if dataset is not None:
                if "spatial.num_stripes" not in dataset.attributes:
                    raise NotFoundError(f"dataset {name!r} is not a spatially partitioned table")
                return dataset
        candidates = self._object_tables(name)
        if len(candidates) == 1:
            return candidates[0]
        known = ", ".join(d.name for d in self._object_tables()) or "none"
        if name is None:
            raise NotFoundError(
                f"{'several' if candidates else 'no'} object catalogs, name one (known: {known})"
            )
        if candidates:
            names = ", ".join(d.name for d in candidates)
            raise NotFoundError(f"catalog {name!r} holds several tables, name one: {names}")
        raise NotFoundError(f"no object catalog {name!r} (known: {known})")

    def table(self, name: str | None) -> ObjectTable:
        now = time.monotonic()
        with self._lock:
            cached = self._tables.get(name or "")
        if cached is not None and now - cached[0] < self.refresh_seconds:
            return cached[2]
        # The token before opening: a change made meanwhile reopens it next time.
        token = self.catalog.change_token()
        if cached is not None and token == cached[1]:
            with self._lock:
                self._tables[name or ""] = (now, token, cached[2])
            return cached[2]
        table = ObjectTable(self.catalog, self.resolve(name))
        with self._lock:
            # The table it replaces may be in use by another thread: its readers close
            # when the last user drops it.
            self._tables[name or ""] = (now, token, table)
        return table

    def close(self) -> None:
        with self._lock:
            tables = [t for _, _, t in self._tables.values()]
            self._tables.clear()
        for table in tables:
            table.close()


def cone(ra: float, dec: float, radius_arcsec: float) -> Circle:
    """A cone from a radius in arcseconds (validated like every region)."""
    radius = float(radius_arcsec)
    if not (math.isfinite(radius) and 0.0 < radius <= 180.0 * 3600.0):
        raise SpatialError(f"radius must be in (0, 648000] arcseconds, not {radius_arcsec!r}")
    # A subnormal radius in arcsec underflows in degrees: keep it a (tiny) positive cone.
    return Circle(ra, dec, max(radius / 3600.0, sys.float_info.min))


__all__ = [
    "DISTANCE_COLUMN",
    "ChunkFiles",
    "ObjectCatalogs",
    "ObjectTable",
    "SearchPlan",
    "cone",
]
