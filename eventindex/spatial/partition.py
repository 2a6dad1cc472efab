"""Spatial partitioning: a table with positions → chunk, overlap and director map-files.

The transform is pure (pyarrow in, pyarrow out) so that the local path and the
Spark job run the same code:

* ``assign_cells`` adds ``chunk_id`` and ``sub_chunk_id`` to every row and
  builds the overlap rows (a row copied into each neighbouring sub-chunk whose
  overlap it lies in, with that sub-chunk's ids);
* ``file_pieces`` sorts rows by (chunk, sub-chunk, object id) in one sort and
  cuts them into one table per file group;
* ``director_table`` is the object id → (chunk, sub-chunk) index.

Files hold whole chunks: ``FileGroups`` cuts each stripe's chunks into runs of
at most ``chunks_per_file`` neighbours, the same runs for every table on the
grid (so two catalogs' files line up for a crossmatch). ``PartitionedWriter``
registers a dataset with the grid and the layout in its attributes and writes
per group a chunk file (home rows) and an overlap file (copies), keyed
``(chunk_id, sub_chunk_id, object_id)`` so that a chunk, and a sub-chunk in it,
is one key range; part = ``"first-last"`` chunk ids of the group. The director
is keyed by ``object_id``. Chunk and sub-chunk ids are Qserv's, in every row.
``partition_local`` streams any number of input batches through it, parking
rows in buckets of whole groups (on disk once the input outgrows memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.base import Catalog
from catalog.fileset import FilesetWriter, committed_entry, forget_files
from catalog.model import Collection, Dataset, FileKind, FileState, TagFile, new_file_id
from eventindex.errors import (
    AlreadyExistsError,
    EventIndexError,
    NotFoundError,
    StorageError,
    ValidationError,
)
from eventindex.records.schema import RecordKind
from eventindex.spatial.chunker import Chunker, IntArray, SpatialError
from eventindex.storage import MapFileInfo, MapFileWriter, WriteOptions

OBJECT_ID = "object_id"
CHUNK_ID = "chunk_id"
SUB_CHUNK_ID = "sub_chunk_id"
CHUNK_KEY: tuple[str, ...] = (CHUNK_ID, SUB_CHUNK_ID, OBJECT_ID)
DIRECTOR_KEY: tuple[str, ...] = (OBJECT_ID,)
ROLE_ATTRIBUTE = "spatial.role"
DIRECTOR_ROLE = "director"
CHILD_ROLE = "child"
DIRECTOR_TABLE_ATTRIBUTE = "spatial.director"
CHILD_KEY_ATTRIBUTE = "spatial.child_key"
LAYOUT_ATTRIBUTE = "spatial.layout"
LAYOUT = "chunk-groups/1"
CHUNKS_PER_FILE_ATTRIBUTE = "spatial.chunks_per_file"
# A few dozen chunks a file: hundreds of files for the whole sky, not tens of thousands.
DEFAULT_CHUNKS_PER_FILE = 32
# object ids → (chunk ids, sub-chunk ids, found mask), from a director index.
DirectorLookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Columns:
    """Which input columns hold the object id and the position (renamed on the way in
    to ``object_id``, ``ra``, ``dec``)."""

    object_id: str = OBJECT_ID
    ra: str = "ra"
    dec: str = "dec"


DEFAULT_COLUMNS = Columns()


def _column(table: pa.Table, name: str, role: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ValidationError(
            f"input has no {role} column {name!r} (columns: {table.column_names})"
        )
    column = table.column(name)
    if column.null_count:
        first = int(pc.index(pc.is_null(column), True).as_py())
        raise ValidationError(f"{role} column {name!r} is null in row {first}")
    return column


def normalize(table: pa.Table, columns: Columns = DEFAULT_COLUMNS) -> pa.Table:
    """The table with ``object_id`` (int64), ``ra`` and ``dec`` (float64) first, the other
    columns after; refuses missing, null or non-numeric id and position columns."""
    wanted = {"object_id": columns.object_id, "ra": columns.ra, "dec": columns.dec}
    arrays: dict[str, pa.ChunkedArray] = {}
    for target, source in wanted.items():
        column = _column(table, source, target)
        kind = pa.int64() if target == OBJECT_ID else pa.float64()
        is_integer = pa.types.is_integer(column.type)
        if (target == OBJECT_ID and not is_integer) or not (
            is_integer or pa.types.is_floating(column.type)
        ):
            raise ValidationError(f"{target} column {source!r} has type {column.type}")
        try:
            arrays[target] = column.cast(kind)
        except pa.ArrowInvalid as exc:
            raise ValidationError(f"{target} column {source!r}: {exc}") from None
    reserved = {CHUNK_ID, SUB_CHUNK_ID} & set(table.column_names)
    if reserved:
        raise ValidationError(f"input columns {sorted(reserved)} are reserved for the partitioner")
    rest = [n for n in table.column_names if n not in wanted.values() and n not in wanted]
    return pa.table(
        {**arrays, **{n: table.column(n) for n in rest}},
    )


def _take(table: pa.Table, rows: np.ndarray) -> pa.Table:
    # The indices are the partitioner's own, in range by construction: skip the check.
    taken: pa.Table = pc.take(table, pa.array(rows), boundscheck=False)
    return taken


def assign_cells(table: pa.Table, chunker: Chunker) -> tuple[pa.Table, pa.Table]:
    """(rows with their home ``chunk_id``/``sub_chunk_id``, overlap copies with the ids
    of the sub-chunk they are copied into). ``table`` is normalized."""
    ra = table.column("ra").to_numpy()
    dec = table.column("dec").to_numpy()
    try:
        chunk, sub, overlap = chunker.assign(ra, dec)
    except SpatialError as exc:
        raise ValidationError(str(exc)) from None
    primary = table.append_column(CHUNK_ID, pa.array(chunk.astype(np.int32))).append_column(
        SUB_CHUNK_ID, pa.array(sub.astype(np.int32))
    )
    copies = (
        _take(table, overlap.rows)
        .append_column(CHUNK_ID, pa.array(overlap.chunk_ids.astype(np.int32)))
        .append_column(SUB_CHUNK_ID, pa.array(overlap.sub_chunk_ids.astype(np.int32)))
    )
    return primary, copies


def parse_part(part: str) -> tuple[int, int]:
    """(first, last) chunk id of a chunk or overlap file's part, ``"first-last"``."""
    first, sep, last = part.partition("-")
    if not (sep and first.isdigit() and last.isdigit()):
        raise ValidationError(f"part {part!r} of a chunk file is not 'first-last' chunk ids")
    return int(first), int(last)


