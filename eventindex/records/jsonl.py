"""Event records as JSON lines: one JSON object per event, fields as in ``EVENT_SCHEMA``.

Trigger masks are lowercase hex strings of their bytes (bit i is bit i % 8 of
byte i // 8, so ``"0100"`` sets bit 0 of a 16-bit mask); references are lists
of ``{"format", "guid", "position"}`` objects. ``read_jsonl`` checks every
line and raises ``JsonlError`` (a ``ValidationError``) naming the line, the
field and the reason for the first problem it finds.
"""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pyarrow as pa

from eventindex.errors import ValidationError
from eventindex.records.schema import EVENT_SCHEMA, REFERENCE_TYPE, TRIGGER_MASK_FIELDS

PathOrFile = str | os.PathLike[str] | IO[bytes] | IO[str]

_FIELDS: tuple[str, ...] = tuple(EVENT_SCHEMA.names)
_FIELD_SET = frozenset(_FIELDS)
_REFERENCE_FIELDS = frozenset(field.name for field in REFERENCE_TYPE)
_UINT_LIMITS = {pa.uint16(): 2**16 - 1, pa.uint32(): 2**32 - 1, pa.uint64(): 2**64 - 1}
# Limits tighter than the storage type: LHC bunch slots, nanoseconds within a second.
_FIELD_LIMITS = {"bcid": 3563, "timestamp_ns": 999_999_999}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_HEX = re.compile(r"[0-9a-fA-F]*")
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WRITE_BATCH_ROWS = 4096


class JsonlError(ValidationError):
    """A JSON-lines record is invalid: ``line`` (1-based), ``field`` (or None), ``reason``."""

    def __init__(self, line: int, field: str | None, reason: str) -> None:
        where = f"line {line}: field {field!r}" if field else f"line {line}"
        super().__init__(f"{where}: {reason}")
        self.line = line
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _conform(table: pa.Table) -> pa.Table:
    names = set(table.column_names)
    missing = [name for name in _FIELDS if name not in names]
    extra = sorted(names - _FIELD_SET)
    if missing or extra:
        raise ValueError(
            f"write_jsonl writes event records: missing columns {missing}, unknown columns {extra}"
        )
    table = table.select(list(_FIELDS)).cast(EVENT_SCHEMA)
    for name in _FIELDS:
        if table.column(name).null_count:
            raise ValueError(f"column {name!r} has nulls; event records have none")
    return table


