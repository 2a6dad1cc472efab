"""Map-files: Parquet files sorted by the collection key, with an in-memory key index.

A map-file is an ordinary Parquet file (Spark, DuckDB and pandas read it as it
is) with three additions in its footer's key-value metadata:

* ``eventindex.format``: ``mapfile/1``;
* ``eventindex.key``: the key column names, in sort order;
* ``eventindex.row_groups``: the first and last key of every row group.

Opening a file reads only the footer. A lookup bisects the row-group key
ranges in memory, reads that row group's key columns (kept in a bounded LRU
cache, so warm lookups skip even that), bisects inside it, and then reads
only the requested columns of that one row group, as Hadoop's MapFile seeks
from its in-memory index. Files are written under a temporary name, flushed
(and fsynced on local disks) and renamed into place, so a reader never sees a
partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from eventindex.errors import StorageError
from eventindex.storage.filesystem import CHECKSUM_ALGORITHM, resolve
from eventindex.storage.keys import (
    EncodedKeys,
    decode_key,
    encode_key_columns,
    encode_query_keys,
)

FORMAT = "mapfile/1"
META_FORMAT = b"eventindex.format"
META_KEY = b"eventindex.key"
META_ROW_GROUPS = b"eventindex.row_groups"
QUERY_INDEX = "_query_index"

Key = tuple[int, ...]


@dataclass(frozen=True)
class MapFileInfo:
    """What a writer learned about the file it committed (goes into the catalog)."""

    uri: str
    rows: int
    bytes: int
    checksum: str
    key_min: Key
    key_max: Key
    row_groups: int


@dataclass(frozen=True)
class WriteOptions:
    row_group_rows: int = 16384
    compression: str = "zstd"
    compression_level: int | None = 3


# -- writing ----------------------------------------------------------------


class _HashingSink:
    """A file-like sink that hashes what passes through, so no re-read is needed."""

    def __init__(self, stream: pa.NativeFile) -> None:
        self._stream = stream
        self._digest = hashlib.blake2b(digest_size=16)
        self.size = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        self._digest.update(data)
        self._stream.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    @property
    def checksum(self) -> str:
        return f"{CHECKSUM_ALGORITHM}:{self._digest.hexdigest()}"


def _key_arrays(table: pa.Table, key: Sequence[str]) -> list[np.ndarray[Any, Any]]:
    arrays = []
    for name in key:
        if name not in table.column_names:
            raise StorageError(f"key column {name!r} is missing (columns: {table.column_names})")
        column = table.column(name)
        if not pa.types.is_integer(column.type):
            raise StorageError(f"key column {name!r} must be an integer type, not {column.type}")
        if column.null_count:
            raise StorageError(f"key column {name!r} has {column.null_count} null values")
        arrays.append(column.to_numpy())
    return arrays


def sort_by_key(table: pa.Table, key: Sequence[str]) -> pa.Table:
    """The table sorted by its key (returned as is when it already is)."""
    encoded = encode_key_columns(_key_arrays(table, key))
    if len(encoded) < 2 or bool(np.all(encoded[1:] >= encoded[:-1])):
        return table
    return table.take(pa.array(np.argsort(encoded, kind="stable")))


def _fsync_local(filesystem: pafs.FileSystem, path: str) -> None:
    if isinstance(filesystem, pafs.LocalFileSystem):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_mapfile(
    table: pa.Table,
    uri: str,
    key: Sequence[str],
    options: WriteOptions | None = None,
    metadata: Mapping[str, str] | None = None,
) -> MapFileInfo:
    """Sort ``table`` by ``key`` and commit it atomically as a map-file at ``uri``.

    Duplicate keys are kept (next to each other); a consistency check, not the
    storage layer, decides whether a duplicate is an error.
    """
    options = options or WriteOptions()
    key = list(key)
    table = sort_by_key(table, key)
    encoded = encode_key_columns(_key_arrays(table, key))
    rows = table.num_rows
    if rows == 0:
        raise StorageError(f"{uri}: refusing to write an empty map-file")
    step = options.row_group_rows
    starts = list(range(0, rows, step))
    bounds = [
        [*_decode(encoded[s], table, key), *_decode(encoded[min(s + step, rows) - 1], table, key)]
        for s in starts
    ]
    file_metadata = {
        META_FORMAT: FORMAT.encode(),
        META_KEY: orjson.dumps(key),
        META_ROW_GROUPS: orjson.dumps(bounds),
    }
    for name, value in (metadata or {}).items():
        file_metadata[f"eventindex.{name}".encode()] = value.encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **file_metadata})

    filesystem, path = resolve(uri)
    directory = posixpath.dirname(path)
    temporary = posixpath.join(directory, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        filesystem.create_dir(directory, recursive=True)
        sink = _HashingSink(filesystem.open_output_stream(temporary))
        try:
            compression = None if options.compression == "none" else options.compression
            with pq.ParquetWriter(
                sink,
                table.schema,
                compression=compression,
                compression_level=options.compression_level if compression else None,
                write_statistics=key,
                sorting_columns=[pq.SortingColumn(table.schema.get_field_index(k)) for k in key],
            ) as writer:
                writer.write_table(table, row_group_size=step)
        finally:
            sink.close()
        _fsync_local(filesystem, temporary)
        filesystem.move(temporary, path)
        if isinstance(filesystem, pafs.LocalFileSystem):
            _fsync_local(filesystem, directory)
    except BaseException:
        with contextlib.suppress(OSError, FileNotFoundError):
            filesystem.delete_file(temporary)
        raise
    return MapFileInfo(
        uri=uri,
        rows=rows,
        bytes=sink.size,
        checksum=sink.checksum,
        key_min=tuple(bounds[0][: len(key)]),
        key_max=tuple(bounds[-1][len(key) :]),
        row_groups=len(starts),
    )


def key_dtypes(schema: pa.Schema, key: Sequence[str]) -> list[np.dtype[Any]]:
    return [np.dtype(schema.field(k).type.to_pandas_dtype()) for k in key]


def _decode(encoded: bytes, table: pa.Table, key: Sequence[str]) -> Key:
    return decode_key(encoded, key_dtypes(table.schema, key))


# -- the key cache ------------------------------------------------------------


class KeyCache:
    """A process-wide LRU of decoded row-group keys, bounded in bytes.

    Warm lookups then read only the payload columns of one row group.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, int], EncodedKeys] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, token: tuple[int, int]) -> EncodedKeys | None:
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(token)
            self.hits += 1
            return entry

    def put(self, token: tuple[int, int], keys: EncodedKeys) -> None:
        with self._lock:
            if token in self._entries:
                return
            self._entries[token] = keys
            self._bytes += keys.nbytes
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def drop(self, reader_id: int) -> None:
        with self._lock:
            for token in [t for t in self._entries if t[0] == reader_id]:
                self._bytes -= self._entries.pop(token).nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes


DEFAULT_KEY_CACHE = KeyCache()
_reader_ids = iter(range(1, 2**62))
_reader_ids_lock = threading.Lock()


def _next_reader_id() -> int:
    with _reader_ids_lock:
        return next(_reader_ids)


# -- reading ------------------------------------------------------------------


class MapFileReader:
    """Random access by key to one map-file: get, batched get, range scan.

    Thread-safe for concurrent lookups. Raises ``StorageError`` naming the URI
    when the file is missing, is not Parquet, or is not a map-file.
    """

    def __init__(self, uri: str, key_cache: KeyCache | None = None) -> None:
        self.uri = uri
        self._cache = key_cache if key_cache is not None else DEFAULT_KEY_CACHE
        self._id = _next_reader_id()
        self._lock = threading.Lock()
        filesystem, path = resolve(uri)
        try:
            if isinstance(filesystem, pafs.LocalFileSystem):
                self._file = pq.ParquetFile(path, memory_map=True)
            else:
                self._file = pq.ParquetFile(filesystem.open_input_file(path))
        except FileNotFoundError as exc:
            raise StorageError(f"{uri}: map-file not found") from exc
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"{uri}: not a readable Parquet file: {exc}") from exc
        self.schema: pa.Schema = self._file.schema_arrow
        meta = self._file.metadata.metadata or {}
        if meta.get(META_FORMAT) != FORMAT.encode():
            raise StorageError(f"{uri}: not a map-file (no {META_FORMAT.decode()}={FORMAT})")
        try:
            self.key: tuple[str, ...] = tuple(orjson.loads(meta[META_KEY]))
            bounds = orjson.loads(meta[META_ROW_GROUPS])
        except (KeyError, orjson.JSONDecodeError) as exc:
            raise StorageError(f"{uri}: damaged map-file key metadata: {exc}") from exc
        self._key_dtypes = key_dtypes(self.schema, self.key)
        width = len(self.key)
        if len(bounds) != self._file.num_row_groups or any(len(b) != 2 * width for b in bounds):
            raise StorageError(
                f"{uri}: row-group key index has {len(bounds)} entries for "
                f"{self._file.num_row_groups} row groups"
            )
        self._first = encode_query_keys([b[:width] for b in bounds], self._key_dtypes)
        self._last = encode_query_keys([b[width:] for b in bounds], self._key_dtypes)
        self._row_group_rows = [
            self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)
        ]
        self.metadata: dict[str, str] = {
            k.decode()[len("eventindex.") :]: v.decode()
            for k, v in meta.items()
            if k.startswith(b"eventindex.") and k not in (META_FORMAT, META_KEY, META_ROW_GROUPS)
        }

    # -- properties --------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self._file.metadata.num_rows)

    @property
    def num_row_groups(self) -> int:
        return int(self._file.num_row_groups)

    @property
    def key_min(self) -> Key:
        return decode_key(bytes(self._first[0]), self._key_dtypes)

    @property
    def key_max(self) -> Key:
        return decode_key(bytes(self._last[-1]), self._key_dtypes)

    def row_group_key_range(self, index: int) -> tuple[Key, Key]:
        return (
            decode_key(bytes(self._first[index]), self._key_dtypes),
            decode_key(bytes(self._last[index]), self._key_dtypes),
        )

    # -- internals ---------------------------------------------------------
    def _read_row_group(self, index: int, columns: Sequence[str] | None) -> pa.Table:
        try:
            with self._lock:
                return self._file.read_row_group(index, columns=columns, use_threads=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"{self.uri}: cannot read row group {index}: {exc}") from exc

    def _keys_of(self, index: int) -> EncodedKeys:
        token = (self._id, index)
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        table = self._read_row_group(index, self.key)
        keys = encode_key_columns([table.column(k).to_numpy() for k in self.key])
        self._cache.put(token, keys)
        return keys

    def _check_columns(self, columns: Sequence[str] | None) -> list[str] | None:
        if columns is None:
            return None
        unknown = [c for c in columns if c not in self.schema.names]
        if unknown:
            raise KeyError(f"unknown columns {unknown}; this file has {self.schema.names}")
        return list(columns)

    def _candidate_row_groups(self, encoded: EncodedKeys) -> np.ndarray[Any, Any]:
        """Row group that may hold each key, or -1 where none can."""
        groups = np.searchsorted(self._first, encoded, side="right") - 1
        safe = np.clip(groups, 0, None)
        inside = (groups >= 0) & (encoded <= self._last[safe])
        return np.where(inside, groups, -1)

    # -- lookups -----------------------------------------------------------
    def get(
        self, key: Sequence[int], columns: Sequence[str] | None = None
    ) -> dict[str, Any] | None:
        """The first row whose key equals ``key``, as a dict of the requested columns."""
        found = self.get_many([key], columns)
        if found.num_rows == 0:
            return None
        row = found.drop_columns([QUERY_INDEX]).slice(0, 1).to_pylist()[0]
        return row  # type: ignore[no-any-return]

    def get_many(
        self, keys: Sequence[Sequence[int]], columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Every row matching any of ``keys``, reading each needed row group once.

        The result has the requested columns plus ``_query_index``, the
        position in ``keys`` each row answers; it is ordered by key.
        """
        wanted = self._check_columns(columns)
        encoded = encode_query_keys(keys, self._key_dtypes)
        groups = self._candidate_row_groups(encoded)
        pieces = []
        for group in np.unique(groups[groups >= 0]):
            query_positions = np.flatnonzero(groups == group)
            group_keys = self._keys_of(int(group))
            lo = np.searchsorted(group_keys, encoded[query_positions], side="left")
            hi = np.searchsorted(group_keys, encoded[query_positions], side="right")
            counts = hi - lo
            if not counts.any():
                continue
            rows = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True) if b > a])
            answered = np.repeat(query_positions, counts)
            piece = self._read_row_group(int(group), wanted).take(pa.array(rows))
            pieces.append(piece.append_column(QUERY_INDEX, pa.array(answered, pa.int64())))
        if not pieces:
            schema = (
                self.schema if wanted is None else pa.schema([self.schema.field(c) for c in wanted])
            )
            return schema.empty_table().append_column(QUERY_INDEX, pa.array([], pa.int64()))
        return pa.concat_tables(pieces)

    def scan(
        self,
        key_min: Sequence[int] | None = None,
        key_max: Sequence[int] | None = None,
        columns: Sequence[str] | None = None,
    ) -> Iterator[pa.Table]:
        """Rows with ``key_min <= key <= key_max`` (either bound optional), one table per
        row group, in key order."""
        wanted = self._check_columns(columns)
        lower = encode_query_keys([key_min], self._key_dtypes)[0] if key_min is not None else None
        upper = encode_query_keys([key_max], self._key_dtypes)[0] if key_max is not None else None
        for group in range(self.num_row_groups):
            if upper is not None and self._first[group] > upper:
                break
            if lower is not None and self._last[group] < lower:
                continue
            table = self._read_row_group(group, wanted)
            first_inside = lower is None or self._first[group] >= lower
            last_inside = upper is None or self._last[group] <= upper
            if first_inside and last_inside:
                yield table
                continue
            group_keys = self._keys_of(group)
            start = 0 if lower is None else int(np.searchsorted(group_keys, lower, side="left"))
            stop = (
                len(group_keys)
                if upper is None
                else int(np.searchsorted(group_keys, upper, side="right"))
            )
            if stop > start:
                yield table.slice(start, stop - start)

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole file (or some columns of it)."""
        wanted = self._check_columns(columns)
        try:
            with self._lock:
                return self._file.read(columns=wanted)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"{self.uri}: cannot read: {exc}") from exc

    def close(self) -> None:
        self._cache.drop(self._id)
        self._file.close()

    def __enter__(self) -> MapFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
