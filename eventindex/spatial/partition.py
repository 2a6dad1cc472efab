"""Spatial partitioning: a table with positions → chunk, overlap and director map-files.

The transform is pure (pyarrow in, pyarrow out) so that the local path and the
Spark job run the same code:

* ``assign_cells`` adds ``chunk_id`` and ``sub_chunk_id`` to every row and
  builds the overlap rows (a row copied into each neighbouring sub-chunk whose
  overlap it lies in, with that sub-chunk's ids);
* ``chunk_pieces`` sorts rows by (chunk, sub-chunk, object id) and cuts them
  into one table per chunk;
* ``director_table`` is the object id → (chunk, sub-chunk) index.

``PartitionedWriter`` registers a dataset with the grid parameters in its
attributes and writes each piece as a map-file: chunk and overlap files keyed
``(sub_chunk_id, object_id)`` (so a sub-chunk is a key-prefix range), part =
chunk id; the director keyed by ``object_id``. ``partition_local`` streams any
number of input batches through it, spilling to disk by stripe when the input
is larger than memory allows.
"""

from __future__ import annotations

import contextlib
import shutil
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
from catalog.fileset import FilesetWriter
from catalog.model import Collection, Dataset, FileKind, FileState, TagFile, new_file_id
from eventindex.errors import EventIndexError, NotFoundError, StorageError, ValidationError
from eventindex.records.schema import RecordKind
from eventindex.spatial.chunker import Chunker, SpatialError
from eventindex.storage import MapFileInfo, MapFileWriter, WriteOptions, write_mapfile
from eventindex.storage.filesystem import delete_file, exists

OBJECT_ID = "object_id"
CHUNK_ID = "chunk_id"
SUB_CHUNK_ID = "sub_chunk_id"
CHUNK_KEY: tuple[str, ...] = (SUB_CHUNK_ID, OBJECT_ID)
DIRECTOR_KEY: tuple[str, ...] = (OBJECT_ID,)
ROLE_ATTRIBUTE = "spatial.role"
DIRECTOR_ROLE = "director"
CHILD_ROLE = "child"
DIRECTOR_TABLE_ATTRIBUTE = "spatial.director"
CHILD_KEY_ATTRIBUTE = "spatial.child_key"
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


def assign_cells(table: pa.Table, chunker: Chunker) -> tuple[pa.Table, pa.Table]:
    """(rows with their home ``chunk_id``/``sub_chunk_id``, overlap copies with the ids
    of the sub-chunk they are copied into). ``table`` is normalized."""
    ra = table.column("ra").to_numpy()
    dec = table.column("dec").to_numpy()
    try:
        chunk, sub = chunker.locate(ra, dec)
        overlap = chunker.overlap_of(ra, dec)
    except SpatialError as exc:
        raise ValidationError(str(exc)) from None
    primary = table.append_column(CHUNK_ID, pa.array(chunk.astype(np.int32))).append_column(
        SUB_CHUNK_ID, pa.array(sub.astype(np.int32))
    )
    copies = (
        table.take(pa.array(overlap.rows))
        .append_column(CHUNK_ID, pa.array(overlap.chunk_ids.astype(np.int32)))
        .append_column(SUB_CHUNK_ID, pa.array(overlap.sub_chunk_ids.astype(np.int32)))
    )
    return primary, copies