@dataclass(frozen=True)
class FileGroups:
    """Which chunks share a file: the chunks of each stripe, cut into as few runs of
    at most ``chunks_per_file`` neighbours as can be, of (nearly) equal length.

    Groups depend on the grid alone, never on the data, so every table on one grid
    cuts its files alike. A group is named by a dense index (in chunk id order) and
    by its part, ``"first-last"`` chunk ids.
    """

    chunker: Chunker
    chunks_per_file: int = DEFAULT_CHUNKS_PER_FILE
    first_chunks: IntArray = field(init=False, repr=False, compare=False)
    last_chunks: IntArray = field(init=False, repr=False, compare=False)
    # Group index by chunk id (-1 between stripes' last chunk and the next stripe).
    _index: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.chunks_per_file <= 1 << 20:
            raise ValidationError(
                f"chunks_per_file must be in [1, {1 << 20}], not {self.chunks_per_file}"
            )
        per_stripe = self.chunker.chunks_per_stripe
        groups = -(-per_stripe // self.chunks_per_file)
        offsets = np.cumsum(groups) - groups
        stripe = np.repeat(np.arange(len(groups)), groups)
        index = np.arange(int(groups.sum())) - np.repeat(offsets, groups)
        nc, k = per_stripe[stripe], groups[stripe]
        base = 2 * self.chunker.num_stripes * stripe
        # Group g of a stripe holds the columns c with c·k // nc == g.
        first = base + (index * nc + k - 1) // k
        last = base + ((index + 1) * nc + k - 1) // k - 1
        lookup = np.full(2 * self.chunker.num_stripes**2, -1, dtype=np.int32)
        lookup[self.chunker.all_chunks()] = np.repeat(
            np.arange(len(first), dtype=np.int32), last - first + 1
        )
        object.__setattr__(self, "first_chunks", first)
        object.__setattr__(self, "last_chunks", last)
        object.__setattr__(self, "_index", lookup)

    def __len__(self) -> int:
        return len(self.first_chunks)

    def index_of(self, chunk_ids: np.ndarray) -> np.ndarray:
        """The dense group index (int32) of every chunk id (valid ids of the grid)."""
        found: np.ndarray = self._index[chunk_ids]
        return found

    def part(self, index: int) -> str:
        return f"{int(self.first_chunks[index])}-{int(self.last_chunks[index])}"


def cell_order(chunk: np.ndarray, sub: np.ndarray, ids: np.ndarray, chunker: Chunker) -> IntArray:
    """The permutation that sorts rows by (chunk, sub-chunk, object id).

    Rows whose ids already rise (input in id order, the usual case) need no id
    key: the row position breaks ties, packed below the cell into one int64, and
    one plain (SIMD) sort of those unique keys gives the order at a fraction of a
    lexsort's or a stable argsort's cost.
    """
    n = len(chunk)
    cells = chunk.astype(np.int64) * (chunker.num_sub_stripes * chunker.max_sub_chunks_per_chunk)
    cells += sub
    if n < 2:
        return np.arange(n, dtype=np.int64)
    if bool(np.all(ids[1:] >= ids[:-1])):
        dense = _dense_cells(cells)
        if dense is not None:
            # A stable sort of 16-bit keys is a radix sort: linear, 3-5x the packed sort.
            return np.argsort(dense, kind="stable")
        if int(cells.max()) < (2**63 - 1) // n:
            keys = cells * n
            keys += np.arange(n, dtype=np.int64)
            keys.sort()
            keys %= n
            return keys
        return np.argsort(cells, kind="stable")
    return np.lexsort((ids, cells))


def _dense_cells(cells: np.ndarray) -> np.ndarray | None:
    """Each cell's rank among the distinct cells (uint16, same order), or ``None`` when
    there are more than 2^16 of them or they spread too thin for a lookup table.

    A file group's rows (a bucket of them) touch a few tens of thousands of cells.
    """
    low = int(cells.min())
    span = int(cells.max()) - low + 1
    if span > max(len(cells), 1 << 20):
        return None
    offsets = cells - low
    present = np.zeros(span, dtype=bool)
    present[offsets] = True
    rank = np.cumsum(present, dtype=np.int32)
    if int(rank[-1]) > 1 << 16:
        return None
    rank -= 1
    dense: np.ndarray = rank.astype(np.uint16)[offsets]
    return dense


def file_pieces(table: pa.Table, groups: FileGroups) -> Iterator[tuple[int, pa.Table]]:
    """(group index, its rows sorted by chunk, sub-chunk, object id), for every group
    with rows, in group order."""
    if table.num_rows == 0:
        return
    chunk = table.column(CHUNK_ID).to_numpy()
    order = cell_order(
        chunk,
        table.column(SUB_CHUNK_ID).to_numpy(),
        table.column(OBJECT_ID).to_numpy(),
        groups.chunker,
    )
    ordered = _take(table, order)
    index = groups.index_of(chunk[order])
    cuts = np.flatnonzero(np.diff(index)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(index)]])
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(index[start]), ordered.slice(start, end - start)


