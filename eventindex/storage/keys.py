"""Composite keys as fixed-width byte strings whose byte order is the key order.

Each key column is written big-endian (signed integers with the sign bit
flipped), and the columns are concatenated. NumPy compares ``S`` arrays
lexicographically, so ``np.searchsorted`` bisects composite keys such as
``(run_number uint32, event_number uint64)`` vectorised, with no Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

EncodedKeys = npt.NDArray[np.bytes_]


def _as_sortable_unsigned(column: npt.NDArray[np.generic]) -> npt.NDArray[np.unsignedinteger]:
    if column.dtype.kind == "u":
        return column  # type: ignore[return-value]
    if column.dtype.kind == "i":
        unsigned = np.dtype(f"u{column.dtype.itemsize}")
        sign = np.array(1 << (8 * column.dtype.itemsize - 1), dtype=unsigned)
        return column.view(unsigned) ^ sign  # type: ignore[no-any-return]
    raise TypeError(f"key columns must be integers, not {column.dtype}")


def key_width(dtypes: Sequence[np.dtype[np.generic]]) -> int:
    return sum(dtype.itemsize for dtype in dtypes)


def encode_key_columns(columns: Sequence[npt.NDArray[np.generic]]) -> EncodedKeys:
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


def encode_query_keys(
    keys: Sequence[Sequence[int]], dtypes: Sequence[np.dtype[np.generic]]
) -> EncodedKeys:
    """Encode Python key tuples with the file's key dtypes; ``ValueError`` if one does not fit."""
    columns = []
    for position, dtype in enumerate(dtypes):
        values = [key[position] for key in keys]
        info = np.iinfo(dtype)  # type: ignore[type-var]
        for value in values:
            if not info.min <= value <= info.max:
                raise ValueError(
                    f"key component {position} = {value} is outside {dtype} "
                    f"[{info.min}, {info.max}]"
                )
        columns.append(np.array(values, dtype=dtype))
    if not keys:
        return np.empty(0, dtype=f"S{key_width(dtypes)}")
    return encode_key_columns(columns)


def decode_key(encoded: bytes, dtypes: Sequence[np.dtype[np.generic]]) -> tuple[int, ...]:
    """The integer tuple of one encoded key (trailing zero bytes restored)."""
    raw = encoded.ljust(key_width(dtypes), b"\0")
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
