"""What every part of the codec agrees on: versions, limits, the error, the column layout.

The format's constants (versions, the message size and expansion limits, what
a GUID and a data format look like, the float32 range), :class:`MessageError`
and how a wire value is quoted in its reasons, the keys each JSON object of a
message may have, the sets of GUIDs and formats already seen to be valid, and
the layout of ``EVENT_SCHEMA`` as the codec sees it: which columns are
integers, booleans, floats and masks, and where each column's values sit among
the Arrow body pieces. It imports no other module of the package, and a
schema change the codec cannot carry fails here, at import.
"""

from __future__ import annotations

import re
from array import array
from typing import Any, Final

import numpy as np
import orjson
import pyarrow as pa

from eventindex.config import CodecSettings
from eventindex.errors import ValidationError
from eventindex.records.schema import EVENT_SCHEMA, REFERENCE_TYPE

FORMAT_VERSION: Final = 2
SUPPORTED_VERSIONS: Final = frozenset({1, FORMAT_VERSION})
DEFAULT_MAX_MESSAGE_BYTES: Final = CodecSettings.model_validate({}).max_message_bytes
# A message may decode to at most this many bytes of masks, and as many of
# references, per byte of the decoder's ``max_bytes``: constant, dictionary and
# compressed columns would otherwise let a small message claim gigabytes.
MAX_EXPANSION: Final = 64

# Arrow binary and list offsets are int32: no message may need more.
MAX_COUNT: Final = 2**31 - 1
GUID_LENGTH: Final = 36
# What the decoder counts per reference against MAX_EXPANSION: its GUID, position,
# offsets and the longest format name.
_REFERENCE_BYTES: Final = GUID_LENGTH + 8 + 2 * 4 + 64

_GUID_RE: Final = re.compile(
    r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
)
# Data formats as ATLAS names them: RAW, ESD, AOD, DAOD_PHYS, EVNT, ...
_FORMAT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
# float32(x) is infinite from here on (FLT_MAX plus half an ulp rounds up).
_F32_OVERFLOW: Final = 3.4028235677973366e38
_F32_MAX: Final = float(np.finfo(np.float32).max)


class MessageError(ValidationError):
    """A message breaks the wire format; ``field`` and ``row`` (0-based) say where."""

    def __init__(self, reason: str, *, field: str | None = None, row: int | None = None) -> None:
        self.field = field
        self.row = row
        self.reason = reason
        where = []
        if field is not None:
            where.append(f"field {field!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments need help to survive pickling (worker processes, DLQ records).
        return (_rebuild_message_error, (self.reason, self.field, self.row))


def _rebuild_message_error(reason: str, field: str | None, row: int | None) -> MessageError:
    return MessageError(reason, field=field, row=row)


_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def _describe(value: object) -> str:
    """A JSON value with its type, as it appeared on the wire: ``string "12"``."""
    if value is None:
        return "null"
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{_JSON_TYPE_NAMES.get(type(value), type(value).__name__)} {text}"


# --------------------------------------------------------------------------- keys

_TOP_KEYS: Final = frozenset(("v", "h", "c"))
_TOP_KEYS_PACKED: Final = _TOP_KEYS | {"z"}
_PLAIN_MASK_KEYS: Final = frozenset(("w", "b64"))
_MASK_ENCODINGS: Final = (
    frozenset(("w", "b64")),
    frozenset(("w", "k")),
    frozenset(("w", "u", "i")),
    frozenset(("w", "z")),
)
_REFERENCE_KEYS: Final = frozenset(("n", "g", "s"))
_SLOT_KEYS: Final = frozenset(("f", "g", "p"))

# Formats and GUIDs already seen to be valid: a set lookup instead of a regex per message.
_KNOWN_FORMATS: set[str] = set()
_KNOWN_GUIDS: set[str] = set()
_KNOWN_LIMIT: Final = 4096


# --------------------------------------------------------------------------- columns

_INT_TYPES: Final[dict[pa.DataType, tuple[str, int, type[np.unsignedinteger[Any]]]]] = {
    pa.uint16(): ("H", 2**16 - 1, np.uint16),
    pa.uint32(): ("I", 2**32 - 1, np.uint32),
    pa.uint64(): ("Q", 2**64 - 1, np.uint64),
}
_TYPE_NAMES: Final = {2**16 - 1: "uint16", 2**32 - 1: "uint32", 2**64 - 1: "uint64"}
_NUMPY_TYPES: Final = {code: dtype for code, _, dtype in _INT_TYPES.values()}
# (name, array typecode, largest value, item size) of every integer column, in schema order.
_INT_COLUMNS: Final = tuple(
    (f.name, *_INT_TYPES[f.type][:2], f.type.bit_width // 8)
    for f in EVENT_SCHEMA
    if f.type in _INT_TYPES
)
_BOOL_COLUMNS: Final = tuple(f.name for f in EVENT_SCHEMA if f.type == pa.bool_())
_FLOAT_COLUMNS: Final = tuple(f.name for f in EVENT_SCHEMA if f.type == pa.float32())
_MASK_COLUMNS: Final = tuple(f.name for f in EVENT_SCHEMA if f.type == pa.binary())
_REFERENCES: Final = "references"
_COLUMN_KEYS: Final = frozenset(EVENT_SCHEMA.names)
_PLAIN_NAMES: Final = tuple(EVENT_SCHEMA.names[:-1])  # every column but the references
_INT, _BOOL, _FLOAT, _MASK = range(4)


def _column_layout() -> tuple[tuple[str, int, str, int, int], ...]:
    """(name, kind, array typecode, largest value, item size) of every column but references."""
    layout = []
    for field in EVENT_SCHEMA:
        if field.type in _INT_TYPES:
            code, high, _ = _INT_TYPES[field.type]
            layout.append((field.name, _INT, code, high, field.type.bit_width // 8))
        elif field.type == pa.bool_():
            layout.append((field.name, _BOOL, "B", 1, 1))
        elif field.type == pa.float32():
            layout.append((field.name, _FLOAT, "f", 0, 4))
        elif field.type == pa.binary():
            layout.append((field.name, _MASK, "B", 0, 1))
    return tuple(layout)


_LAYOUT: Final = _column_layout()
# Where each column's values sit among the body pieces (masks take two: offsets, data).
_PIECE: Final = {
    name: i + sum(kind == _MASK for _, kind, *_ in _LAYOUT[:i])
    for i, (name, *_) in enumerate(_LAYOUT)
}
_NUMBER_COLUMNS: Final = {name for name, *_ in _INT_COLUMNS} | {*_BOOL_COLUMNS, *_FLOAT_COLUMNS}

if _NUMBER_COLUMNS | set(_MASK_COLUMNS) | {_REFERENCES} != set(EVENT_SCHEMA.names) or (
    EVENT_SCHEMA.field(_REFERENCES).type != pa.list_(REFERENCE_TYPE)
):  # pragma: no cover - a schema change this codec does not know how to carry
    raise RuntimeError("EVENT_SCHEMA has columns the wire codec cannot carry")
if EVENT_SCHEMA.names[-1] != _REFERENCES:  # pragma: no cover - pieces are built in this order
    raise RuntimeError("the wire codec expects references to be the last column")
if any(array(code).itemsize != np.dtype(t).itemsize for code, _, t in _INT_TYPES.values()) or (
    array("i").itemsize != 4 or array("f").itemsize != 4
):  # pragma: no cover - exotic platforms only
    raise RuntimeError("array typecodes do not have the sizes the codec needs here")
