"""Number arrays of a message, decoded into the buffers Arrow reads.

An integer array is plain JSON or, in version 2, a constant ``{"k": v}``,
running sums ``{"d": [...]}``, runs ``{"r": [...]}`` or bytes in the compressed
block ``{"z": "zstd"}``; each is checked in bulk (``array.fromlist`` checks JSON
type and range in one C call) and becomes one buffer of the column's items.
Buffers that recur from message to message (constant columns, fixed-width
offsets, validity bits, uniform reference formats) are cached. :class:`_Packed`
collects the arrays that live in the ``z`` block while a message is read, so
that one decompression (:func:`_unpack_block`) fills them all.
"""

from __future__ import annotations

import functools
import itertools
from array import array
from typing import Any, Final

import numpy as np
import zstandard

from eventindex.records.codec import compression
from eventindex.records.codec.compression import _b64, _zstd_content_size
from eventindex.records.codec.reasons import (
    _INT_FORMS,
    _base64_error,
    _encoding_error,
    _integer_problem,
    _Place,
    _runs_place,
    _scan_deltas,
    _scan_integers,
    _shape_error,
)
from eventindex.records.codec.wire import _KNOWN_LIMIT, _NUMPY_TYPES, MessageError, _describe

# --------------------------------------------------------------------------- cached buffers


@functools.lru_cache(maxsize=4096)
def _fixed_offsets(width: int, n: int) -> bytes:
    """int32 Arrow offsets of ``n`` values of ``width`` bytes each."""
    return (np.arange(n + 1, dtype=np.int32) * np.int32(width)).tobytes()


@functools.lru_cache(maxsize=1024)
def _tiled(item: bytes, n: int) -> bytes:
    """``n`` copies of ``item``: the buffer of a constant column."""
    return item * n


def _repeated(code: str, value: float, n: int) -> bytes:
    """``n`` copies of one (already checked) value as array ``code`` items."""
    # Keyed by the packed bytes, so that 0.0 and -0.0 (equal as keys) stay apart.
    return _tiled(array(code, [value]).tobytes(), n)


# (typecode, value, n) -> the buffer of a constant integer column.
_CONSTANTS: dict[tuple[str, int, int], bytes] = {}


def _constant(code: str, value: int, n: int) -> bytes:
    """``_repeated`` for a checked integer, from a plain dict: constants recur."""
    key = (code, value, n)
    data = _CONSTANTS.get(key)
    if data is None:
        if len(_CONSTANTS) >= _KNOWN_LIMIT:
            _CONSTANTS.clear()
        data = _CONSTANTS[key] = array(code, [value]).tobytes() * n
    return data


@functools.lru_cache(maxsize=256)
def _bits(value: int, n: int) -> bytes:
    """``n`` Arrow validity-style bits, all ``value``."""
    return np.packbits(np.full(n, value, dtype=np.uint8), bitorder="little").tobytes()


@functools.lru_cache(maxsize=1024)
def _uniform_formats(formats: tuple[str, ...], n: int) -> tuple[bytes, bytes]:
    """Offsets and data of the format strings when every event has ``formats``, in order."""
    return _uniform_format_buffers(formats, n)


def _uniform_format_buffers(formats: tuple[str, ...], n: int) -> tuple[bytes, bytes]:
    encoded = [f.encode() for f in formats]
    lengths = np.tile(np.array([len(e) for e in encoded], dtype=np.int32), n)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets.tobytes(), b"".join(encoded) * n


# --------------------------------------------------------------------------- integer arrays


def _int_array(
    spec: Any,
    n: int,
    code: str,
    high: int,
    place: _Place,
    version: int,
    checked: tuple[list[list[Any]], list[_Place]],
) -> Any:
    """One checked integer array of ``n`` values, as a buffer of array ``code`` items."""
    if type(spec) is list:
        if len(spec) != n:
            raise _shape_error(place, spec, n)
        values = array(code)
        try:
            values.fromlist(spec)
        except (TypeError, OverflowError):
            raise _scan_integers(place, spec, high) from None
        checked[0].append(spec)
        checked[1].append(place)
        return values
    if type(spec) is not dict or version < 2 or len(spec) != 1:
        raise _encoding_error(place, spec, version, _INT_FORMS)
    if "k" in spec:
        value = spec["k"]
        if type(value) is not int or not 0 <= value <= high:
            problem = (
                _integer_problem(value, high) or f"expected an integer, got {_describe(value)}"
            )
            raise place.error(f"constant: {problem}")
        return _repeated(code, value, n)
    if "d" in spec:
        return _delta_array(spec["d"], n, code, high, place, checked)
    if "r" in spec:
        return _runs_array(spec["r"], n, code, high, place, checked)
    raise _encoding_error(place, spec, version, _INT_FORMS)


# Above this many values a delta array is summed by numpy rather than itertools.
_NUMPY_DELTAS: Final = 256


