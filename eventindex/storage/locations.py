"""Locations files: what a pick returns for every row of one master map-file, as fixed-width
arrays that are memory-mapped, so a lookup is a bisect and a gather with nothing to decode.

A master map-file answers a pick by decoding a whole row group (tens of thousands of
rows of references and attributes) to return one row. Its locations file holds, for
the same rows in the same order, the event key, the event attributes a pick returns
and the references, each narrowed to the fewest bytes that hold it:

* keys: the runs of the file with the row each starts at, and every row's event
  number minus the file's smallest, as the narrowest unsigned integer that holds
  them all (sorted inside each run, so a lookup is ``np.searchsorted``);
* rows: one packed record per row (row-major, so one row is one read): every
  attribute as an offset from the file's smallest value or, when few values occur,
  as a code into their list; and where rows hold different numbers of
  references, the first of the row's references;
* references: one packed record per reference: a code into the file's list of
  ``(format, guid)`` targets and the position minus the smallest position.

Layout: 8 bytes ``EILOCS1\\n``, the header length (uint64 little-endian), a JSON
header naming every section (dtype, offset, count) and the dictionaries, then the
sections, each at a 64-byte boundary. Local files are memory-mapped with
``MADV_RANDOM`` (a lookup touches a page or two; read-ahead would only evict);
files on other file systems are read whole. Written like a map-file: temporary
name, fsync, rename, so a reader never sees a partial file.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import mmap
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from eventindex.errors import StorageError
from eventindex.storage.filesystem import resolve
from eventindex.storage.mapfile import _fsync_local, _HashingSink

FORMAT = "locations/1"
MAGIC = b"EILOCS1\n"
_ALIGN = 64
_PREFIX = len(MAGIC) + 8
# At most this many distinct values make an attribute a dictionary code (one byte wide).
_DICTIONARY_MAX = 256
# Catalog entries of locations files: kind index, this part, and the master file's id.
LOCATIONS_PART = "locations"
MASTER_ATTRIBUTE = "master"
RUN_COLUMN = "run_number"
# Every BLOCK-th event number of a file is kept in memory: a lookup then reads one block.
BLOCK = 1024
_CHUNK = 1024  # probes compared against their blocks at once (bounds the temporary arrays)
# Up to this many keys or rows of one file are handled one by one: numpy's fixed cost per
# call on a handful of elements is more than a Python loop over them (a small batch
# touches many files with a key or two each).
_SCALAR_MAX = 16
_PAGE = mmap.PAGESIZE
EVENT_COLUMN = "event_number"

IntArray = npt.NDArray[np.int64]
Reference = tuple[str, str, int]


@dataclass(frozen=True)
class LocationsInfo:
    """What a writer learned about the file it committed (goes into the catalog)."""

    uri: str
    rows: int
    bytes: int
    checksum: str
    key_min: tuple[int, ...]
    key_max: tuple[int, ...]


def _unsigned_for(top: int) -> np.dtype[Any]:
    """The narrowest unsigned dtype holding ``0..top``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _as_uint64(values: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """Integers as uint64 bit patterns: offsets from a minimum are then exact modulo 2**64."""
    if values.dtype.kind == "u":
        return values.astype(np.uint64)
    return values.astype(np.int64).view(np.uint64)


@dataclass(frozen=True)
class _Encoding:
    """How one integer column is stored: ``base + code`` or ``values[code]``."""

    name: str
    arrow_type: str
    dtype: np.dtype[Any]
    base: int
    values: list[int] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.arrow_type,
            "dtype": self.dtype.str,
            "base": self.base,
            "values": self.values,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Encoding:
        return cls(
            str(data["name"]),
            str(data["type"]),
            np.dtype(data["dtype"]),
            int(data["base"]),
            None if data.get("values") is None else [int(v) for v in data["values"]],
        )


def _encode(name: str, column: pa.Array | pa.ChunkedArray) -> tuple[_Encoding, npt.NDArray[Any]]:
    """The narrowest fixed-width codes of an integer column, and how to decode them."""
    if not pa.types.is_integer(column.type):
        raise StorageError(f"locations: column {name!r} must be an integer type, not {column.type}")
    if column.null_count:
        raise StorageError(f"locations: column {name!r} has {column.null_count} null values")
    values = np.asarray(column.to_numpy())
    if len(values) == 0:
        return _Encoding(name, str(column.type), np.dtype(np.uint8), 0, None), values.astype(
            np.uint8
        )
    low = int(values.min())
    high = int(values.max())
    offset_dtype = _unsigned_for(high - low)
    if offset_dtype.itemsize > 1:
        distinct = np.unique(values)
        if len(distinct) <= _DICTIONARY_MAX:
            codes = np.searchsorted(distinct, values).astype(np.uint8)
            return _Encoding(
                name, str(column.type), codes.dtype, 0, [int(v) for v in distinct]
            ), codes
    base = np.uint64(low % 2**64)
    codes = (_as_uint64(values) - base).astype(offset_dtype)
    return _Encoding(name, str(column.type), offset_dtype, low, None), codes


def _ranges(starts: IntArray, counts: IntArray) -> IntArray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


def _packed(fields: Sequence[tuple[str, npt.NDArray[Any]]], rows: int) -> npt.NDArray[np.void]:
    """Parallel columns as one packed (unaligned) record array: one row is one read."""
    dtype = np.dtype([(name, values.dtype) for name, values in fields])
    packed = np.empty(rows, dtype=dtype)
    for name, values in fields:
        packed[name] = values
    return packed


def build_locations(
    table: pa.Table, attributes: Sequence[str], metadata: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """The header and sections of the locations file of ``table``: an event table sorted
    by (run_number, event_number) with the ``attributes`` columns and ``references``."""
    missing = [
        c
        for c in (RUN_COLUMN, EVENT_COLUMN, *attributes, "references")
        if c not in table.column_names
    ]
    if missing:
        raise StorageError(f"locations: columns {missing} are missing")
    rows = table.num_rows
    if rows == 0:
        raise StorageError("locations: refusing to index an empty table")
    runs = np.asarray(table.column(RUN_COLUMN).to_numpy()).astype(np.uint32)
    events = np.asarray(table.column(EVENT_COLUMN).to_numpy()).astype(np.uint64)
    run_change = np.flatnonzero(np.diff(runs)) + 1
    run_starts = np.concatenate(([0], run_change, [rows])).astype(np.uint64)
    run_values = runs[run_starts[:-1].astype(np.int64)]
    if np.any(np.diff(run_values.astype(np.int64)) <= 0):
        raise StorageError("locations: rows are not sorted by run_number")
    for start, stop in zip(run_starts[:-1].tolist(), run_starts[1:].tolist(), strict=True):
        piece = events[start:stop]
        if len(piece) > 1 and bool(np.any(piece[1:] < piece[:-1])):
            raise StorageError("locations: rows are not sorted by event_number inside a run")
    event_base = int(events.min())
    event_codes = (events - np.uint64(event_base)).astype(
        _unsigned_for(int(events.max()) - event_base)
    )

    encodings: list[_Encoding] = []
    fields: list[tuple[str, npt.NDArray[Any]]] = []
    for name in attributes:
        encoding, codes = _encode(name, table.column(name))
        encodings.append(encoding)
        fields.append((name, codes))

    references = table.column("references").combine_chunks()
    if references.null_count:
        raise StorageError("locations: references have null values")
    offsets = np.asarray(references.offsets.to_numpy()).astype(np.int64)
    counts = np.diff(offsets)
    flat = references.flatten()  # respects the list array's own offset
    formats = pc.dictionary_encode(flat.field("format"))
    guids = pc.dictionary_encode(flat.field("guid"))
    format_codes = np.asarray(formats.indices.to_numpy()).astype(np.int64)
    guid_codes = np.asarray(guids.indices.to_numpy()).astype(np.int64)
    pairs = guid_codes * max(1, len(formats.dictionary)) + format_codes
    unique_pairs, target_codes = np.unique(pairs, return_inverse=True)
    format_names = formats.dictionary.to_pylist()
    guid_names = guids.dictionary.to_pylist()
    width = max(1, len(format_names))
    targets = [[format_names[p % width], guid_names[p // width]] for p in unique_pairs.tolist()]
    positions = np.asarray(flat.field("position").to_numpy()).astype(np.uint64)
    position_base = int(positions.min()) if len(positions) else 0
    position_codes = (positions - np.uint64(position_base)).astype(
        _unsigned_for(int(positions.max()) - position_base if len(positions) else 0)
    )
    reference_records = _packed(
        [
            ("target", target_codes.astype(_unsigned_for(max(0, len(targets) - 1)))),
            ("position", position_codes),
        ],
        len(positions),
    )
    depth: int | None = int(counts[0]) if bool(np.all(counts == counts[0])) else None
    if depth is None:
        fields.append(("reference_start", offsets[:-1].astype(_unsigned_for(int(offsets[-1])))))
    row_records = _packed(fields, rows) if fields else np.zeros(rows, dtype=np.dtype([]))

    sections: dict[str, npt.NDArray[Any]] = {
        "runs": run_values,
        "run_starts": run_starts,
        "events": event_codes,
        "rows": row_records,
        "references": reference_records,
    }
    header: dict[str, Any] = {
        "format": FORMAT,
        "rows": rows,
        "key_min": [int(runs[0]), int(events[0])],
        "key_max": [int(runs[-1]), int(events[-1])],
        "event_base": event_base,
        "attributes": [e.to_json() for e in encodings],
        "depth": depth,
        "references": int(offsets[-1] - offsets[0]),
        "position_base": position_base,
        "targets": targets,
        "metadata": dict(metadata or {}),
    }
    return header, sections


def _descr(dtype: np.dtype[Any]) -> Any:
    return dtype.descr if dtype.fields is not None else dtype.str


def _layout(header: dict[str, Any], sections: dict[str, npt.NDArray[Any]]) -> bytes:
    """The header bytes, with every section's offset filled in (offsets include the header)."""
    entries = {
        name: {"dtype": _descr(array.dtype), "count": len(array), "offset": 0}
        for name, array in sections.items()
    }
    # The header's own length moves the offsets: grow its estimate until it stops changing.
    size = 0
    while True:
        offset = -(-(_PREFIX + size) // _ALIGN) * _ALIGN
        for name, array in sections.items():
            entries[name]["offset"] = offset
            offset = -(-(offset + array.nbytes) // _ALIGN) * _ALIGN
        encoded = orjson.dumps({**header, "sections": entries})
        if len(encoded) <= size:
            return encoded.ljust(size)
        size = len(encoded) + 64


def write_locations(
    table: pa.Table,
    uri: str,
    attributes: Sequence[str],
    metadata: dict[str, str] | None = None,
) -> LocationsInfo:
    """Build the locations file of ``table`` and commit it atomically at ``uri``."""
    header, sections = build_locations(table, attributes, metadata)
    encoded = _layout(header, sections)
    filesystem, path = resolve(uri)
    directory = posixpath.dirname(path)
    temporary = posixpath.join(directory, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    sink: _HashingSink | None = None
    try:
        filesystem.create_dir(directory, recursive=True)
        sink = _HashingSink(filesystem.open_output_stream(temporary))
        sink.write(MAGIC + len(encoded).to_bytes(8, "little") + encoded)
        for array in sections.values():
            sink.write(b"\0" * (-sink.size % _ALIGN))
            data = np.ascontiguousarray(array)
            if data.nbytes:
                sink.write(data.view(np.uint8).data)
        sink.close()
        _fsync_local(filesystem, temporary)
        filesystem.move(temporary, path)
        _fsync_local(filesystem, directory)
    except BaseException as exc:
        if sink is not None:
            with contextlib.suppress(OSError):
                sink.close()
        with contextlib.suppress(OSError):
            filesystem.delete_file(temporary)
        if isinstance(exc, OSError | pa.ArrowException):
            raise StorageError(f"{uri}: cannot write locations file: {exc}") from exc
        raise
    assert sink is not None
    return LocationsInfo(
        uri=uri,
        rows=int(header["rows"]),
        bytes=sink.size,
        checksum=sink.checksum,
        key_min=tuple(header["key_min"]),
        key_max=tuple(header["key_max"]),
    )


def _dtype_of(descr: Any) -> np.dtype[Any]:
    if isinstance(descr, list):
        return np.dtype([(str(name), str(kind)) for name, kind in descr])
    return np.dtype(str(descr))


class LocationIndex:
    """Random access by event key to one locations file: which row holds a key, and that
    row's references and attributes. Thread-safe (it only reads)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        filesystem, path = resolve(uri)
        self._mmap: mmap.mmap | None = None
        buffer: Any
        try:
            if isinstance(filesystem, pafs.LocalFileSystem):
                with open(path, "rb") as handle:  # noqa: PTH123 - a descriptor for mmap
                    self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                if hasattr(mmap, "MADV_RANDOM"):
                    self._mmap.madvise(mmap.MADV_RANDOM)
                buffer = self._mmap
            else:
                with filesystem.open_input_file(path) as stream:
                    buffer = stream.read()
        except FileNotFoundError as exc:
            raise StorageError(f"{uri}: locations file not found") from exc
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise StorageError(f"{uri}: cannot open locations file: {exc}") from exc
        try:
            self._load(buffer)
        except BaseException:
            self.close()
            raise

    def _load(self, buffer: Any) -> None:
        uri = self.uri
        size = len(buffer)
        if size < _PREFIX or bytes(buffer[: len(MAGIC)]) != MAGIC:
            raise StorageError(f"{uri}: not a locations file")
        length = int.from_bytes(bytes(buffer[len(MAGIC) : _PREFIX]), "little")
        try:
            header = orjson.loads(bytes(buffer[_PREFIX : _PREFIX + length]))
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {FORMAT}")
            self.rows = int(header["rows"])
            self.key_min: tuple[int, ...] = tuple(int(v) for v in header["key_min"])
            self.key_max: tuple[int, ...] = tuple(int(v) for v in header["key_max"])
            self.metadata: dict[str, str] = {
                str(k): str(v) for k, v in header.get("metadata", {}).items()
            }
            arrays: dict[str, npt.NDArray[Any]] = {}
            self._offsets: dict[str, int] = {}
            self._itemsizes: dict[str, int] = {}
            for name, entry in header["sections"].items():
                dtype = _dtype_of(entry["dtype"])
                count, offset = int(entry["count"]), int(entry["offset"])
                if offset + count * dtype.itemsize > size:
                    raise ValueError(f"section {name} runs past the end of the file")
                arrays[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
                self._offsets[name] = offset
                self._itemsizes[name] = dtype.itemsize
            self._runs = arrays["runs"]
            self._run_starts = arrays["run_starts"]
            self._events = arrays["events"]
            self._records = arrays["rows"]
            self._references = arrays["references"]
            self._run_list: list[int] = self._runs.tolist()
            self._run_start_list: list[int] = self._run_starts.tolist()
            self._event_base = int(header["event_base"])
            self._event_top = int(np.iinfo(self._events.dtype).max) if len(self._events) else 0
            self._encodings = [_Encoding.from_json(e) for e in header["attributes"]]
            self.attribute_names: tuple[str, ...] = tuple(e.name for e in self._encodings)
            self._depth: int | None = None if header["depth"] is None else int(header["depth"])
            self._reference_count = int(header["references"])
            self._position_base = int(header["position_base"])
            self._targets: list[tuple[str, str]] = [(str(f), str(g)) for f, g in header["targets"]]
        except (KeyError, TypeError, ValueError, IndexError, orjson.JSONDecodeError) as exc:
            raise StorageError(f"{uri}: damaged locations file: {exc}") from exc
        if (
            len(self._events) != self.rows
            or len(self._records) != self.rows
            or len(self._run_starts) != len(self._runs) + 1
            or len(self._references) != self._reference_count
            or self._run_start_list[-1] != self.rows
        ):
            raise StorageError(f"{uri}: damaged locations file: section sizes disagree")
        self._attribute_index = [
            self._records.dtype.names.index(e.name) if self._records.dtype.names else 0
            for e in self._encodings
        ]
        # The keys are what every lookup bisects: ask for all of them now, in the
        # background, and keep every BLOCK-th in memory, so that a bisect touches one
        # block of the file instead of a page per step.
        self._prefetch("events", np.array([0]), np.array([self.rows]))
        self._samples = [
            np.array(self._events[low:high:BLOCK])
            for low, high in itertools.pairwise(self._run_start_list)
        ]
        # The same as lists: one key's block is a bisect of a list, ten times quicker
        # than numpy's searchsorted called for one value.
        self._sample_lists: list[list[int]] = [samples.tolist() for samples in self._samples]

    def _prefetch(self, section: str, starts: IntArray, stops: IntArray) -> None:
        """Ask the kernel to read elements ``[starts[i], stops[i])`` of a section now, all
        at once, so the reads that follow wait for one round of I/O rather than one each."""
        if self._mmap is None or not hasattr(mmap, "MADV_WILLNEED") or len(starts) == 0:
            return
        if len(starts) <= _SCALAR_MAX:
            for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
                self._advise(section, start, stop)
            return
        offset = self._offsets[section]
        size = self._itemsizes[section]
        first = (offset + starts.astype(np.int64) * size) // _PAGE * _PAGE
        last = offset + stops.astype(np.int64) * size
        keep = last > first
        for begin, end in zip(first[keep].tolist(), last[keep].tolist(), strict=True):
            self._mmap.madvise(mmap.MADV_WILLNEED, begin, end - begin)

    def _advise(self, section: str, start: int, stop: int) -> None:
        """``_prefetch`` of one range ``[start, stop)`` (the caller checked that the
        platform has ``MADV_WILLNEED``)."""
        if stop > start and self._mmap is not None:
            offset = self._offsets[section]
            size = self._itemsizes[section]
            first = (offset + start * size) // _PAGE * _PAGE
            self._mmap.madvise(mmap.MADV_WILLNEED, first, offset + stop * size - first)

    def _block(self, index: int, code: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of run segment ``index`` where the first ``code`` must be."""
        low, high = self._run_start_list[index], self._run_start_list[index + 1]
        block = bisect.bisect_left(self._sample_lists[index], code)
        return low + max(block - 1, 0) * BLOCK, min(low + block * BLOCK + 1, high)

    # -- keys ------------------------------------------------------------------
    def _key_block(self, run_number: int, event_number: int) -> tuple[int, int, int] | None:
        """The event code of a key and the rows ``[start, stop)`` it must be in, from the
        samples in memory (no page is read); ``None`` when the file cannot hold it."""
        index = _bisect(self._run_list, run_number)
        if index < 0:
            return None
        code = event_number - self._event_base
        if not 0 <= code <= self._event_top:
            return None
        return (code, *self._block(index, code))

    def find(self, run_number: int, event_number: int) -> int:
        """The first row holding ``(run_number, event_number)``, or -1."""
        found = self._key_block(run_number, event_number)
        if found is None:
            return -1
        code, start, stop = found
        events = self._events[start:stop]
        row = int(events.searchsorted(events.dtype.type(code), side="left"))
        if row == len(events) or int(events[row]) != code:
            return -1
        return start + row

    def _segments(
        self, runs: npt.NDArray[np.uint32], events: npt.NDArray[np.uint64]
    ) -> Iterator[tuple[IntArray, int, int, npt.NDArray[Any], IntArray, IntArray]]:
        """Per run segment holding some of the keys: the keys' indexes, the segment's rows
        ``[low, high)``, the keys as event codes, and the block ``[start, stop)`` (relative
        to ``low``) each must be in, from the samples in memory (no page is read)."""
        if len(runs) == 0:
            return
        which = np.searchsorted(self._runs, runs.astype(np.uint32))
        inside = which < len(self._runs)
        inside[inside] = self._runs[which[inside]] == runs[inside]
        shifted = events.astype(np.uint64) - np.uint64(self._event_base % 2**64)
        inside &= (events >= np.uint64(self._event_base)) & (shifted <= np.uint64(self._event_top))
        for index in np.unique(which[inside]).tolist():
            queries = np.flatnonzero(inside & (which == index))
            low, high = self._run_start_list[index], self._run_start_list[index + 1]
            probes = shifted[queries].astype(self._events.dtype)
            block = np.searchsorted(self._samples[index], probes, side="left")
            starts = np.maximum(block - 1, 0) * BLOCK
            stops = np.minimum(block * BLOCK + 1, high - low)
            yield queries, low, high, probes, starts, stops

    def prefetch_keys(self, runs: npt.NDArray[np.uint32], events: npt.NDArray[np.uint64]) -> None:
        """Ask for the key blocks ``find_many`` will read for these keys, without waiting:
        a batch asks this of all its files first, so their reads overlap."""
        if self._mmap is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        if len(runs) <= _SCALAR_MAX:
            for run, event in zip(runs.tolist(), events.tolist(), strict=True):
                found = self._key_block(run, event)
                if found is not None:
                    self._advise("events", found[1], found[2])
            return
        for _, low, _, _, starts, stops in self._segments(runs, events):
            self._prefetch("events", starts + low, stops + low)

    def find_many(
        self,
        runs: npt.NDArray[np.uint32],
        events: npt.NDArray[np.uint64],
        *,
        prefetched: bool = False,
    ) -> IntArray:
        """``find`` for parallel arrays of keys, vectorised (a few: one by one): rows, -1
        where absent (``prefetched``: the caller asked for their blocks with ``prefetch_keys``)."""
        if len(runs) <= _SCALAR_MAX:
            if not prefetched:
                self.prefetch_keys(runs, events)
            pairs = zip(runs.tolist(), events.tolist(), strict=True)
            return np.fromiter(itertools.starmap(self.find, pairs), np.int64, len(runs))
        found = np.full(len(runs), -1, dtype=np.int64)
        for queries, low, high, probes, starts, stops in self._segments(runs, events):
            piece = self._events[low:high]
            if not prefetched:
                self._prefetch("events", starts + low, stops + low)
            rows = np.empty(len(probes), dtype=np.int64)
            steps = np.arange(BLOCK + 1)
            for first in range(0, len(probes), _CHUNK):
                part = slice(first, first + _CHUNK)
                cells = starts[part, None] + steps
                valid = cells < stops[part, None]
                values = piece[np.minimum(cells, high - low - 1)]
                rows[part] = starts[part] + ((values < probes[part, None]) & valid).sum(axis=1)
            hit = rows < len(piece)
            hit[hit] = piece[rows[hit]] == probes[hit]
            found[queries[hit]] = rows[hit] + low
        return found

    # -- payload ---------------------------------------------------------------
    def _span(self, row: int) -> tuple[int, int]:
        if self._depth is not None:
            return row * self._depth, (row + 1) * self._depth
        start = int(self._records[row]["reference_start"])
        stop = (
            int(self._records[row + 1]["reference_start"])
            if row + 1 < self.rows
            else self._reference_count
        )
        return start, stop

    def references(self, row: int) -> list[Reference]:
        """The references of one row: (format, guid, position) in stored order."""
        start, stop = self._span(row)
        targets, base = self._targets, self._position_base
        return [
            (*targets[target], base + position)
            for target, position in self._references[start:stop].tolist()
        ]

    def attributes(self, row: int) -> dict[str, int]:
        """The attributes of one row, as the map-file holds them."""
        values = self._records[row].tolist()
        found: dict[str, int] = {}
        for encoding, index in zip(self._encodings, self._attribute_index, strict=True):
            code = values[index]
            found[encoding.name] = (
                encoding.values[code] if encoding.values is not None else encoding.base + code
            )
        return found

    def _spans(self, rows: IntArray) -> tuple[IntArray, IntArray]:
        """The first reference of each row and how many it has (reads the rows' records
        when rows hold different numbers of references)."""
        if self._depth is not None:
            return rows * self._depth, np.full(len(rows), self._depth, dtype=np.int64)
        starts = self._records["reference_start"][rows].astype(np.int64)
        following = rows + 1
        last = following >= self.rows
        stops = np.empty(len(rows), dtype=np.int64)
        stops[last] = self._reference_count
        stops[~last] = self._records["reference_start"][following[~last]].astype(np.int64)
        return starts, stops - starts

    def prefetch_rows(self, rows: IntArray, attributed: IntArray | None = None) -> None:
        """Ask for the records of ``rows`` that a read of them needs, without waiting:
        with rows of one depth, only those of ``attributed`` (the rows whose attributes
        are read; all when ``None``), as their references are found without them."""
        if self._depth is None:
            # A row's references end where the next row's start: both records are read.
            self._prefetch("rows", rows, np.minimum(rows + 2, self.rows))
        else:
            wanted = rows if attributed is None else attributed
            self._prefetch("rows", wanted, wanted + 1)

    def prefetch_references(self, rows: IntArray) -> None:
        """Ask for the references of ``rows``, without waiting (where rows hold different
        numbers of references, this reads their records: ask for those first)."""
        if len(rows):
            starts, counts = self._spans(rows)
            self._prefetch("references", starts, starts + counts)

    def references_many(self, rows: IntArray, *, prefetched: bool = False) -> list[list[Reference]]:
        """``references`` of many rows at once (``prefetched``: the caller already asked
        for their pages, with ``prefetch_rows`` and ``prefetch_references``)."""
        if len(rows) == 0:
            return []
        if not prefetched:
            self.prefetch_rows(rows)
            self.prefetch_references(rows)
        if len(rows) <= _SCALAR_MAX:
            return [self.references(row) for row in rows.tolist()]
        starts, counts = self._spans(rows)
        picked = self._references[_ranges(starts, counts)]
        targets = picked["target"].tolist()
        positions = (picked["position"].astype(np.uint64) + np.uint64(self._position_base)).tolist()
        names = self._targets
        flat = [(*names[t], p) for t, p in zip(targets, positions, strict=True)]
        answer: list[list[Reference]] = []
        cursor = 0
        for count in counts.tolist():
            answer.append(flat[cursor : cursor + count])
            cursor += count
        return answer

    def attributes_many(self, rows: IntArray) -> list[dict[str, int]]:
        """``attributes`` of many rows at once."""
        if len(rows) == 0:
            return []
        if len(rows) <= _SCALAR_MAX:
            return [self.attributes(row) for row in rows.tolist()]
        records = self._records[rows]
        columns: list[list[int]] = []
        for encoding in self._encodings:
            codes = records[encoding.name]
            if encoding.values is not None:
                columns.append([encoding.values[c] for c in codes.tolist()])
            else:
                signed = encoding.arrow_type.startswith("int")
                decoded = (codes.astype(np.uint64) + np.uint64(encoding.base % 2**64)).view(
                    np.int64 if signed else np.uint64
                )
                columns.append(decoded.tolist())
        names = self.attribute_names
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]

    def referencing(self, guid: str) -> list[tuple[str, int, int, int]]:
        """Every reference to the file ``guid``: (format, run, event, position), in row order."""
        codes = [code for code, (_, target) in enumerate(self._targets) if target == guid]
        if not codes or self._reference_count == 0:
            return []
        hits = np.flatnonzero(np.isin(self._references["target"], codes))
        if self._depth is not None:
            rows = hits // self._depth
        else:
            starts = self._records["reference_start"].astype(np.int64)
            rows = np.searchsorted(starts, hits, side="right") - 1
        run_index = np.searchsorted(self._run_starts, rows.astype(np.uint64), side="right") - 1
        runs = self._runs[run_index].tolist()
        events = (self._events[rows].astype(np.uint64) + np.uint64(self._event_base)).tolist()
        picked = self._references[hits]
        positions = (picked["position"].astype(np.uint64) + np.uint64(self._position_base)).tolist()
        names = self._targets
        return [
            (names[t][0], run, event, position)
            for t, run, event, position in zip(
                picked["target"].tolist(), runs, events, positions, strict=True
            )
        ]

    def close(self) -> None:
        """Let go of the mapping (views still held elsewhere keep it alive until dropped)."""
        for name in ("_runs", "_run_starts", "_events", "_records", "_references"):
            if hasattr(self, name):
                delattr(self, name)
        if self._mmap is not None:
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None

    def __enter__(self) -> LocationIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bisect(values: list[int], value: int) -> int:
    """The index of ``value`` in the sorted ``values``, or -1."""
    low = bisect.bisect_left(values, value)
    return low if low < len(values) and values[low] == value else -1


def is_locations_file(uri: str) -> bool:
    """Whether the file at ``uri`` starts like a locations file."""
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_file(path) as stream:
            return bytes(stream.read(len(MAGIC))) == MAGIC
    except (OSError, pa.ArrowException):
        return False


__all__ = [
    "FORMAT",
    "LOCATIONS_PART",
    "MASTER_ATTRIBUTE",
    "LocationIndex",
    "LocationsInfo",
    "build_locations",
    "is_locations_file",
    "write_locations",
]