def write_sorted(
    table: pa.Table,
    uri: str,
    key: tuple[str, ...],
    options: WriteOptions,
    metadata: dict[str, str],
) -> MapFileInfo:
    """Commit one map-file of rows already in key order (the writer checks the order;
    ``write_mapfile`` would encode and check the keys a second time)."""
    if table.num_rows == 0:
        raise StorageError(f"{uri}: refusing to write an empty map-file")
    with MapFileWriter(uri, table.schema, key, options, metadata) as writer:
        writer.write(table)
    assert writer.info is not None
    return writer.info


def director_write_options(options: WriteOptions) -> WriteOptions:
    """Director files: unique rising ids delta-packed, no dictionaries (ids never
    repeat, and chunk ids of neighbouring ids are scattered over the sky)."""
    return replace(
        options,
        # A pick decodes two int32 columns of one group: 16k rows cost it little.
        row_group_rows=max(options.row_group_rows, 16384),
        dictionary_columns=(),
        column_encoding=((OBJECT_ID, "DELTA_BINARY_PACKED"),),
    )


def chunk_write_options(options: WriteOptions, schema: pa.Schema) -> WriteOptions:
    """How chunk and overlap files are encoded: positions and other floats split by
    byte stream (random doubles do not dictionary-encode), object ids delta-packed,
    dictionaries for the rest (chunk and sub-chunk ids repeat for thousands of rows)."""
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    encoding = [(name, "BYTE_STREAM_SPLIT") for name in floats]
    if pa.types.is_integer(schema.field(OBJECT_ID).type):
        encoding.append((OBJECT_ID, "DELTA_BINARY_PACKED"))
    special = {name for name, _ in encoding}
    return replace(
        options,
        dictionary_columns=tuple(n for n in schema.names if n not in special),
        column_encoding=tuple(encoding),
    )


def director_table(primary: pa.Table) -> pa.Table:
    """The director index rows of partitioned rows: object id → chunk, sub-chunk."""
    return primary.select([OBJECT_ID, CHUNK_ID, SUB_CHUNK_ID])


def check_unique_ids(sorted_ids: np.ndarray) -> None:
    """``ValidationError`` naming a duplicated object id of a sorted id array."""
    same = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if len(same):
        raise ValidationError(
            f"object_id {int(sorted_ids[same[0]])} occurs more than once "
            f"({len(same)} duplicate ids): a director table needs unique ids"
        )