def _hex_values(array: pa.Array) -> list[str]:
    """Each binary value of ``array`` as a lowercase hex string, without a per-value call."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)
    offsets = offsets[array.offset : array.offset + len(array) + 1]
    data = array.buffers()[2]
    start, end = int(offsets[0]), int(offsets[-1])
    hexed = data.to_pybytes()[start:end].hex() if data is not None else ""
    bounds = ((offsets - start) * 2).tolist()
    return [hexed[a:b] for a, b in itertools.pairwise(bounds)]


def _reference_values(array: pa.Array) -> list[list[dict[str, Any]]]:
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)
    offsets = offsets[array.offset : array.offset + len(array) + 1]
    formats, guids, positions = array.flatten().flatten()
    flat = [
        {"format": f, "guid": g, "position": p}
        for f, g, p in zip(
            formats.to_pylist(), guids.to_pylist(), positions.to_numpy().tolist(), strict=True
        )
    ]
    bounds = (offsets - offsets[0]).tolist()
    return [flat[a:b] for a, b in itertools.pairwise(bounds)]


def _column_values(array: pa.Array) -> list[Any]:
    if array.type == pa.binary():
        return _hex_values(array)
    if array.type == EVENT_SCHEMA.field("references").type:
        return _reference_values(array)
    return array.to_numpy(zero_copy_only=False).tolist()  # type: ignore[no-any-return]


def _encoded_lines(table: pa.Table) -> Iterable[bytes]:
    for batch in table.to_batches(max_chunksize=_WRITE_BATCH_ROWS):
        columns = [_column_values(batch.column(i)) for i in range(batch.num_columns)]
        dumps = orjson.dumps
        newline = orjson.OPT_APPEND_NEWLINE
        yield b"".join(
            dumps(dict(zip(_FIELDS, row, strict=True)), option=newline)
            for row in zip(*columns, strict=True)
        )


def write_jsonl(table: pa.Table, path_or_file: PathOrFile) -> int:
    """Write one JSON object per event to a path or an open file; returns the event count."""
    table = _conform(table)
    if isinstance(path_or_file, str | os.PathLike):
        with Path(path_or_file).open("wb") as handle:
            for chunk in _encoded_lines(table):
                handle.write(chunk)
    elif isinstance(path_or_file, io.TextIOBase):
        for chunk in _encoded_lines(table):
            path_or_file.write(chunk.decode("utf-8"))
    else:
        binary: IO[bytes] = path_or_file  # type: ignore[assignment]
        for chunk in _encoded_lines(table):
            binary.write(chunk)
    return int(table.num_rows)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def _read_bytes(source: PathOrFile) -> bytes:
    if isinstance(source, str | os.PathLike):
        return Path(source).read_bytes()
    content = source.read()
    return content.encode("utf-8") if isinstance(content, str) else content


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _first(values: Sequence[Any], bad: Callable[[Any], bool]) -> int:
    return next(i for i, value in enumerate(values) if bad(value))


def _check_uint(name: str, values: list[Any], lines: list[int], limit: int) -> None:
    # Column at a time with C-speed builtins; only an error costs a Python scan.
    if set(map(type, values)) - {int}:
        i = _first(values, lambda v: type(v) is not int)
        value = values[i]
        if type(value) is float and value.is_integer() and abs(value) >= 2**63:
            # orjson reads integers beyond 64 bits as floats.
            bound = "must not be negative" if value < 0 else f"must be at most {limit}"
            raise JsonlError(lines[i], name, f"{bound}, got {value:.0f}")
        raise JsonlError(lines[i], name, f"expected an integer, got {_type_name(value)}")
    if min(values) < 0:
        i = _first(values, lambda v: v < 0)
        raise JsonlError(lines[i], name, f"must not be negative, got {values[i]}")
    if max(values) > limit:
        i = _first(values, lambda v: v > limit)
        raise JsonlError(lines[i], name, f"must be at most {limit}, got {values[i]}")


def _check_bool(name: str, values: list[Any], lines: list[int]) -> None:
    if set(map(type, values)) - {bool}:
        i = _first(values, lambda v: type(v) is not bool)
        raise JsonlError(lines[i], name, f"expected true or false, got {_type_name(values[i])}")


def _check_float(name: str, values: list[Any], lines: list[int]) -> None:
    if set(map(type, values)) - {int, float}:
        i = _first(values, lambda v: type(v) not in (int, float))
        raise JsonlError(lines[i], name, f"expected a number, got {_type_name(values[i])}")
    numbers = np.array(values, dtype=np.float64)
    bad = ~(np.abs(numbers) <= _FLOAT32_MAX)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise JsonlError(lines[i], name, f"{values[i]} does not fit a 32-bit float")


def _mask_array(name: str, values: list[Any], lines: list[int]) -> pa.Array:
    if set(map(type, values)) - {str}:
        i = _first(values, lambda v: type(v) is not str)
        raise JsonlError(lines[i], name, f"expected a hex string, got {_type_name(values[i])}")
    joined = "".join(values)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    if _HEX.fullmatch(joined) is None:
        i = _first(values, lambda v: _HEX.fullmatch(v) is None)
        raise JsonlError(lines[i], name, "not a hex string (digits 0-9 and a-f only)")
    if (lengths & 1).any():
        i = int(np.flatnonzero(lengths & 1)[0])
        raise JsonlError(lines[i], name, "hex string of odd length: masks are whole bytes")
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths // 2, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("too many mask bytes for one Arrow array: read a smaller file")
    data = pa.py_buffer(bytes.fromhex(joined))
    return pa.Array.from_buffers(
        pa.binary(), len(values), [None, pa.py_buffer(offsets.astype(np.int32)), data]
    )


def _reference_array(values: list[Any], lines: list[int]) -> pa.Array:
    formats: list[str] = []
    guids: list[str] = []
    positions: list[int] = []
    offsets = [0]
    limit = _UINT_LIMITS[pa.uint64()]
    for row, line in zip(values, lines, strict=True):
        if type(row) is not list:
            raise JsonlError(line, "references", f"expected a list, got {_type_name(row)}")
        for index, ref in enumerate(row):
            where = f"references[{index}]"
            if type(ref) is not dict:
                raise JsonlError(line, where, f"expected an object, got {_type_name(ref)}")
            if ref.keys() != _REFERENCE_FIELDS:
                missing = sorted(_REFERENCE_FIELDS - ref.keys())
                reason = f"missing {missing}" if missing else "unknown fields"
                unknown = sorted(ref.keys() - _REFERENCE_FIELDS)
                raise JsonlError(line, where, f"{reason} {unknown}" if unknown else reason)
            fmt, guid, position = ref["format"], ref["guid"], ref["position"]
            if type(fmt) is not str or not fmt:
                raise JsonlError(line, f"{where}.format", "expected a non-empty string")
            if type(guid) is not str or _GUID.fullmatch(guid) is None:
                raise JsonlError(line, f"{where}.guid", f"not a GUID: {guid!r}")
            if type(position) is not int or not 0 <= position <= limit:
                raise JsonlError(
                    line, f"{where}.position", f"expected an unsigned integer, got {position!r}"
                )
            formats.append(fmt)
            guids.append(guid)
            positions.append(position)
        offsets.append(len(formats))
    struct = pa.StructArray.from_arrays(
        [
            pa.array(formats, type=pa.string()),
            pa.array(guids, type=pa.string()),
            pa.array(positions, type=pa.uint64()),
        ],
        fields=list(REFERENCE_TYPE),
    )
    return pa.ListArray.from_arrays(
        pa.array(offsets, type=pa.int32()), struct, type=EVENT_SCHEMA.field("references").type
    )


def _parse_lines(content: bytes) -> tuple[dict[str, list[Any]], list[int]]:
    columns: dict[str, list[Any]] = {name: [] for name in _FIELDS}
    appenders = [(name, columns[name].append) for name in _FIELDS]
    lines: list[int] = []
    for number, line in enumerate(content.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise JsonlError(number, None, f"invalid JSON: {error}") from None
        if type(record) is not dict:
            raise JsonlError(number, None, f"expected a JSON object, got {_type_name(record)}")
        if record.keys() != _FIELD_SET:
            missing = [name for name in _FIELDS if name not in record]
            if missing:
                raise JsonlError(number, missing[0], "missing field")
            unknown = sorted(record.keys() - _FIELD_SET)
            raise JsonlError(number, unknown[0], "unknown field")
        for name, append in appenders:
            append(record[name])
        lines.append(number)
    return columns, lines


def read_jsonl(source: PathOrFile) -> pa.Table:
    """Read JSON lines written by ``write_jsonl`` into a table with exactly ``EVENT_SCHEMA``.

    Blank lines are skipped. The first invalid record raises ``JsonlError``.
    """
    columns, lines = _parse_lines(_read_bytes(source))
    if not lines:
        return EVENT_SCHEMA.empty_table()
    arrays = []
    for field in EVENT_SCHEMA:
        values = columns[field.name]
        if field.name in TRIGGER_MASK_FIELDS:
            arrays.append(_mask_array(field.name, values, lines))
        elif field.name == "references":
            arrays.append(_reference_array(values, lines))
        else:
            if field.type in _UINT_LIMITS:
                limit = _FIELD_LIMITS.get(field.name, _UINT_LIMITS[field.type])
                _check_uint(field.name, values, lines, limit)
            elif field.type == pa.bool_():
                _check_bool(field.name, values, lines)
            else:
                _check_float(field.name, values, lines)
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)


__all__ = ["JsonlError", "read_jsonl", "write_jsonl"]
