"""The ``references`` column: the GUID table, reference counts and slots, checked.

:class:`_References` checks the column as it is read (the GUID table, the
number of references of each event, and per slot its formats, GUID indices
and positions in any integer encoding) and turns it into the Arrow buffers of
``list<struct<format, guid, position>>`` in event order with one numpy gather
per slot, none per reference. A message whose events all have the same
references in the same formats keeps its slots for
:func:`~eventindex.records.codec.assembly._reference_pieces`, which gathers
many messages at once.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from eventindex.records.codec.arrays import _fixed_offsets, _int_array, _Packed, _uniform_formats
from eventindex.records.codec.reasons import (
    _integer_problem,
    _key_error,
    _marker_error,
    _Place,
    _scan_integers,
    _shape_error,
)
from eventindex.records.codec.wire import (
    _FORMAT_RE,
    _GUID_RE,
    _KNOWN_FORMATS,
    _KNOWN_GUIDS,
    _KNOWN_LIMIT,
    _REFERENCE_BYTES,
    _REFERENCE_KEYS,
    _REFERENCES,
    _SLOT_KEYS,
    GUID_LENGTH,
    MAX_COUNT,
    MessageError,
    _describe,
)


def _is_format(value: object) -> bool:
    if type(value) is not str:
        return False
    if value in _KNOWN_FORMATS:
        return True
    if _FORMAT_RE.fullmatch(value) is None:
        return False
    if len(_KNOWN_FORMATS) < 256:
        _KNOWN_FORMATS.add(value)
    return True


def _slot_rows(counts: list[Any] | None, n: int, slot: int) -> npt.NDArray[np.intp]:
    """Event rows that have a reference in ``slot``, in order (for error messages)."""
    if counts is None:
        return np.arange(n)
    return np.flatnonzero(np.asarray(counts, dtype=np.int64) > slot)


def _format_buffers(
    slot_formats: list[Any], sizes: Sequence[int], targets: npt.NDArray[np.intp], total: int
) -> tuple[bytes, bytes]:
    """Arrow offsets and data of the row-major format strings, from per-slot formats."""
    slot_major: list[str] = []
    for formats, size in zip(slot_formats, sizes, strict=True):
        slot_major.extend([formats] * size if type(formats) is str else formats)
    table = list(dict.fromkeys(slot_major))
    number = {name: i for i, name in enumerate(table)}
    flat = np.empty(total, dtype=np.intp)
    flat[targets] = np.fromiter(map(number.__getitem__, slot_major), np.intp, total)
    encoded = [name.encode() for name in table]
    lengths = np.array([len(e) for e in encoded], dtype=np.int32)
    widest = int(lengths.max()) if encoded else 0
    matrix = np.zeros((len(encoded), widest), dtype=np.uint8)
    for i, name in enumerate(encoded):  # one row per distinct format, not per event
        matrix[i, : len(name)] = np.frombuffer(name, dtype=np.uint8)
    flat_lengths = lengths[flat]
    offsets = np.zeros(total + 1, dtype=np.int32)
    np.cumsum(flat_lengths, out=offsets[1:])
    keep = np.arange(widest) < flat_lengths[:, None]
    return offsets.tobytes(), matrix[flat][keep].tobytes()


def _slot_formats_error(
    k: int, formats: list[Any], size: int, counts: list[Any] | None, n: int
) -> MessageError:
    if len(formats) != size:
        return MessageError(
            f"slot {k}: has {len(formats)} formats for {size} references", field=_REFERENCES
        )
    i = next(i for i, value in enumerate(formats) if not _is_format(value))
    return MessageError(
        f"slot {k}: invalid format {_describe(formats[i])}",
        field=_REFERENCES,
        row=int(_slot_rows(counts, n, k)[i]),
    )


def _guid_table_error(guids: list[Any]) -> MessageError:
    seen: dict[str, int] = {}
    for index, value in enumerate(guids):
        if type(value) is not str or _GUID_RE.fullmatch(value) is None:
            return MessageError(
                f"guid table entry {index}: not a canonical GUID: {_describe(value)}",
                field=_REFERENCES,
            )
        if value in seen:
            return MessageError(
                f"guid table entry {index} repeats entry {seen[value]}: {value}",
                field=_REFERENCES,
            )
        seen[value] = index
    return MessageError("bad guid table", field=_REFERENCES)  # pragma: no cover


def _check_guid_table(guids: object) -> list[str]:
    if type(guids) is not list:
        raise MessageError(
            f"guid table: expected an array, got {_describe(guids)}", field=_REFERENCES
        )
    try:
        unique = set(guids)
    except TypeError:  # an array or object in the table
        raise _guid_table_error(guids) from None
    if len(unique) != len(guids):
        raise _guid_table_error(guids)
    if not unique <= _KNOWN_GUIDS:
        for value in unique - _KNOWN_GUIDS:
            if type(value) is not str or _GUID_RE.fullmatch(value) is None:
                raise _guid_table_error(guids)
        if len(_KNOWN_GUIDS) < _KNOWN_LIMIT:
            _KNOWN_GUIDS.update(unique)
    return guids


def _reference_counts(
    counts: list[Any], n: int, depth: int, checked: tuple[list[list[Any]], list[_Place]]
) -> tuple[list[int], int]:
    """Slot sizes and total of per-event reference counts, after checking them."""
    place = _Place(_REFERENCES, "reference count: ")
    if len(counts) != n:
        raise _shape_error(_Place(_REFERENCES), counts, n, "reference counts")
    try:
        values = np.frombuffer(array("I", counts), dtype=np.uint32).astype(np.int64)
    except (TypeError, OverflowError):
        raise _scan_integers(place, counts, 2**32 - 1) from None
    checked[0].append(counts)
    checked[1].append(place)
    deepest = int(values.max()) if n else 0
    if depth != deepest:
        raise MessageError(
            f"has {depth} reference slots, but the most references of an event is {deepest}",
            field=_REFERENCES,
        )
    # slot k holds the events with more than k references
    at_most = np.cumsum(np.bincount(values, minlength=depth + 1))
    return (n - at_most[:depth]).tolist(), int(values.sum())


@functools.lru_cache(maxsize=256)
def _guid_tables(guids: tuple[str, ...]) -> tuple[list[bytes], npt.NDArray[np.void]]:
    """The GUIDs of a table as bytes, and as an array of 36-byte items to gather from
    (whole items gather about twice as fast as rows of a byte matrix)."""
    encoded = [guid.encode("ascii") for guid in guids]
    items = np.frombuffer(b"".join(encoded), dtype=np.dtype((np.void, GUID_LENGTH)))
    return encoded, items


class _References:
    """The references column: checked on construction, turned into Arrow buffers by buffers().

    Per slot, the GUID indices are one number (the whole slot names one file),
    the JSON list itself (checked), or a buffer of uint32 (decoded or packed);
    the positions are a buffer of uint64.
    """

    __slots__ = (
        "counts",
        "depth",
        "guid_index",
        "guids",
        "n",
        "positions",
        "sizes",
        "slot_formats",
        "total",
        "uniform_formats",
    )

    def __init__(
        self,
        spec: object,
        n: int,
        version: int,
        limit: int,
        checked: tuple[list[list[Any]], list[_Place]],
        packed: _Packed,
    ) -> None:
        if type(spec) is not dict or spec.keys() != _REFERENCE_KEYS:
            raise _key_error("references", spec, _REFERENCE_KEYS, _REFERENCES)
        slots, count_spec = spec["s"], spec["n"]
        self.guids = guids = _check_guid_table(spec["g"])
        if type(slots) is not list:
            raise MessageError(
                f"slots: expected an array, got {_describe(slots)}", field=_REFERENCES
            )
        self.n = n
        self.depth = depth = len(slots)
        self.counts: list[Any] | None
        if type(count_spec) is int:
            # Every event has the same number of references: the common case, kept cheap.
            if count_spec != depth:
                raise MessageError(
                    f"every event has {count_spec} references but there are {depth} slots",
                    field=_REFERENCES,
                )
            self.counts = None
            self.sizes = sizes = [n] * depth
            self.total = n * depth
        elif type(count_spec) is list:
            self.counts = count_spec
            self.sizes, self.total = _reference_counts(count_spec, n, depth, checked)
            sizes = self.sizes
        else:
            raise MessageError(
                f"reference count: expected an integer or an array, got {_describe(count_spec)}",
                field=_REFERENCES,
            )
        if GUID_LENGTH * self.total > MAX_COUNT or self.total * _REFERENCE_BYTES > limit:
            raise MessageError(
                f"{self.total} references are too many for one message", field=_REFERENCES
            )

        self.guid_index: list[Any] = [None] * depth
        self.positions: list[Any] = [None] * depth
        self.slot_formats: list[Any] = [None] * depth
        self.uniform_formats = True
        for k, slot in enumerate(slots):
            size = sizes[k]
            if type(slot) is not dict or slot.keys() != _SLOT_KEYS:
                raise _key_error(f"slot {k}", slot, _SLOT_KEYS, _REFERENCES)
            formats, indices, places = slot["f"], slot["g"], slot["p"]
            if type(formats) is str and formats in _KNOWN_FORMATS:
                pass
            elif type(formats) is list:
                self.uniform_formats = False
                if len(formats) != size or not all(map(_is_format, formats)):
                    raise _slot_formats_error(k, formats, size, self.counts, n)
            elif not _is_format(formats):
                raise MessageError(
                    f"slot {k}: invalid format {_describe(formats)}", field=_REFERENCES
                )
            self.slot_formats[k] = formats
            if type(indices) is dict and len(indices) == 1 and version > 1 and "k" in indices:
                value = indices["k"]  # one file for the whole slot: kept as a number
                if type(value) is not int or not 0 <= value < len(guids):
                    raise self._guid_index_error(k, value, None)
                self.guid_index[k] = value
            elif type(indices) is dict and len(indices) == 1 and version > 1 and "z" in indices:
                if indices["z"] != "zstd":
                    raise _marker_error(self._place(k, "guid index"), indices["z"])
                packed.add(self.guid_index, k, 4 * size)
            else:
                array_ = self._array(k, "guid index", indices, size, "I", version, checked)
                # the JSON list itself, or the decoded items
                self.guid_index[k] = indices if type(indices) is list else array_
            if type(places) is dict and len(places) == 1 and version > 1 and "z" in places:
                if places["z"] != "zstd":
                    raise _marker_error(self._place(k, "position"), places["z"])
                packed.add(self.positions, k, 8 * size)
            else:
                self.positions[k] = self._array(k, "position", places, size, "Q", version, checked)

    def _place(self, slot: int, what: str) -> _Place:
        return _Place(_REFERENCES, f"slot {slot}: {what}: ", functools.partial(self._row, slot))

    def _row(self, slot: int, index: int) -> int:
        return int(_slot_rows(self.counts, self.n, slot)[index])

    def _array(
        self,
        k: int,
        what: str,
        spec: Any,
        size: int,
        code: str,
        version: int,
        checked: tuple[list[list[Any]], list[_Place]],
    ) -> Any:
        """A slot's plain, constant, delta or runs array, with version 1's wording for shapes."""
        if (type(spec) is not list and (type(spec) is not dict or version < 2)) or (
            type(spec) is list and len(spec) != size
        ):
            got = str(len(spec)) if type(spec) is list else _describe(spec)
            raise MessageError(
                f"slot {k}: {what}: expected an array of {size} integers, got {got}",
                field=_REFERENCES,
            )
        high = 2**32 - 1 if code == "I" else 2**64 - 1
        return _int_array(spec, size, code, high, self._place(k, what), version, checked)

    def _guid_index_error(self, k: int, value: object, index: int | None) -> MessageError:
        if type(value) is not int or value < 0:
            problem = _integer_problem(value, 2**32 - 1) or "bad guid index"
            return MessageError(f"slot {k}: guid index: constant: {problem}", field=_REFERENCES)
        return MessageError(
            f"slot {k}: guid index {value} out of range "
            f"(the guid table has {len(self.guids)} entries)",
            field=_REFERENCES,
            row=None if index is None else self._row(k, index),
        )

    def buffers(self) -> list[Any]:
        """List offsets, format offsets and data, GUID offsets and data, and positions."""
        n, depth, total, counts = self.n, self.depth, self.total, self.counts
        if counts is None:
            list_offsets = _fixed_offsets(depth, n)
            if self.uniform_formats:
                format_offsets, format_data = _uniform_formats(tuple(self.slot_formats), n)
            else:
                targets = (np.arange(depth)[:, None] + depth * np.arange(n)[None, :]).ravel()
                format_offsets, format_data = _format_buffers(
                    self.slot_formats, self.sizes, targets, total
                )
        else:
            starts = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.asarray(counts, dtype=np.int64), out=starts[1:])
            list_offsets = starts.astype(np.int32).tobytes()
            per_event = np.diff(starts)
            # Row-major place of every slot-major entry: one numpy pass per slot, none per row.
            targets = np.concatenate(
                [starts[:-1][per_event > k] + k for k in range(depth)] or [np.zeros(0, np.int64)]
            ).astype(np.intp)
            format_offsets, format_data = _format_buffers(
                self.slot_formats, self.sizes, targets, total
            )
        guid_data, positions = self._rows(None if counts is None else targets)
        guid_offsets = _fixed_offsets(GUID_LENGTH, total)
        return [list_offsets, format_offsets, format_data, guid_offsets, guid_data, positions]

    def _rows(self, targets: npt.NDArray[np.intp] | None) -> tuple[Any, Any]:
        """GUID data and positions of every reference, in event (row-major) order."""
        n, depth, total = self.n, self.depth, self.total
        if not total:
            return b"", b""
        indices = self.guid_index
        encoded, table = _guid_tables(tuple(self.guids))
        if depth == 1 and targets is None:
            return self._slot_guids(0, encoded, table), self.positions[0]
        if targets is None and all(type(index) is int for index in indices):
            # Every event names the same files: repeat one event's GUIDs.
            guid_data: Any = b"".join([encoded[index] for index in indices]) * n
        elif targets is None:
            # One gather of the GUID of every reference, from a (row, slot) index matrix.
            numbers = np.empty((n, depth), dtype=np.uint32)
            for k, index in enumerate(indices):
                numbers[:, k] = (
                    index if type(index) in (int, list) else np.frombuffer(index, np.uint32)
                )
            try:
                guid_data = table[numbers].view(np.uint8)
            except IndexError:
                self._check_indices()
                raise  # pragma: no cover - _check_indices names the bad index
        else:
            rows = np.empty((total, GUID_LENGTH), dtype=np.uint8)
            at = 0
            for k, size in enumerate(self.sizes):
                slot = np.frombuffer(self._slot_guids(k, encoded, table), np.uint8)
                rows[targets[at : at + size]] = slot.reshape(size, GUID_LENGTH)
                at += size
            guid_data = rows
        positions: npt.NDArray[np.uint64]
        if targets is None:
            positions = np.empty((n, depth), dtype=np.uint64)
            for k, slot in enumerate(self.positions):
                positions[:, k] = np.frombuffer(slot, dtype=np.uint64)
        else:
            positions = np.empty(total, dtype=np.uint64)
            positions[targets] = np.frombuffer(b"".join(self.positions), dtype=np.uint64)
        return guid_data, positions

    def signature(self) -> tuple[int, tuple[str, ...]] | None:
        """(depth, formats) when every event has the same references in the same formats,
        the layout whose buffers decode_messages builds for many messages at once."""
        if self.counts is not None or not self.uniform_formats or not self.depth:
            return None
        return self.depth, tuple(self.slot_formats)

    def check_indices(self) -> None:
        """What building the buffers would check: every GUID index is in the table."""
        for k, index in enumerate(self.guid_index):
            if type(index) is int or not self.sizes[k]:
                continue  # a constant index is checked as it is read
            numbers = np.frombuffer(array("I", index) if type(index) is list else index, np.uint32)
            if int(numbers.max()) >= len(self.guids):
                at = int(np.argmax(numbers >= len(self.guids)))
                raise self._guid_index_error(k, int(numbers[at]), at)

    def _check_indices(self) -> None:
        """Raise MessageError for the first GUID index beyond the table, if any."""
        encoded, table = _guid_tables(tuple(self.guids))
        for k in range(self.depth):
            self._slot_guids(k, encoded, table)

    def _slot_guids(self, k: int, encoded: list[bytes], table: npt.NDArray[np.void]) -> bytes:
        """The GUID of every reference of slot ``k``, checking the indices against the table."""
        index, size = self.guid_index[k], self.sizes[k]
        if type(index) is int:
            return encoded[index] * size
        if type(index) is list:  # checked integers, straight from the JSON
            try:
                return b"".join(map(encoded.__getitem__, index))
            except IndexError:
                at = next(i for i, value in enumerate(index) if value >= len(encoded))
                raise self._guid_index_error(k, index[at], at) from None
        return self._gather(k, table).tobytes()

    def _gather(self, k: int, table: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
        """The GUIDs of slot ``k`` as a matrix, from its uint32 indices."""
        numbers = np.frombuffer(self.guid_index[k], dtype=np.uint32)
        try:
            return table[numbers]
        except IndexError:
            at = int(np.argmax(numbers >= len(table)))
            raise self._guid_index_error(k, int(numbers[at]), at) from None