# -- writing ------------------------------------------------------------------


@dataclass
class PartitionSummary:
    """What a partitioning run wrote."""

    dataset: str
    rows: int = 0
    overlap_rows: int = 0
    chunks: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    parameters: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "rows": self.rows,
            "overlap_rows": self.overlap_rows,
            "chunks": self.chunks,
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds) if self.seconds else None,
            "parameters": self.parameters,
        }


def dataset_name(catalog_name: str, table: str) -> str:
    return f"{catalog_name}.{table}"


class PartitionedWriter:
    """Writes the map-files of one partitioned table and registers them.

    Refuses up front an event collection of that name and a dataset
    ``<catalog>.<table>`` that exists; creates both (the dataset with the grid and
    the file layout in its attributes) only when its first file is registered, so a
    refused run registers nothing. A child table takes its director's grid and file
    groups. Every file is registered ``writing`` first, written atomically, then
    committed, as ``FilesetWriter`` does; ``discard`` undoes a failed run.
    """

    def __init__(
        self,
        catalog: Catalog,
        store_root: str,
        catalog_name: str,
        table: str,
        chunker: Chunker,
        options: WriteOptions | None = None,
        *,
        director: str | None = None,
        child_key: str | None = None,
        chunks_per_file: int | None = None,
        write_threads: int = 4,
    ) -> None:
        self.catalog = catalog
        self.write_threads = write_threads
        if (director is None) != (child_key is None):
            raise ValueError("a child table names both its director table and its own key")
        self.chunk_key = CHUNK_KEY if child_key is None else (*CHUNK_KEY, child_key)
        if director is not None:
            # A child's files line up with its director's: same grid, same runs of chunks.
            chunks_per_file = director_chunks_per_file(catalog, director, chunker, chunks_per_file)
        elif chunks_per_file is None:
            chunks_per_file = DEFAULT_CHUNKS_PER_FILE
        self.chunker = chunker
        self.groups = FileGroups(chunker, chunks_per_file)
        self.files = FilesetWriter(catalog, store_root, options)
        attributes = {
            **chunker.parameters(),
            LAYOUT_ATTRIBUTE: LAYOUT,
            CHUNKS_PER_FILE_ATTRIBUTE: str(chunks_per_file),
            ROLE_ATTRIBUTE: CHILD_ROLE if director else DIRECTOR_ROLE,
        }
        if director and child_key:
            attributes[DIRECTOR_TABLE_ATTRIBUTE] = director
            attributes[CHILD_KEY_ATTRIBUTE] = child_key
        self.dataset = Dataset(
            name=dataset_name(catalog_name, table),
            collection=catalog_name,
            format="chunked",
            attributes=attributes,
        )
        self.summary = PartitionSummary(self.dataset.name, parameters=chunker.parameters())
        self._chunks: set[int] = set()
        # What this run registered, for ``discard`` to undo if it fails.
        self.committed: list[TagFile] = []
        self._dataset_ready = False
        self._prepare(catalog_name)

    def _prepare(self, catalog_name: str) -> None:
        """Refuse, before any work, another kind of collection or a dataset that exists.

        An existing dataset that holds no file and carries these very attributes is
        what a failed run leaves (the catalog cannot drop a dataset): it is taken over.
        """
        with contextlib.suppress(NotFoundError):
            _check_objects(self.catalog.get_collection(catalog_name))
        try:
            existing = self.catalog.get_dataset(self.dataset.name)
        except NotFoundError:
            return
        if (
            existing.collection != self.dataset.collection
            or existing.format != self.dataset.format
            or existing.attributes != self.dataset.attributes
            or self.catalog.list_tagfiles(dataset=existing.name, states=None)
        ):
            raise AlreadyExistsError(f"dataset {existing.name!r} already exists")
        self._dataset_ready = True

    def _write_one(self, kind: FileKind, part: str, write: Callable[[str], MapFileInfo]) -> TagFile:
        file_id = new_file_id()
        entry = TagFile(
            file_id=file_id,
            dataset=self.dataset.name,
            collection=self.dataset.collection,
            kind=kind,
            uri=self.files.uri_for(self.dataset, kind, file_id, part),
            part=part,
            state=FileState.WRITING,
        )
        self.ensure_dataset()
        self.catalog.add_tagfile(entry)
        try:
            return self.commit(entry, write(entry.uri))
        except BaseException:
            self._forget(entry)
            raise

    def write_chunks(self, pieces: list[tuple[int, FileKind, pa.Table]]) -> list[TagFile]:
        """Chunk (``CHUNK``) and overlap (``OVERLAP``) files, one per (group index, kind),
        each table already sorted by the chunk key.

        Entries are registered in one batch, files written on ``write_threads``
        threads (Parquet encoding releases the GIL; a commit waits on fsync), and
        each committed.
        """
        entries = []
        for index, kind, _ in pieces:
            if kind not in (FileKind.CHUNK, FileKind.OVERLAP):
                raise ValueError(f"not a chunk kind: {kind}")
            file_id = new_file_id()
            part = self.groups.part(index)
            entries.append(
                TagFile(
                    file_id=file_id,
                    dataset=self.dataset.name,
                    collection=self.dataset.collection,
                    kind=kind,
                    uri=self.files.uri_for(self.dataset, kind, file_id, part),
                    part=part,
                    state=FileState.WRITING,
                )
            )
        if not entries:
            return []
        self.ensure_dataset()
        self.catalog.add_tagfiles(entries)
        options = chunk_write_options(self.files.options, pieces[0][2].schema)

        def write(index: int) -> MapFileInfo:
            _, kind, table = pieces[index]
            meta = {"dataset": self.dataset.name, "kind": kind.value, "chunks": entries[index].part}
            return write_sorted(table, entries[index].uri, self.chunk_key, options, meta)

        committed: list[TagFile] = []
        failure: BaseException | None = None
        with ThreadPoolExecutor(self.write_threads) as pool:
            futures = [pool.submit(write, i) for i in range(len(entries))]
            try:
                for entry, future, (_, kind, table) in zip(entries, futures, pieces, strict=True):
                    committed.append(self.commit(entry, future.result()))
                    if kind is FileKind.CHUNK:
                        self.summary.rows += table.num_rows
                        chunk = table.column(CHUNK_ID).to_numpy()  # sorted
                        starts = np.flatnonzero(np.diff(chunk)) + 1
                        self._chunks.update([int(chunk[0]), *chunk[starts].tolist()])
                        self.summary.chunks = len(self._chunks)
                    else:
                        self.summary.overlap_rows += table.num_rows
            except BaseException as exc:
                for future in futures:
                    future.cancel()
                failure = exc
        if failure is not None:
            # The pool has let its running writes finish: none can put a file in place
            # after its entry is forgotten.
            done = {e.file_id for e in committed}
            for entry in entries:
                if entry.file_id not in done:
                    self._forget(entry)
            raise failure
        return committed

    def commit(self, entry: TagFile, info: MapFileInfo) -> TagFile:
        """Commit a registered entry with what its writer learned."""
        committed = self.catalog.commit_tagfile(committed_entry(entry, info))
        self.summary.files += 1
        self.summary.bytes += info.bytes
        self.committed.append(committed)
        return committed

    def _forget(self, entry: TagFile) -> None:
        """Undo one file: the file if it got renamed into place, and the entry, whatever its
        state (``discard`` forgets committed files too)."""
        forget_files(self.catalog, [entry], writing_only=False)

    def write_director(self, tables: Iterable[pa.Table]) -> TagFile:
        """One director file from tables whose object ids rise across calls."""
        meta = {"dataset": self.dataset.name, "kind": FileKind.DIRECTOR.value}

        def write(uri: str) -> MapFileInfo:
            writer: MapFileWriter | None = None
            try:
                for table in tables:
                    if writer is None:
                        options = director_write_options(self.files.options)
                        writer = MapFileWriter(uri, table.schema, DIRECTOR_KEY, options, meta)
                    writer.write(table)
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            if writer is None:
                raise StorageError(f"{uri}: refusing to write an empty director file")
            return writer.close()

        return self._write_one(FileKind.DIRECTOR, "", write)

    def write_pieces(self, primary: pa.Table, overlap: pa.Table) -> None:
        """Chunk and overlap files for every file group of already assigned rows."""
        pieces = [(i, FileKind.CHUNK, t) for i, t in file_pieces(primary, self.groups)]
        pieces += [(i, FileKind.OVERLAP, t) for i, t in file_pieces(overlap, self.groups)]
        self.write_chunks(pieces)

    def ensure_dataset(self) -> None:
        """Create the collection (if new) and the dataset, once, as the first file is
        about to be registered."""
        if self._dataset_ready:
            return
        name = self.dataset.collection
        try:
            self.catalog.create_collection(
                Collection(name, RecordKind.OBJECTS, "spatially partitioned catalog")
            )
        except AlreadyExistsError:
            _check_objects(self.catalog.get_collection(name))
        self.catalog.create_dataset(self.dataset)
        self._dataset_ready = True

    def discard(self) -> None:
        """Undo a failed run: every file it committed (retired, deleted, forgotten). A
        dataset the run created stays, holding no file: a new run takes it over."""
        committed, self.committed = self.committed, []
        with contextlib.suppress(EventIndexError):
            self.catalog.retire_tagfiles([e.file_id for e in committed])
        for entry in committed:
            self._forget(entry)

    @contextlib.contextmanager
    def undo_on_failure(self) -> Iterator[PartitionedWriter]:
        """This writer, for the length of a run that ``discard`` undoes if it raises."""
        try:
            yield self
        except BaseException:
            self.discard()
            raise