def _delta_array(
    steps: Any,
    n: int,
    code: str,
    high: int,
    place: _Place,
    checked: tuple[list[list[Any]], list[_Place]],
) -> Any:
    """The running sums of ``[first, delta1, ...]``, range-checked.

    Python integers cannot overflow, and ``fromlist`` refuses any sum outside the
    type (and any float a float delta made), so no delta needs a range of its
    own. Long arrays go through numpy instead, where int32 deltas (refused
    otherwise by the array conversion) keep the int64 sums exact.
    """
    if type(steps) is not list or len(steps) != n:
        raise _shape_error(place.delta(), steps, n)
    checked[0].append(steps)
    checked[1].append(place.delta())
    if n > _NUMPY_DELTAS:
        values = _numpy_sums(steps, code, high)
        if values is not None:
            return values
    values = array(code)
    try:
        values.fromlist(list(itertools.accumulate(steps)))
    except (TypeError, OverflowError):
        raise _scan_deltas(place, steps, high) from None
    return values


def _numpy_sums(steps: list[Any], code: str, high: int) -> Any:
    """The running sums by numpy, or None to leave the array (valid or not) to Python."""
    first = steps[0]
    if type(first) is not int or not 0 <= first <= high:
        return None
    deltas = array("i")
    try:
        deltas.fromlist(steps[1:])
    except (TypeError, OverflowError):  # a bad delta, or one beyond int32
        return None
    # fewer than 2**31 int32 deltas: the int64 sums are exact
    sums = np.cumsum(np.frombuffer(deltas, dtype=np.int32), dtype=np.int64)
    if first + int(sums.min()) < 0 or first + int(sums.max()) > high:
        return None
    values = np.empty(len(steps), dtype=_NUMPY_TYPES[code])
    values[0] = first
    # in uint64 arithmetic, which wraps, first + sum is exact: the sum is in range
    np.add(sums.view(np.uint64), np.uint64(first), out=values[1:], casting="unsafe")
    return values


def _runs_array(
    runs: Any,
    n: int,
    code: str,
    high: int,
    place: _Place,
    checked: tuple[list[list[Any]], list[_Place]],
) -> Any:
    """``[value1, count1, value2, count2, ...]``: ``count`` rows of each value, in order."""
    if type(runs) is not list or len(runs) % 2:
        got = f"{len(runs)} items" if type(runs) is list else _describe(runs)
        raise _runs_place(place).error(f"expected an array of value, count pairs, got {got}")
    counts = array("I")
    try:
        counts.fromlist(runs[1::2])
    except (TypeError, OverflowError):
        counts = array("I")  # refused below, with the first bad count
    if len(counts) * 2 != len(runs) or (counts and min(counts) < 1):
        at = next(i for i in range(1, len(runs), 2) if type(runs[i]) is not int or runs[i] < 1)
        raise _runs_place(place).error(
            f"run {at // 2}: expected a count >= 1, got {_describe(runs[at])}"
        )
    if sum(counts) != n:
        raise _runs_place(place).error(
            f"the run counts add up to {sum(counts)}, the header count is {n}"
        )
    values = array(code)
    try:
        values.fromlist(runs[0::2])
    except (TypeError, OverflowError):
        at = next(i for i in range(0, len(runs), 2) if _integer_problem(runs[i], high))
        row = sum(counts[: at // 2])
        raise place.error(f"runs: {_integer_problem(runs[at], high)}", row) from None
    checked[0].append(runs)
    checked[1].append(place.runs)
    if len(counts) > 16:
        dtype = _NUMPY_TYPES[code]
        return np.repeat(np.frombuffer(values, dtype=dtype), np.frombuffer(counts, np.uint32))
    size = values.itemsize
    data = values.tobytes()
    return b"".join([data[i * size : (i + 1) * size] * count for i, count in enumerate(counts)])


# --------------------------------------------------------------------------- the compressed block


class _Packed:
    """The arrays a message keeps in its compressed block ``z``, filled in by unpack().

    Each ``{"z": "zstd"}`` array asks for its bytes (little-endian items of its
    type) as it is read, columns in schema order and then the reference slots,
    which is the order the block holds them in: one decompression serves all.
    """

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests: list[tuple[Any, Any, int]] = []

    def add(self, target: Any, key: Any, size: int) -> None:
        """Put ``size`` bytes of the block in ``target[key]`` on unpack()."""
        self.requests.append((target, key, size))

    def unpack(self, text: object, limit: int) -> None:
        requests = self.requests
        if not requests:
            if text is not None:
                raise MessageError("compressed block, but no array is in it", field="z")
            return
        if text is None:
            raise MessageError("missing: the compressed block", field="z")
        total = sum([size for _, _, size in requests])
        if total > limit:
            raise MessageError(
                f"the compressed block would decode to {total} bytes, over the limit of {limit}",
                field="z",
            )
        block = memoryview(_unpack_block(text, total))
        at = 0
        for target, key, size in requests:
            target[key] = block[at : at + size]
            at += size


def _unpack_block(packed: object, expected: int) -> bytes:
    """The decompressed ``z`` block, exactly ``expected`` bytes, or MessageError."""
    data = _b64(packed)
    if data is None:
        raise _base64_error("compressed block", packed, "z")
    if compression._ZSTD is None:
        raise MessageError("compressed block: zstd is not available here", field="z")
    try:
        return compression._ZSTD.decompress(data, expected)
    except zstandard.ZstdError as exc:
        declared = _zstd_content_size(data)
        if declared is not None and declared != expected:
            reason = f"decompresses to {declared} bytes, not the {expected} of its arrays"
        else:
            reason = f"not a zstd frame of {expected} bytes: {exc}"
        raise MessageError(f"compressed block: {reason}", field="z") from None
