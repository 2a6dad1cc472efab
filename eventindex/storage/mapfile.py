"""Map-files: Parquet files sorted by the collection key, with an in-memory key index.

A map-file is an ordinary Parquet file (Spark, DuckDB and pandas read it as it
is) with three additions in its footer's key-value metadata:

* ``eventindex.format``: ``mapfile/1``;
* ``eventindex.key``: the key column names, in sort order;
* ``eventindex.row_groups``: the first and last key of every row group.

Opening a file reads only the footer. A lookup bisects the row-group key
ranges in memory, reads that row group's key columns (kept in a bounded LRU
cache, so warm lookups skip even that), bisects inside it, and then reads
only the requested non-key columns of that one row group, as Hadoop's MapFile
seeks from its in-memory index; key columns of the answer come from the key
index itself. Files are written under a temporary name, flushed (and fsynced
on local disks) and renamed into place, so a reader never sees a partial file.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import posixpath
import queue
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from eventindex.errors import StorageError
from eventindex.storage.filesystem import CHECKSUM_ALGORITHM, new_digest, resolve
from eventindex.storage.keys import (
    EncodedKeys,
    decode_key,
    decode_key_columns,
    encode_bound,
    encode_key,
    encode_key_columns,
    encode_query_keys,
)

FORMAT = "mapfile/1"
META_FORMAT = b"eventindex.format"
META_KEY = b"eventindex.key"
META_ROW_GROUPS = b"eventindex.row_groups"
QUERY_INDEX = "_query_index"
_META_PREFIX = b"eventindex."
_RESERVED_METADATA = frozenset({"format", "key", "row_groups"})

Key = tuple[int, ...]
IntArray = npt.NDArray[np.int64]


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
    """How map-files are laid out.

    ``row_group_rows`` is the unit a lookup decodes: smaller groups make a
    single pick cheaper and the footer and key index larger (see
    ``benchmarks/mapfile.py`` for the trade-off measured).
    """

    row_group_rows: int = 16384
    compression: str = "zstd"
    compression_level: int | None = 3
    # Dictionary-encode only these columns (None: all, Parquet's default), and give
    # others an encoding (e.g. BYTE_STREAM_SPLIT for random floats, which dictionaries
    # only make larger and slower to write).
    dictionary_columns: tuple[str, ...] | None = None
    column_encoding: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.row_group_rows < 1:
            raise ValueError(f"row_group_rows must be positive, not {self.row_group_rows}")


# -- writing ----------------------------------------------------------------


_SINK_BUFFER = 4 << 20


class _HashingSink:
    """A file-like sink that hashes what passes through, so no re-read is needed."""

    def __init__(self, stream: pa.NativeFile) -> None:
        self._stream = stream
        self._digest = new_digest()
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


def _check_key_fields(schema: pa.Schema, key: Sequence[str], where: str) -> None:
    if not key:
        raise StorageError(f"{where}: a map-file needs at least one key column")
    for name in key:
        if name not in schema.names:
            raise StorageError(f"{where}: key column {name!r} is missing (columns: {schema.names})")
        if not pa.types.is_integer(schema.field(name).type):
            raise StorageError(
                f"{where}: key column {name!r} must be an integer type, "
                f"not {schema.field(name).type}"
            )


def _key_arrays(table: pa.Table, key: Sequence[str]) -> list[npt.NDArray[Any]]:
    _check_key_fields(table.schema, key, "table")
    arrays = []
    for name in key:
        column = table.column(name)
        if column.null_count:
            raise StorageError(f"key column {name!r} has {column.null_count} null values")
        arrays.append(column.to_numpy())
    return arrays


def _is_sorted(encoded: EncodedKeys) -> bool:
    if len(encoded) < 2:
        return True
    width = encoded.dtype.itemsize
    if width % 8:
        return bool(np.all(encoded[1:] >= encoded[:-1]))
    # Bytes compared as big-endian 64-bit words, word by word: the same order as
    # NumPy's comparison of ``S`` strings, at a fraction of its cost.
    words = np.ascontiguousarray(encoded).view(">u8").reshape(len(encoded), width // 8)
    tied = np.ones(len(encoded) - 1, dtype=bool)
    for column in words.T:
        before, after = column[:-1], column[1:]
        if bool(np.any(tied & (after < before))):
            return False
        tied &= after == before
        if not tied.any():
            break
    return True


def sort_by_key(table: pa.Table, key: Sequence[str]) -> pa.Table:
    """The table sorted by its key (returned as is when it already is); ties keep their order."""
    encoded = encode_key_columns(_key_arrays(table, key))
    if _is_sorted(encoded):
        return table
    return table.take(pa.array(np.argsort(encoded, kind="stable")))


def key_dtypes(schema: pa.Schema, key: Sequence[str]) -> list[np.dtype[Any]]:
    """NumPy dtypes of the key columns, in key order."""
    return [np.dtype(schema.field(k).type.to_pandas_dtype()) for k in key]


def _fsync_local(filesystem: pafs.FileSystem, path: str) -> None:
    if isinstance(filesystem, pafs.LocalFileSystem):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class MapFileWriter:
    """Writes one map-file from tables that arrive in key order, in bounded memory.

    Each table given to ``write`` is sorted if it is not; across calls keys
    must not go back (``StorageError`` otherwise). Rows are buffered until a
    full row group is ready, so every row group but the last has exactly
    ``row_group_rows`` rows however the input is chunked. ``close`` commits
    (rename into place) and returns the ``MapFileInfo``; ``abort`` removes the
    temporary file. As a context manager it commits on success and aborts on
    any exception, so a failed write leaves no file behind.
    """

    def __init__(
        self,
        uri: str,
        schema: pa.Schema,
        key: Sequence[str],
        options: WriteOptions | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri
        self.key = list(key)
        self.options = options or WriteOptions()
        _check_key_fields(schema, self.key, uri)
        self._extra_metadata = dict(metadata or {})
        reserved = sorted(set(self._extra_metadata) & _RESERVED_METADATA)
        if reserved:
            raise StorageError(f"{uri}: metadata names {reserved} are reserved for the map-file")
        # A schema read from another map-file carries that file's footer entries
        # (its key index among them): drop them, this file writes its own.
        kept = {k: v for k, v in (schema.metadata or {}).items() if not k.startswith(_META_PREFIX)}
        self.schema = schema.with_metadata(kept) if schema.metadata else schema
        self._dtypes = key_dtypes(schema, self.key)
        self._pending: list[tuple[pa.Table, EncodedKeys]] = []
        self._pending_rows = 0
        self._last_key: EncodedKeys | None = None
        self._bounds: list[list[int]] = []
        self._rows = 0
        self._done = False
        self.info: MapFileInfo | None = None

        self._filesystem, self._path = resolve(uri)
        self._directory = posixpath.dirname(self._path)
        name = posixpath.basename(self._path)
        self._temporary = posixpath.join(self._directory, f".{name}.{uuid.uuid4().hex}.tmp")
        compression = None if self.options.compression == "none" else self.options.compression
        self._sink: _HashingSink | None = None
        self._stream: pa.NativeFile | None = None
        try:
            self._filesystem.create_dir(self._directory, recursive=True)
            self._sink = _HashingSink(self._filesystem.open_output_stream(self._temporary))
            # The Parquet writer writes every page to its sink: buffered natively, the
            # Python sink (which needs the GIL) is called once per few MiB, not per page.
            self._stream = pa.BufferedOutputStream(
                pa.PythonFile(self._sink, mode="w"), buffer_size=_SINK_BUFFER
            )
            self._writer = pq.ParquetWriter(
                self._stream,
                self.schema,
                compression=compression,
                compression_level=self.options.compression_level if compression else None,
                write_statistics=self.key,
                sorting_columns=[pq.SortingColumn(schema.get_field_index(k)) for k in self.key],
                use_dictionary=(
                    True
                    if self.options.dictionary_columns is None
                    else list(self.options.dictionary_columns)
                ),
                column_encoding=dict(self.options.column_encoding) or None,
            )
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError | pa.ArrowException):
                raise StorageError(f"{uri}: cannot create map-file: {exc}") from exc
            raise

    def write(self, table: pa.Table) -> None:
        """Append rows; their keys must not be below any key written before."""
        if self._done:
            raise StorageError(f"{self.uri}: writer is already closed")
        if not table.schema.equals(self.schema, check_metadata=False):
            raise StorageError(
                f"{self.uri}: table schema does not match the map-file schema:\n"
                f"{table.schema}\nvs\n{self.schema}"
            )
        if table.num_rows == 0:
            return
        encoded = encode_key_columns(_key_arrays(table, self.key))
        if not _is_sorted(encoded):
            order = np.argsort(encoded, kind="stable")
            table = table.take(pa.array(order))
            encoded = encoded[order]
        if self._last_key is not None and bool(encoded[0] < self._last_key[0]):
            raise StorageError(
                f"{self.uri}: rows out of key order: {self._decode(encoded[0])} "
                f"follows {self._decode(self._last_key[0])}"
            )
        self._last_key = encoded[-1:]
        self._pending.append((table, encoded))
        self._pending_rows += table.num_rows
        self._flush(final=False)

    def _decode(self, encoded: bytes) -> Key:
        return decode_key(encoded, self._dtypes)

    def _flush(self, final: bool) -> None:
        step = self.options.row_group_rows
        ready = self._pending_rows if final else self._pending_rows // step * step
        if ready == 0:
            return
        table = pa.concat_tables([piece for piece, _ in self._pending])
        encoded = np.concatenate([keys for _, keys in self._pending])
        starts = range(0, ready, step)
        bounds = [
            [*self._decode(encoded[s]), *self._decode(encoded[min(s + step, ready) - 1])]
            for s in starts
        ]
        try:
            self._writer.write_table(table.slice(0, ready), row_group_size=step)
        except BaseException:
            self.abort()
            raise
        self._bounds.extend(bounds)
        self._rows += ready
        rest = self._pending_rows - ready
        self._pending = [(table.slice(ready), encoded[ready:])] if rest else []
        self._pending_rows = rest

    def close(self) -> MapFileInfo:
        """Write the last row group and the footer, then rename the file into place."""
        if self.info is not None:
            return self.info
        if self._done:
            raise StorageError(f"{self.uri}: writer was aborted")
        self._flush(final=True)
        if self._rows == 0:
            self.abort()
            raise StorageError(f"{self.uri}: refusing to write an empty map-file")
        file_metadata = {
            META_FORMAT: FORMAT.encode(),
            META_KEY: orjson.dumps(self.key),
            META_ROW_GROUPS: orjson.dumps(self._bounds),
        }
        for name, value in self._extra_metadata.items():
            file_metadata[_META_PREFIX + name.encode()] = value.encode()
        assert self._sink is not None and self._stream is not None
        try:
            self._writer.add_key_value_metadata(file_metadata)
            self._writer.close()
            self._stream.close()
            self._sink.close()
            _fsync_local(self._filesystem, self._temporary)
            self._filesystem.move(self._temporary, self._path)
            _fsync_local(self._filesystem, self._directory)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError | pa.ArrowException):
                raise StorageError(f"{self.uri}: cannot commit map-file: {exc}") from exc
            raise
        self._done = True
        width = len(self.key)
        self.info = MapFileInfo(
            uri=self.uri,
            rows=self._rows,
            bytes=self._sink.size,
            checksum=self._sink.checksum,
            key_min=tuple(self._bounds[0][:width]),
            key_max=tuple(self._bounds[-1][width:]),
            row_groups=len(self._bounds),
        )
        return self.info

    def abort(self) -> None:
        """Give up: close everything and delete the temporary file (idempotent)."""
        if self._done:
            return
        self._done = True
        self._pending = []
        # The file is thrown away: its footer may fail to write, and that is fine.
        with contextlib.suppress(Exception):
            self._writer.close()
        self._discard()

    def _discard(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self._stream.close()
        if self._sink is not None:
            with contextlib.suppress(OSError):
                self._sink.close()
        # The temporary file may never have been created, or be gone already.
        with contextlib.suppress(OSError):
            self._filesystem.delete_file(self._temporary)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mapfile(
    table: pa.Table,
    uri: str,
    key: Sequence[str],
    options: WriteOptions | None = None,
    metadata: Mapping[str, str] | None = None,
) -> MapFileInfo:
    """Sort ``table`` by ``key`` and commit it atomically as a map-file at ``uri``.

    Duplicate keys are kept (next to each other, in input order); a
    consistency check, not the storage layer, decides whether a duplicate is
    an error. ``metadata`` entries land in the footer as ``eventindex.<name>``.
    """
    if table.num_rows == 0:
        raise StorageError(f"{uri}: refusing to write an empty map-file")
    table = sort_by_key(table, key)
    with MapFileWriter(uri, table.schema, key, options, metadata) as writer:
        writer.write(table)
    assert writer.info is not None
    return writer.info


# -- the key cache ------------------------------------------------------------


class KeyCache:
    """A process-wide LRU of encoded row-group keys, bounded in bytes.

    Warm lookups then read only the payload columns of one row group. An
    entry larger than the whole budget is not kept (it would evict everything
    else and then itself).
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, int], EncodedKeys] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, token: tuple[int, int]) -> EncodedKeys | None:
        """The keys of one (reader, row group), most recently used from now on."""
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(token)
            self.hits += 1
            return entry

    def put(self, token: tuple[int, int], keys: EncodedKeys) -> None:
        """Keep the keys of one (reader, row group), evicting the least recently used."""
        if keys.nbytes > self.max_bytes:
            return
        with self._lock:
            if token in self._entries:
                return
            self._entries[token] = keys
            self._bytes += keys.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def resize(self, max_bytes: int) -> None:
        """Change the budget, evicting the least recently used entries down to it."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, not {max_bytes}")
        with self._lock:
            self.max_bytes = max_bytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def drop(self, reader_id: int) -> None:
        """Forget every entry of one reader (it was closed)."""
        with self._lock:
            for token in [t for t in self._entries if t[0] == reader_id]:
                self._bytes -= self._entries.pop(token).nbytes

    def clear(self) -> None:
        """Forget everything (hit and miss counts stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes


DEFAULT_KEY_CACHE = KeyCache()

# Threads that read the row groups of one get_many: a process-wide pool, made on first use.
MAX_READ_THREADS = 8
DEFAULT_READ_THREADS = min(4, os.cpu_count() or 1)
# Below this many row groups a get_many reads them in the calling thread.
_PARALLEL_MIN_GROUPS = 4
_executor_lock = threading.Lock()
_shared_executor: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _shared_executor  # noqa: PLW0603 - one lazily made pool per process
    with _executor_lock:
        if _shared_executor is None:
            _shared_executor = ThreadPoolExecutor(
                MAX_READ_THREADS, thread_name_prefix="mapfile-read"
            )
        return _shared_executor


_reader_ids = iter(range(1, 2**62))
_reader_ids_lock = threading.Lock()


def _next_reader_id() -> int:
    with _reader_ids_lock:
        return next(_reader_ids)


def _ranges(starts: IntArray, counts: IntArray) -> IntArray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _dictionary_columns(file: pq.ParquetFile) -> list[str]:
    """String leaf columns that the writer dictionary-encoded.

    Reading them as Arrow dictionaries skips materialising one string per
    row (for the GUIDs of the references that halves the cost of decoding a
    row group); answers are cast back to the file's types, so callers never
    see the difference. Only the first and last row groups are looked at:
    the choice affects speed, never results.
    """
    metadata = file.metadata
    groups = {0, metadata.num_row_groups - 1} if metadata.num_row_groups else set()
    names = []
    for index in range(metadata.num_columns):
        column = file.schema.column(index)
        if column.physical_type != "BYTE_ARRAY" or str(column.logical_type) != "String":
            continue
        if all(metadata.row_group(g).column(index).has_dictionary_page for g in groups):
            names.append(column.path)
    return names


# -- reading ------------------------------------------------------------------


class _Handles:
    """A pool of open ``ParquetFile`` objects on one file, one per concurrent reader.

    Lookups from several threads then decode in parallel (Arrow releases the
    GIL) instead of queueing on one handle; every handle shares the footer
    parsed once at open.
    """

    def __init__(
        self,
        filesystem: pafs.FileSystem,
        path: str,
        metadata: pq.FileMetaData,
        read_dictionary: list[str] | None,
    ) -> None:
        self._filesystem = filesystem
        self._path = path
        self._metadata = metadata
        self._read_dictionary = read_dictionary
        self._idle: queue.SimpleQueue[tuple[pq.ParquetFile, pa.NativeFile | None]] = (
            queue.SimpleQueue()
        )
        self._all: list[tuple[pq.ParquetFile, pa.NativeFile | None]] = []
        self._lock = threading.Lock()
        self.closed = False

    def _open(self) -> tuple[pq.ParquetFile, pa.NativeFile | None]:
        source: pa.NativeFile | None = None
        if isinstance(self._filesystem, pafs.LocalFileSystem):
            # Memory-mapped: a row-group read is a decode straight from the page cache,
            # so pre-buffering (coalesced reads on I/O threads) would only add a hop.
            file = pq.ParquetFile(
                self._path,
                metadata=self._metadata,
                memory_map=True,
                pre_buffer=False,
                read_dictionary=self._read_dictionary,
            )
        else:
            source = self._filesystem.open_input_file(self._path)
            file = pq.ParquetFile(
                source, metadata=self._metadata, read_dictionary=self._read_dictionary
            )
        with self._lock:
            self._all.append((file, source))
        return file, source

    def add(self, file: pq.ParquetFile, source: pa.NativeFile | None) -> None:
        with self._lock:
            self._all.append((file, source))
        self._idle.put((file, source))

    @contextlib.contextmanager
    def borrow(self) -> Iterator[pq.ParquetFile]:
        if self.closed:
            raise ValueError("I/O operation on a closed map-file")
        try:
            handle = self._idle.get_nowait()
        except queue.Empty:
            handle = self._open()
        try:
            yield handle[0]
        finally:
            self._idle.put(handle)

    def close(self) -> None:
        self.closed = True
        with self._lock:
            handles, self._all = self._all, []
        for file, source in handles:
            file.close()
            if source is not None:
                source.close()


class MapFileReader:
    """Random access by key to one map-file: get, batched get, range scan.

    Thread-safe: concurrent lookups each borrow their own file handle, and a
    ``get_many`` spanning several row groups reads them on up to
    ``read_threads`` threads of a shared pool (1: in the calling thread). Raises
    ``StorageError`` naming the URI when the file is missing, is not Parquet,
    or is not a map-file; ``ValueError`` for a key that cannot be in the file's
    key types (a negative run number, an event number of 2**64) and
    ``KeyError`` for an unknown column.
    """

    def __init__(
        self, uri: str, key_cache: KeyCache | None = None, *, read_threads: int | None = None
    ) -> None:
        self.uri = uri
        threads = DEFAULT_READ_THREADS if read_threads is None else read_threads
        if not 1 <= threads <= MAX_READ_THREADS:
            raise ValueError(f"read_threads must be in [1, {MAX_READ_THREADS}], not {threads}")
        self.read_threads = threads
        self._cache = key_cache if key_cache is not None else DEFAULT_KEY_CACHE
        self._id = _next_reader_id()
        filesystem, path = resolve(uri)
        source: pa.NativeFile | None = None
        try:
            if isinstance(filesystem, pafs.LocalFileSystem):
                file = pq.ParquetFile(path, memory_map=True, pre_buffer=False)
            else:
                source = filesystem.open_input_file(path)
                file = pq.ParquetFile(source)
        except FileNotFoundError as exc:
            raise StorageError(f"{uri}: map-file not found") from exc
        except (pa.ArrowException, OSError) as exc:
            if source is not None:
                source.close()
            raise StorageError(f"{uri}: not a readable Parquet file: {exc}") from exc
        try:
            self._load_index(file)
        except BaseException:
            file.close()
            if source is not None:
                source.close()
            raise
        self._plain = _Handles(filesystem, path, file.metadata, None)
        self._plain.add(file, source)
        dictionary = _dictionary_columns(file)
        self._lookup = (
            _Handles(filesystem, path, file.metadata, dictionary) if dictionary else self._plain
        )
        # A reader that is dropped without close() still frees its key-cache entries.
        self._finalizer = weakref.finalize(self, self._cache.drop, self._id)

    def _load_index(self, file: pq.ParquetFile) -> None:
        uri = self.uri
        self.schema: pa.Schema = file.schema_arrow
        self._names = set(self.schema.names)
        self._num_rows = int(file.metadata.num_rows)
        self._num_row_groups = int(file.metadata.num_row_groups)
        meta = file.metadata.metadata or {}
        if meta.get(META_FORMAT) != FORMAT.encode():
            raise StorageError(f"{uri}: not a map-file (no {META_FORMAT.decode()}={FORMAT})")
        try:
            key = orjson.loads(meta[META_KEY])
            bounds = orjson.loads(meta[META_ROW_GROUPS])
            if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
                raise TypeError(f"key must be a list of column names, not {key!r}")
            self.key: tuple[str, ...] = tuple(key)
            _check_key_fields(self.schema, self.key, uri)
            self._key_dtypes = key_dtypes(self.schema, self.key)
            width = len(self.key)
            if not isinstance(bounds, list) or len(bounds) != self._num_row_groups:
                raise TypeError(f"{len(bounds)} entries for {self._num_row_groups} row groups")
            if set(map(len, bounds)) != {2 * width}:
                raise TypeError(f"every entry must hold {2 * width} integers")
            first = encode_query_keys([b[:width] for b in bounds], self._key_dtypes)
            last = encode_query_keys([b[width:] for b in bounds], self._key_dtypes)
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            raise StorageError(f"{uri}: damaged map-file key index: {exc}") from exc
        except StorageError as exc:
            raise StorageError(f"damaged map-file key index: {exc}") from exc
        if not self._num_row_groups:
            raise StorageError(f"{uri}: map-file has no row groups")
        self._first, self._last = first, last
        # First row ordinal of each row group (and the row count last), for ``take``.
        sizes = [file.metadata.row_group(i).num_rows for i in range(self._num_row_groups)]
        self._group_starts = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
        # Full-width bytes for bisect in single lookups (NumPy elements lose trailing zeros).
        width_bytes = first.dtype.itemsize
        self._first_list = [k.ljust(width_bytes, b"\0") for k in first.tolist()]
        self._last_list = [k.ljust(width_bytes, b"\0") for k in last.tolist()]
        if not (np.all(self._first <= self._last) and np.all(self._last[:-1] <= self._first[1:])):
            raise StorageError(f"{uri}: damaged map-file key index: row groups out of key order")
        self.metadata: dict[str, str] = {
            k[len(_META_PREFIX) :].decode(): v.decode()
            for k, v in meta.items()
            if k.startswith(_META_PREFIX) and k not in (META_FORMAT, META_KEY, META_ROW_GROUPS)
        }

    # -- properties --------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def num_row_groups(self) -> int:
        return self._num_row_groups

    @property
    def key_min(self) -> Key:
        return decode_key(self._first_list[0], self._key_dtypes)

    @property
    def key_max(self) -> Key:
        return decode_key(self._last_list[-1], self._key_dtypes)

    def row_group_key_range(self, index: int) -> tuple[Key, Key]:
        """First and last key of one row group."""
        return (
            decode_key(self._first_list[index], self._key_dtypes),
            decode_key(self._last_list[index], self._key_dtypes),
        )

    # -- internals ---------------------------------------------------------
    def _read(
        self, index: int, columns: Sequence[str] | None, *, lookup: bool, use_threads: bool = False
    ) -> pa.Table:
        handles = self._lookup if lookup else self._plain
        try:
            with handles.borrow() as file:
                return file.read_row_group(index, columns=columns, use_threads=use_threads)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StorageError(f"{self.uri}: cannot read row group {index}: {exc}") from exc

    def _read_row_group(self, index: int, columns: Sequence[str]) -> pa.Table:
        """The payload (non-key) columns of one row group, for a lookup.

        Strings may come back dictionary-encoded; ``_file_types`` casts them back.
        """
        return self._read(index, columns, lookup=True)

    def _keys_of(self, index: int) -> EncodedKeys:
        token = (self._id, index)
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        table = self._read(index, self.key, lookup=False)
        keys = encode_key_columns([table.column(k).to_numpy() for k in self.key])
        self._cache.put(token, keys)
        return keys

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return list(self.schema.names)
        if isinstance(columns, str):
            raise TypeError("columns must be a sequence of column names, not one string")
        unknown = [c for c in columns if c not in self._names]
        if unknown:
            raise KeyError(f"unknown columns {unknown}; {self.uri} has {self.schema.names}")
        return list(dict.fromkeys(columns))

    def _answer_schema(self, wanted: Sequence[str]) -> pa.Schema:
        return pa.schema([self.schema.field(c) for c in wanted])

    # -- lookups -----------------------------------------------------------
    def get(
        self, key: Sequence[int], columns: Sequence[str] | None = None
    ) -> dict[str, Any] | None:
        """The first row whose key equals ``key``, as a dict of the requested columns.

        ``None`` when the file has no such key. Asking for key columns only
        answers from the key index without reading any payload.
        """
        wanted = self._check_columns(columns)
        query = encode_key(key, self._key_dtypes)
        # The first row group whose last key is >= the query holds its first copy, if any.
        group = bisect.bisect_left(self._last_list, query)
        if group == self._num_row_groups or self._first_list[group] > query:
            return None
        keys = self._keys_of(group)
        row = int(np.searchsorted(keys, query, side="left"))
        # NumPy strips trailing zero bytes from an element: compare stripped.
        if row == len(keys) or keys[row] != query.rstrip(b"\0"):
            return None
        values = dict(zip(self.key, decode_key(query, self._key_dtypes), strict=True))
        payload = [c for c in wanted if c not in values]
        if payload:
            found = self._read_row_group(group, payload).slice(row, 1).to_pylist()[0]
            values.update(found)
        return {c: values[c] for c in wanted}

    def get_many(
        self, keys: Sequence[Sequence[int]], columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Every row matching any of ``keys``, reading each needed row group once.

        The result has the requested columns (the file's types) plus
        ``_query_index``, the position in ``keys`` each row answers. Rows come
        in file order (so by key), a row answering several queries once per
        query in query order: a key asked twice is answered twice, a key held
        twice is answered with both rows, and missing keys have no row.
        """
        wanted = self._check_columns(columns)
        schema = self._answer_schema(wanted).append(pa.field(QUERY_INDEX, pa.int64(), False))
        encoded = encode_query_keys(keys, self._key_dtypes)
        order = np.argsort(encoded, kind="stable")
        ordered = encoded[order]
        # Row groups [low, high) may hold each key; more than one only for duplicates
        # that straddle a row-group boundary.
        low = np.searchsorted(self._last, ordered, side="left")
        high = np.searchsorted(self._first, ordered, side="right")
        span = np.maximum(high - low, 0)
        queries = np.repeat(order, span)
        groups = _ranges(low, span)
        by_group = np.argsort(groups, kind="stable")
        queries, groups = queries[by_group], groups[by_group]
        cuts = np.flatnonzero(np.diff(groups)) + 1
        payload = [c for c in wanted if c not in self.key]
        tasks = [
            (int(groups[segment[0]]), queries[segment])
            for segment in np.split(np.arange(len(groups)), cuts)
            if len(segment)
        ]

        def answer(share: list[tuple[int, IntArray]]) -> list[pa.Table | None]:
            return [self._answer_group(g, p, encoded, wanted, payload, schema) for g, p in share]

        # Arrow decodes without the GIL, so when there are several row groups to
        # read, ``read_threads`` workers take every n-th one; pieces keep file order.
        workers = min(self.read_threads, len(tasks))
        if workers > 1 and len(tasks) >= _PARALLEL_MIN_GROUPS and payload:
            shares = list(_executor().map(answer, [tasks[i::workers] for i in range(workers)]))
            answers = [shares[i % workers][i // workers] for i in range(len(tasks))]
        else:
            answers = answer(tasks)
        pieces = [piece for piece in answers if piece is not None]
        if not pieces:
            return schema.empty_table()
        return pa.concat_tables(pieces)

    def _answer_group(
        self,
        group: int,
        positions: IntArray,
        encoded: EncodedKeys,
        wanted: Sequence[str],
        payload: Sequence[str],
        schema: pa.Schema,
    ) -> pa.Table | None:
        """The rows of one row group that answer the queries at ``positions``."""
        group_keys = self._keys_of(group)
        probes = encoded[positions]
        first = np.searchsorted(group_keys, probes, side="left")
        counts = np.searchsorted(group_keys, probes, side="right") - first
        if not counts.any():
            return None
        rows = _ranges(first, counts)
        answered = np.repeat(positions, counts)
        # File order; a row that answers several queries comes once per query, in query order.
        in_file_order = np.lexsort((answered, rows))
        rows, answered = rows[in_file_order], answered[in_file_order]
        piece = self._answer_piece(group, group_keys, rows, wanted, payload)
        return pa.Table.from_arrays([*piece, pa.array(answered, pa.int64())], schema=schema)

    def _answer_piece(
        self,
        group: int,
        group_keys: EncodedKeys,
        rows: IntArray,
        wanted: Sequence[str],
        payload: Sequence[str],
    ) -> list[pa.Array | pa.ChunkedArray]:
        columns: dict[str, pa.Array | pa.ChunkedArray] = {}
        if payload:
            table = self._read_row_group(group, payload).take(pa.array(rows))
            for name in payload:
                column = table.column(name)
                wanted_type = self.schema.field(name).type
                columns[name] = column if column.type == wanted_type else column.cast(wanted_type)
        if len(payload) < len(wanted):
            values = decode_key_columns(group_keys[rows], self._key_dtypes)
            for name, array in zip(self.key, values, strict=True):
                columns[name] = pa.array(array, self.schema.field(name).type)
        return [columns[name] for name in wanted]

    def scan(
        self,
        key_min: Sequence[int] | None = None,
        key_max: Sequence[int] | None = None,
        columns: Sequence[str] | None = None,
    ) -> Iterator[pa.Table]:
        """Rows with ``key_min <= key <= key_max``, one table per row group, in key order.

        Either bound is optional, and may name only the leading key columns:
        ``scan((run,), (run,))`` is every event of one run.
        """
        wanted = self._check_columns(columns)
        lower = None if key_min is None else encode_bound(key_min, self._key_dtypes, upper=False)
        upper = None if key_max is None else encode_bound(key_max, self._key_dtypes, upper=True)
        start = 0 if lower is None else bisect.bisect_left(self._last_list, lower)
        for group in range(start, self._num_row_groups):
            if upper is not None and self._first_list[group] > upper:
                break
            first_inside = lower is None or self._first_list[group] >= lower
            last_inside = upper is None or self._last_list[group] <= upper
            if first_inside and last_inside:
                yield self._read(group, wanted, lookup=False)
                continue
            group_keys = self._keys_of(group)
            begin = 0 if lower is None else int(np.searchsorted(group_keys, lower, side="left"))
            end = (
                len(group_keys)
                if upper is None
                else int(np.searchsorted(group_keys, upper, side="right"))
            )
            if end > begin:
                yield self._read(group, wanted, lookup=False).slice(begin, end - begin)

    def take(self, rows: npt.ArrayLike, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """The rows at ascending ordinals ``rows`` (positions in the file), one table per
        row group holding some of them, in file order; other row groups are not read."""
        wanted = self._check_columns(columns)
        positions = np.asarray(rows, dtype=np.int64)
        if len(positions) == 0:
            return
        if positions[0] < 0 or positions[-1] >= self._num_rows or np.any(np.diff(positions) <= 0):
            raise ValueError(f"rows must ascend within [0, {self._num_rows}) in {self.uri}")
        groups = np.searchsorted(self._group_starts, positions, side="right") - 1
        cuts = np.flatnonzero(np.diff(groups)) + 1
        firsts = np.concatenate(([0], cuts))
        for begin, piece in zip(firsts, np.split(positions, cuts), strict=True):
            group = int(groups[begin])
            start, stop = self._group_starts[group], self._group_starts[group + 1]
            table = self._read(group, wanted, lookup=False)
            yield table if len(piece) == stop - start else table.take(pa.array(piece - start))

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole file (or some columns of it)."""
        wanted = self._check_columns(columns)
        try:
            with self._plain.borrow() as file:
                return file.read(columns=wanted)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StorageError(f"{self.uri}: cannot read: {exc}") from exc

    def close(self) -> None:
        """Release the file handles and this reader's key-cache entries."""
        self._finalizer()
        self._plain.close()
        self._lookup.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