def _check_objects(collection: Collection) -> None:
    if collection.kind is not RecordKind.OBJECTS:
        raise ValidationError(
            f"collection {collection.name!r} holds {collection.kind.value}, not objects"
        )


def director_chunks_per_file(
    catalog: Catalog, director: str, chunker: Chunker, chunks_per_file: int | None = None
) -> int:
    """The chunks per file recorded by the director table ``director``, which its child
    tables share with its grid: ``ValidationError`` if ``chunker`` or a given
    ``chunks_per_file`` differ from the director's."""
    attributes = catalog.get_dataset(director).attributes
    if attributes.get(ROLE_ATTRIBUTE) != DIRECTOR_ROLE:
        raise ValidationError(f"{director} is not a director table: a child table needs one")
    try:
        grid = Chunker.from_parameters(attributes)
    except SpatialError as exc:
        raise ValidationError(f"{director}: {exc}") from None
    if grid != chunker:
        raise ValidationError(
            f"a child table is partitioned on its director's grid: {director} has "
            f"{grid.parameters()}, not {chunker.parameters()}"
        )
    recorded = attributes.get(CHUNKS_PER_FILE_ATTRIBUTE, "")
    if not recorded.isdigit():
        raise ValidationError(
            f"{director} records no {CHUNKS_PER_FILE_ATTRIBUTE} ({recorded!r}): partition it again"
        )
    if chunks_per_file is not None and chunks_per_file != int(recorded):
        raise ValidationError(
            f"a child table's files hold as many chunks per file as its director's: "
            f"{director} has {recorded}, not {chunks_per_file}"
        )
    return int(recorded)


