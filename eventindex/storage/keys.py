"""Composite keys as fixed-width byte strings whose byte order is the key order.

Each key column is written big-endian (signed integers with the sign bit
flipped), and the columns are concatenated. NumPy compares ``S`` arrays
lexicographically, so ``np.searchsorted`` bisects composite keys such as
``(run_number uint32, event_number uint64)`` vectorised, with no Python loop.

NumPy drops trailing zero bytes when it hands out one element of an ``S``
array (``np.bytes_``); that keeps the order (a shorter string sorts first,
exactly as zero padding would) but means single elements must be compared as
arrays or re-padded (``decode_key`` does) rather than compared as ``bytes``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

EncodedKeys = npt.NDArray[np.bytes_]
KeyDtypes = Sequence[np.dtype[Any]]


def _as_sortable_unsigned(column: npt.NDArray[Any]) -> npt.NDArray[np.unsignedinteger[Any]]:
    if column.dtype.kind == "u":
        return column
    if column.dtype.kind == "i":
        unsigned = np.dtype(f"u{column.dtype.itemsize}")
        sign = np.array(1 << (8 * column.dtype.itemsize - 1), dtype=unsigned)
        return column.view(unsigned) ^ sign  # type: ignore[no-any-return]
    raise TypeError(f"key columns must be integers, not {column.dtype}")


def key_width(dtypes: KeyDtypes) -> int:
    """Bytes of one encoded key."""
    return sum(dtype.itemsize for dtype in dtypes)


def encode_key_columns(columns: Sequence[npt.NDArray[Any]]) -> EncodedKeys:
    """Encode parallel integer key columns into one sortable ``S<width>`` array."""
    rows = len(columns[0])
    width = sum(column.dtype.itemsize for column in columns)
    packed = np.empty((rows, width), dtype=np.uint8)
    offset = 0
    for column in columns:
        size = column.dtype.itemsize
        unsigned = _as_sortable_unsigned(np.ascontiguousarray(column))
        big_endian = unsigned.astype(unsigned.dtype.newbyteorder(">"), copy=False)
        packed[:, offset : offset + size] = big_endian.view(np.uint8).reshape(rows, size)
        offset += size
    return packed.view(f"S{width}").reshape(rows)


def decode_key_columns(encoded: EncodedKeys, dtypes: KeyDtypes) -> list[npt.NDArray[Any]]:
    """The integer key columns of encoded keys: the inverse of ``encode_key_columns``."""
    width = key_width(dtypes)
    rows = len(encoded)
    raw = np.ascontiguousarray(encoded, dtype=f"S{width}").view(np.uint8).reshape(rows, width)
    columns = []
    offset = 0
    for dtype in dtypes:
        size = dtype.itemsize
        unsigned = np.dtype(f"u{size}")
        chunk = np.ascontiguousarray(raw[:, offset : offset + size])
        values = chunk.view(unsigned.newbyteorder(">")).reshape(rows).astype(unsigned)
        if dtype.kind == "i":
            values ^= np.array(1 << (8 * size - 1), dtype=unsigned)
        columns.append(values.view(dtype))
        offset += size
    return columns


_BOOLS = frozenset({bool, np.bool_})


def _check_component(value: object, position: int, dtype: np.dtype[Any]) -> int:
    # bool is an int subclass, but True is no run number: refuse it with other non-integers.
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"key component {position} = {value!r} is not an integer")
    number = int(value)
    info = np.iinfo(dtype)
    if not info.min <= number <= info.max:
        raise ValueError(
            f"key component {position} = {number} is outside {dtype} [{info.min}, {info.max}]"
        )
    return number


def encode_key(key: Sequence[int], dtypes: KeyDtypes) -> bytes:
    """Encode one key tuple (full width, as ``bytes``); ``ValueError`` if it does not fit.

    This is the single-lookup path: a few ``int.to_bytes`` calls cost far less
    than building NumPy arrays for one key.
    """
    if len(key) != len(dtypes):
        raise ValueError(f"key {tuple(key)!r} has {len(key)} components, expected {len(dtypes)}")
    parts = []
    for position, (value, dtype) in enumerate(zip(key, dtypes, strict=True)):
        number = _check_component(value, position, dtype)
        if dtype.kind == "i":
            number += 1 << (8 * dtype.itemsize - 1)
        parts.append(number.to_bytes(dtype.itemsize, "big"))
    return b"".join(parts)


def encode_query_keys(keys: Sequence[Sequence[int]], dtypes: KeyDtypes) -> EncodedKeys:
    """Encode Python key tuples with the file's key dtypes; ``ValueError`` if one does not fit.

    Integer arrays are range-checked vectorised; only values that NumPy cannot
    hold in one integer array (a mix beyond int64 and uint64) are checked one by one.
    """
    width = key_width(dtypes)
    if len(keys) == 0:
        return np.empty(0, dtype=f"S{width}")
    if set(map(len, keys)) != {len(dtypes)}:
        bad = next(key for key in keys if len(key) != len(dtypes))
        raise ValueError(f"key {tuple(bad)!r} has {len(bad)} components, expected {len(dtypes)}")
    columns = []
    for position, dtype in enumerate(dtypes):
        values = [key[position] for key in keys]
        try:
            array = np.asarray(values)
        except OverflowError:
            array = np.asarray(values, dtype=object)
        # NumPy turns True into 1 in an integer array: look for bools before trusting it.
        if array.dtype.kind in "iu" and not _BOOLS & set(map(type, values)):
            info = np.iinfo(dtype)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise ValueError(
                    f"key component {position} = {int(bad)} is outside {dtype} "
                    f"[{info.min}, {info.max}]"
                )
            columns.append(array.astype(dtype))
        else:
            checked = [_check_component(value, position, dtype) for value in values]
            columns.append(np.array(checked, dtype=dtype))
    return encode_key_columns(columns)


def encode_bound(prefix: Sequence[int], dtypes: KeyDtypes, *, upper: bool) -> bytes:
    """Encode a scan bound that may name only the leading key columns.

    The missing columns take their lowest value for a lower bound and their
    highest for an upper bound, so ``(run,)`` as both bounds means "the whole run".
    """
    if not 0 < len(prefix) <= len(dtypes):
        raise ValueError(
            f"bound {tuple(prefix)!r} must have 1 to {len(dtypes)} components, not {len(prefix)}"
        )
    padding = []
    for dtype in dtypes[len(prefix) :]:
        info = np.iinfo(dtype)
        padding.append(int(info.max if upper else info.min))
    return encode_key([*prefix, *padding], dtypes)


def decode_key(encoded: bytes, dtypes: KeyDtypes) -> tuple[int, ...]:
    """The integer tuple of one encoded key (trailing zero bytes restored)."""
    raw = bytes(encoded).ljust(key_width(dtypes), b"\0")
    values = []
    offset = 0
    for dtype in dtypes:
        size = dtype.itemsize
        number = int.from_bytes(raw[offset : offset + size], "big")
        if dtype.kind == "i":
            number -= 1 << (8 * size - 1)
        values.append(number)
        offset += size
    return tuple(values)