def chunk_pieces(table: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """(chunk id, its rows sorted by sub-chunk then object id), for every chunk present."""
    if table.num_rows == 0:
        return
    chunk = table.column(CHUNK_ID).to_numpy()
    sub = table.column(SUB_CHUNK_ID).to_numpy()
    ids = table.column(OBJECT_ID).to_numpy()
    # One packed cell key (sub-chunk ids are below 2**20): a stable sort of it keeps
    # rows whose ids already rise in id order, at less than half a lexsort's cost.
    cell = chunk.astype(np.int64) << 20 | sub.astype(np.int64)
    if len(ids) < 2 or bool(np.all(ids[1:] >= ids[:-1])):
        order = np.argsort(cell, kind="stable")
    else:
        order = np.lexsort((ids, cell))
    ordered = table.take(pa.array(order))
    chunk = chunk[order]
    cuts = np.flatnonzero(np.diff(chunk)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(chunk)]])
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(chunk[start]), ordered.slice(start, end - start)


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

    Creates the object collection if needed (refusing an event collection of that
    name) and the dataset ``<catalog>.<table>`` (refusing one that exists), with
    the grid in its attributes. Every file is registered ``writing`` first, written
    atomically, then committed, as ``FilesetWriter`` does.
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
        write_threads: int = 8,
    ) -> None:
        self.catalog = catalog
        self.write_threads = write_threads
        if (director is None) != (child_key is None):
            raise ValueError("a child table names both its director table and its own key")
        self.chunk_key = CHUNK_KEY if child_key is None else (*CHUNK_KEY, child_key)
        self.chunker = chunker
        self.files = FilesetWriter(catalog, store_root, options)
        attributes = {
            **chunker.parameters(),
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
        self._prepare(catalog_name)

    def _prepare(self, catalog_name: str) -> None:
        try:
            collection = self.catalog.get_collection(catalog_name)
        except NotFoundError:
            self.catalog.create_collection(
                Collection(catalog_name, RecordKind.OBJECTS, "spatially partitioned catalog")
            )
        else:
            if collection.kind is not RecordKind.OBJECTS:
                raise ValidationError(
                    f"collection {catalog_name!r} holds {collection.kind.value}, not objects"
                )
        self.catalog.create_dataset(self.dataset)

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
        self.catalog.add_tagfile(entry)
        try:
            return self.commit(entry, write(entry.uri))
        except BaseException:
            self._forget(entry)
            raise

    def write_chunks(self, pieces: list[tuple[int, FileKind, pa.Table]]) -> list[TagFile]:
        """Chunk (``CHUNK``) and overlap (``OVERLAP``) files, each table already sorted.

        Entries are registered in one batch, files written on ``write_threads``
        threads (a commit waits on fsync, not on the CPU), and each committed.
        """
        entries = []
        for chunk_id, kind, _ in pieces:
            if kind not in (FileKind.CHUNK, FileKind.OVERLAP):
                raise ValueError(f"not a chunk kind: {kind}")
            file_id = new_file_id()
            entries.append(
                TagFile(
                    file_id=file_id,
                    dataset=self.dataset.name,
                    collection=self.dataset.collection,
                    kind=kind,
                    uri=self.files.uri_for(self.dataset, kind, file_id, str(chunk_id)),
                    part=str(chunk_id),
                    state=FileState.WRITING,
                )
            )
        if not entries:
            return []
        self.catalog.add_tagfiles(entries)

        def write(index: int) -> MapFileInfo:
            chunk_id, kind, table = pieces[index]
            meta = {"dataset": self.dataset.name, "kind": kind.value, "chunk_id": str(chunk_id)}
            return write_mapfile(
                table, entries[index].uri, self.chunk_key, self.files.options, meta
            )

        committed = []
        with ThreadPoolExecutor(self.write_threads) as pool:
            futures = [pool.submit(write, i) for i in range(len(entries))]
            try:
                for entry, future, (chunk_id, kind, table) in zip(
                    entries, futures, pieces, strict=True
                ):
                    committed.append(self.commit(entry, future.result()))
                    if kind is FileKind.CHUNK:
                        self.summary.rows += table.num_rows
                        self._chunks.add(chunk_id)
                        self.summary.chunks = len(self._chunks)
                    else:
                        self.summary.overlap_rows += table.num_rows
            except BaseException:
                for future in futures:
                    future.cancel()
                done = {e.file_id for e in committed}
                for entry in entries:
                    if entry.file_id not in done:
                        self._forget(entry)
                raise
        return committed

    def commit(self, entry: TagFile, info: MapFileInfo) -> TagFile:
        """Commit a registered entry with what its writer learned."""
        committed = self.catalog.commit_tagfile(
            replace(
                entry,
                rows=info.rows,
                bytes=info.bytes,
                checksum=info.checksum,
                key_min=info.key_min,
                key_max=info.key_max,
                state=FileState.COMMITTED,
                committed_at=time.time(),
            )
        )
        self.summary.files += 1
        self.summary.bytes += info.bytes
        return committed

    def _forget(self, entry: TagFile) -> None:
        """Undo one unfinished file: the file if it got renamed into place, and the entry."""
        with contextlib.suppress(EventIndexError, OSError):
            if exists(entry.uri):
                delete_file(entry.uri)
            self.catalog.remove_tagfile(entry.file_id)

    def write_director(self, tables: Iterable[pa.Table]) -> TagFile:
        """One director file from tables whose object ids rise across calls."""
        meta = {"dataset": self.dataset.name, "kind": FileKind.DIRECTOR.value}

        def write(uri: str) -> MapFileInfo:
            writer: MapFileWriter | None = None
            try:
                for table in tables:
                    if writer is None:
                        writer = MapFileWriter(
                            uri, table.schema, DIRECTOR_KEY, self.files.options, meta
                        )
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
        """Chunk and overlap files for every chunk of already assigned rows."""
        pieces = [(c, FileKind.CHUNK, t) for c, t in chunk_pieces(primary)]
        pieces += [(c, FileKind.OVERLAP, t) for c, t in chunk_pieces(overlap)]
        self.write_chunks(pieces)


# -- the local driver ---------------------------------------------------------


class _Spill:
    """Assigned rows parked on disk in buckets of whole stripes (Arrow IPC files)."""

    def __init__(self, directory: Path, chunker: Chunker, buckets: int) -> None:
        self.directory = directory
        self.buckets = buckets
        self.chunker = chunker
        self._writers: dict[tuple[str, int], pa.ipc.RecordBatchFileWriter] = {}

    def bucket_of(self, chunk_ids: np.ndarray) -> np.ndarray:
        stripes = chunk_ids // (2 * self.chunker.num_stripes)
        return stripes * self.buckets // self.chunker.num_stripes

    def add(self, kind: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        bucket = self.bucket_of(table.column(CHUNK_ID).to_numpy())
        order = np.argsort(bucket, kind="stable")
        ordered = table.take(pa.array(order))
        bucket = bucket[order]
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        for start, end in zip(
            np.concatenate([[0], cuts]).tolist(),
            np.concatenate([cuts, [len(bucket)]]).tolist(),
            strict=True,
        ):
            key = (kind, int(bucket[start]))
            writer = self._writers.get(key)
            if writer is None:
                path = self.directory / f"{kind}-{key[1]:04d}.arrow"
                writer = pa.ipc.new_file(str(path), table.schema)
                self._writers[key] = writer
            writer.write_table(ordered.slice(start, end - start))

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()

    def read(self, kind: str, bucket: int, schema: pa.Schema) -> pa.Table:
        path = self.directory / f"{kind}-{bucket:04d}.arrow"
        if not path.exists():
            return schema.empty_table()
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()


def partition_local(
    batches: Iterable[pa.Table],
    writer: PartitionedWriter,
    *,
    columns: Columns = DEFAULT_COLUMNS,
    memory_rows: int = 20_000_000,
    spill_buckets: int = 32,
    director_file_rows: int = 50_000_000,
    spill_dir: str | None = None,
) -> PartitionSummary:
    """Partition every input table in this process, in bounded memory.

    Up to ``memory_rows`` assigned rows are kept in memory; beyond that they are
    spilled to buckets of whole stripes under a temporary folder and each bucket
    is written in turn (under ``spill_dir``, else the system's temporary folder).
    Object ids are checked unique before any file is written.
    """
    started = time.perf_counter()
    chunker = writer.chunker
    primaries: list[pa.Table] = []
    overlaps: list[pa.Table] = []
    held = 0
    ids: list[np.ndarray] = []
    cells: list[tuple[np.ndarray, np.ndarray]] = []
    spill: _Spill | None = None
    spill_path: str | None = None
    schema: pa.Schema | None = None
    try:
        for raw in batches:
            table = normalize(raw, columns)
            if table.num_rows == 0:
                continue
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
            primaries.append(primary)
            overlaps.append(overlap)
            held += primary.num_rows + overlap.num_rows
            if held > memory_rows:
                if spill is None:
                    spill_path = tempfile.mkdtemp(prefix="eventindex-partition-", dir=spill_dir)
                    spill = _Spill(Path(spill_path), chunker, spill_buckets)
                for piece in primaries:
                    spill.add("chunk", piece)
                for piece in overlaps:
                    spill.add("overlap", piece)
                primaries, overlaps, held = [], [], 0
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
        if spill is None:
            writer.write_pieces(pa.concat_tables(primaries), pa.concat_tables(overlaps))
        else:
            for piece in primaries:
                spill.add("chunk", piece)
            for piece in overlaps:
                spill.add("overlap", piece)
            primaries, overlaps = [], []
            spill.close()
            for bucket in range(spill_buckets):
                writer.write_pieces(
                    spill.read("chunk", bucket, schema), spill.read("overlap", bucket, schema)
                )
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
        if spill is not None:
            spill.close()
        if spill_path is not None:
            shutil.rmtree(spill_path, ignore_errors=True)
    writer.summary.seconds = time.perf_counter() - started
    return writer.summary


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
    writer.write_chunks([(c, FileKind.CHUNK, t) for c, t in chunk_pieces(rows)])
    writer.summary.seconds = time.perf_counter() - started
    return writer.summary