# -- the local driver ---------------------------------------------------------


class _Buckets:
    """Assigned rows parked in buckets of whole file groups: in memory while they fit
    in ``memory_rows`` rows and ``memory_bytes`` bytes; beyond, the largest buckets
    move to Arrow IPC files (one per kind and bucket) under a temporary folder and
    take their later rows there, so only what exceeds the budget is ever spilled.
    Splitting by bucket costs a radix sort of small bucket numbers and one gather;
    each bucket is then sorted and written alone."""

    def __init__(
        self,
        groups: FileGroups,
        buckets: int,
        memory_rows: int | None,
        memory_bytes: int,
        spill_dir: str | None,
    ) -> None:
        self.groups = groups
        self.buckets = max(1, min(buckets, len(groups), 1 << 16))
        self.memory_rows = memory_rows
        self.memory_bytes = memory_bytes
        self.spill_dir = spill_dir
        self.directory: Path | None = None
        self._held: dict[tuple[str, int], list[pa.Table]] = {}
        self._held_rows: dict[tuple[str, int], int] = {}
        self._total_rows = 0
        self._row_bytes = 1.0
        self._writers: dict[tuple[str, int], pa.ipc.RecordBatchFileWriter] = {}
        self._schema: pa.Schema | None = None

    def add(self, kind: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._schema = table.schema
        self._row_bytes = max(self._row_bytes, table.nbytes / table.num_rows)
        index = self.groups.index_of(table.column(CHUNK_ID).to_numpy())
        bucket = (index.astype(np.int64) * self.buckets // len(self.groups)).astype(np.uint16)
        order = np.argsort(bucket, kind="stable")
        ordered = _take(table, order)
        bucket = bucket[order]
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        starts = np.concatenate([[0], cuts]).tolist()
        ends = np.concatenate([cuts, [len(bucket)]]).tolist()
        for start, end in zip(starts, ends, strict=True):
            key = (kind, int(bucket[start]))
            piece = ordered.slice(start, end - start)
            writer = self._writers.get(key)
            if writer is not None:
                writer.write_table(piece)
            else:
                self._held.setdefault(key, []).append(piece)
                self._held_rows[key] = self._held_rows.get(key, 0) + piece.num_rows
                self._total_rows += piece.num_rows
        limit = int(self.memory_bytes / self._row_bytes)
        if self.memory_rows is not None:
            limit = min(limit, self.memory_rows)
        while self._total_rows > limit:
            self._spill(max(self._held_rows, key=self._held_rows.__getitem__))

    def _spill(self, key: tuple[str, int]) -> None:
        """Move one bucket to disk; its later rows follow it there."""
        if self.directory is None:
            self.directory = Path(
                tempfile.mkdtemp(prefix="eventindex-partition-", dir=self.spill_dir)
            )
        pieces = self._held.pop(key)
        self._total_rows -= self._held_rows.pop(key)
        writer = self._writer(key, pieces[0].schema)
        for piece in pieces:
            writer.write_table(piece)

    def _writer(self, key: tuple[str, int], schema: pa.Schema) -> pa.ipc.RecordBatchFileWriter:
        writer = self._writers.get(key)
        if writer is None:
            assert self.directory is not None
            path = self.directory / f"{key[0]}-{key[1]:05d}.arrow"
            writer = pa.ipc.new_file(str(path), schema)
            self._writers[key] = writer
        return writer

    def tables(self) -> Iterator[tuple[pa.Table, pa.Table]]:
        """(home rows, overlap copies) of each bucket in turn, in group order."""
        for writer in self._writers.values():
            writer.close()
        schema = self._schema
        if schema is None:
            return
        for bucket in range(self.buckets):
            yield self._read("chunk", bucket, schema), self._read("overlap", bucket, schema)

    def _read(self, kind: str, bucket: int, schema: pa.Schema) -> pa.Table:
        key = (kind, bucket)
        if key in self._writers:
            assert self.directory is not None
            path = self.directory / f"{kind}-{bucket:05d}.arrow"
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all()
        pieces = self._held.pop(key, [])
        return pa.concat_tables(pieces) if pieces else schema.empty_table()

    def close(self) -> None:
        for writer in self._writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        self._held, self._held_rows = {}, {}
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


_PR_SET_THP_DISABLE = 41


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """Transparent huge pages off for this process while it partitions (Linux).

    Partitioning allocates and frees gigabytes of short-lived buffers; the kernel
    zeroes each fresh 2 MiB page whole, which cost a fifth of the job's CPU time.
    """
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
                libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)


# Bytes of assigned rows held in memory before buckets spill to disk when the caller
# names no budget (the command passes ``[spatial] partition_memory_mb``'s).
PARTITION_MEMORY_BYTES = 3 << 30


@small_pages()
def partition_local(
    batches: Iterable[pa.Table],
    writer: PartitionedWriter,
    *,
    columns: Columns = DEFAULT_COLUMNS,
    memory_rows: int | None = None,
    memory_bytes: int = PARTITION_MEMORY_BYTES,
    spill_buckets: int = 64,
    director_file_rows: int = 50_000_000,
    spill_dir: str | None = None,
) -> PartitionSummary:
    """Partition every input table in this process, in bounded memory.

    Assigned rows go to ``spill_buckets`` buckets of whole file groups, held in
    memory up to ``memory_bytes`` (and ``memory_rows`` rows, if given) and the
    excess spilled to disk (under ``spill_dir``, else the system's temporary
    folder); each bucket is then sorted and written in turn. Object ids are
    checked unique before any file is written.
    """
    started = time.perf_counter()
    chunker = writer.chunker
    ids: list[np.ndarray] = []
    cells: list[tuple[np.ndarray, np.ndarray]] = []
    schema: pa.Schema | None = None
    buckets = _Buckets(writer.groups, spill_buckets, memory_rows, memory_bytes, spill_dir)
    try:
        for table in _slices(batches, columns):
            primary, overlap = assign_cells(table, chunker)
            if schema is None:
                schema = primary.schema
            elif not primary.schema.equals(schema):
                raise ValidationError(
                    f"input batches differ in schema:\n{primary.schema}\nvs\n{schema}"
                )
            ids.append(primary.column(OBJECT_ID).to_numpy())
            cells.append(
                (primary.column(CHUNK_ID).to_numpy(), primary.column(SUB_CHUNK_ID).to_numpy())
            )
            buckets.add("chunk", primary)
            buckets.add("overlap", overlap)
        if schema is None:
            raise ValidationError("the input holds no rows")
        all_ids = np.concatenate(ids)
        ids.clear()
        order = (
            None
            if bool(np.all(all_ids[1:] >= all_ids[:-1]))
            else np.argsort(all_ids, kind="stable")
        )
        sorted_ids = all_ids if order is None else all_ids[order]
        check_unique_ids(sorted_ids)
        for primary, overlap in buckets.tables():
            writer.write_pieces(primary, overlap)
        chunk_ids = np.concatenate([c for c, _ in cells])
        sub_ids = np.concatenate([s for _, s in cells])
        cells.clear()
        if order is not None:
            chunk_ids, sub_ids = chunk_ids[order], sub_ids[order]
        for start in range(0, len(sorted_ids), director_file_rows):
            stop = start + director_file_rows
            writer.write_director(
                _director_slices(sorted_ids[start:stop], chunk_ids[start:stop], sub_ids[start:stop])
            )
    finally:
        buckets.close()
    writer.summary.seconds = time.perf_counter() - started
    return writer.summary


# Input is assigned in slices of this many rows: every array of a slice is then small
# enough for the allocator to reuse its memory instead of mapping fresh pages.
ASSIGN_ROWS = 1 << 20


def _slices(batches: Iterable[pa.Table], columns: Columns) -> Iterator[pa.Table]:
    """Normalized input in slices of at most ``ASSIGN_ROWS`` rows (zero-copy)."""
    for raw in batches:
        table = normalize(raw, columns)
        for start in range(0, table.num_rows, ASSIGN_ROWS):
            yield table.slice(start, ASSIGN_ROWS)


def _director_slices(
    ids: np.ndarray, chunk_ids: np.ndarray, sub_ids: np.ndarray, step: int = 4_000_000
) -> Iterator[pa.Table]:
    for start in range(0, len(ids), step):
        yield pa.table(
            {
                OBJECT_ID: pa.array(ids[start : start + step], pa.int64()),
                CHUNK_ID: pa.array(chunk_ids[start : start + step], pa.int32()),
                SUB_CHUNK_ID: pa.array(sub_ids[start : start + step], pa.int32()),
            }
        )


def input_tables(
    source: str, catalog: Catalog | None = None, *, batch_rows: int = 4_000_000
) -> Iterator[pa.Table]:
    """Tables of about ``batch_rows`` rows from a Parquet file or folder, a CSV file
    (``.csv``, ``.csv.gz``), or a dataset of the catalog (its committed master files)."""
    import pyarrow.csv as pacsv
    import pyarrow.dataset as pads

    if catalog is not None and "/" not in source and not source.endswith((".csv", ".parquet")):
        try:
            entries = catalog.list_tagfiles(dataset=source, kinds=[FileKind.MASTER])
        except NotFoundError:
            entries = []
        else:
            if not entries:
                raise ValidationError(f"dataset {source!r} has no committed master files")
        if entries:
            uris = [e.uri for e in entries]
            yield from _batched(
                pads.dataset(uris, format="parquet").to_batches(batch_size=batch_rows)
            )
            return
    if not Path(source).exists() and "://" not in source:
        raise ValidationError(f"input {source!r} is neither a file, a folder nor a dataset")
    if source.endswith((".csv", ".csv.gz")):
        reader = pacsv.open_csv(source, read_options=pacsv.ReadOptions(block_size=64 * 2**20))
        yield from _batched(iter(reader))
        return
    try:
        batches = pads.dataset(source, format="parquet").to_batches(batch_size=batch_rows)
        yield from _batched(batches)
    except pa.ArrowInvalid as exc:
        raise ValidationError(f"input {source!r}: {exc}") from None


def _batched(batches: Iterator[pa.RecordBatch], rows: int = 4_000_000) -> Iterator[pa.Table]:
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        if held >= rows:
            yield pa.Table.from_batches(pending)
            pending, held = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


def partition_children(
    batches: Iterable[pa.Table], writer: PartitionedWriter, lookup: DirectorLookup
) -> PartitionSummary:
    """Partition a child table (rows keyed by their own id, pointing at an object by
    ``object_id``) by its objects' chunks from the director index: chunk files
    keyed (sub-chunk, object id, child id), no overlap. Rows whose object the
    director does not hold are refused before anything is written."""
    started = time.perf_counter()
    child_key = writer.chunk_key[-1]
    pieces = []
    for table in batches:
        if table.num_rows == 0:
            continue
        ids = _column(table, OBJECT_ID, "object_id").cast(pa.int64())
        key = _column(table, child_key, child_key)
        if not pa.types.is_integer(key.type):
            raise ValidationError(f"child key column {child_key!r} has type {key.type}")
        chunk, sub, found = lookup(ids.to_numpy())
        if not found.all():
            missing = ids.to_numpy()[~found]
            raise ValidationError(
                f"object_id {int(missing[0])} of a child row is not in the director table "
                f"({len(missing)} rows point at unknown objects)"
            )
        pieces.append(
            table.set_column(table.column_names.index(OBJECT_ID), OBJECT_ID, ids)
            .append_column(CHUNK_ID, pa.array(chunk.astype(np.int32)))
            .append_column(SUB_CHUNK_ID, pa.array(sub.astype(np.int32)))
        )
    if not pieces:
        raise ValidationError("the input holds no rows")
    rows = pa.concat_tables(pieces)
    with writer.undo_on_failure():
        writer.write_chunks([(i, FileKind.CHUNK, t) for i, t in file_pieces(rows, writer.groups)])
    writer.summary.seconds = time.perf_counter() - started
    return writer.summary
