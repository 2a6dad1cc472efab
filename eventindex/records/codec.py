"""The producer → consumer wire format: versioned, columnar JSON messages of event records.

A message is one JSON object::

    {"v": 2,
     "h": {"producer": "node17.cern.ch", "message_id": "t7562.j42:0",
           "dataset": "data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521",
           "collection": "data15_13TeV.physics_Main",
           "guid": "F2B1A5B0-1F57-E511-9E3E-02163E0133C9",
           "task_id": "7562", "job_id": "42", "count": 3, "sent_at": 1716900000.25},
     "c": {"run_number": {"k": 284484}, "event_number": {"d": [4294967312, 17, 9]},
           "lumi_block": {"k": 112}, "timestamp": {"r": [1444700000, 2, 1444700001, 1]},
           "timestamp_ns": {"z": "zstd"}, "bcid": [11, 1187, 2], "lvl1_id": {"z": "zstd"},
           "is_simulation": {"k": 0}, "is_calibration": {"k": 0}, "is_testbeam": [0, 0, 1],
           "mc_channel_number": {"k": 0}, "mc_event_weight": {"k": 1.0},
           "l1_tbp": {"w": 2, "z": "zstd"}, "l1_tap": {"w": 2, "z": "zstd"},
           "l1_tav": {"w": 1, "u": "BAU=", "i": [0, 1, 0]}, "hlt_passed": {"w": 1, "k": "AA=="},
           "smk": {"k": 2160}, "l1psk": {"k": 3}, "hltpsk": [5, 5, 6],
           "references": {"n": 2,
                          "g": ["0A66C3F2-56B6-E511-8B7B-02163E011F0E",
                                "5D2C7A1E-0B2D-4B3A-9C4E-1F2A3B4C5D6E"],
                          "s": [{"f": "RAW", "g": {"k": 0}, "p": {"d": [41, 1, 1]}},
                                {"f": "AOD", "g": [1, 1, 0], "p": {"z": "zstd"}}]}},
     "z":"KLUv/SA8vQEA5ALA1AEAiBMAAFg+DwAHAAAACAAAAAkAAAABgAMAAYEBAAEAAYAAAQcAAAAAAAAAAgArWTQDTw=="}

* ``v``: the format version. This module writes 2 (or, when the header asks for
  it, the plain layout of version 1) and reads both.
* ``h``: the header: the fields of :class:`MessageHeader` except ``version``;
  ``sent_at`` may be left out. ``message_id`` is unique per message and is what
  consumers use to make redelivery idempotent; ``guid`` is the producer's output
  file; ``count`` the number of events.
* ``c``: one entry per column of ``EVENT_SCHEMA``, all present and no other.
  Every array of numbers (the integer, boolean and float columns, and the ``g``
  and ``p`` arrays of reference slots) is written in one of these encodings,
  which the encoder picks array by array and message by message:

  - a plain JSON array of ``count`` values (or of the slot's size);
  - ``{"k": v}``: the value of every row (a run number, a trigger key, a flag);
  - ``{"r": [v1, n1, v2, n2, ...]}``: runs, ``n1`` rows of ``v1`` and so on,
    every count at least 1 (timestamps, luminosity blocks, prescale keys);
  - ``{"d": [first, delta1, ...]}``: ``count`` entries whose running sums are the
    values (sorted numbers such as event numbers, when there is no ``z`` block);
  - ``{"z": "zstd"}``: the values are in the message's compressed block ``z``
    (not for booleans).

  Values must be within the Arrow type: uint16, uint32, uint64 (running sums
  included), 0/1 for booleans, float32 for ``mc_event_weight``. Booleans and
  numbers are never JSON ``true``/``false``, which makes a stray boolean cheap
  to detect. Runs and deltas apply to integers only.
* trigger masks: ``{"w": width_in_bytes, ...}``, every mask of the column being
  ``w`` bytes (the encoder pads shorter masks with zero bytes, which set no
  bits; bit ``i`` is bit ``i % 8`` of byte ``i // 8``), and one of ``"b64"``:
  base64 of the ``count`` masks concatenated; ``"k"``: base64 of the one mask of
  every row; ``"u"`` and ``"i"``: base64 of a table of distinct masks, and per
  row its index in that table (an integer array as above, not packed);
  ``"z": "zstd"``: the masks are in the compressed block.
* ``references``: ``n`` is the number of references of each event (one integer
  when every event has the same number, else an array of ``count`` integers);
  ``g`` is the table of distinct file GUIDs of this message (canonical
  8-4-4-4-12 hex); ``s`` holds one object per reference slot: slot ``k`` covers
  the ``k``-th reference of every event that has more than ``k`` references, in
  event order: ``f`` its data format (one string for the whole slot, or an
  array of strings), ``g`` indices into the GUID table, ``p`` the event's
  position (entry number, uint64) in that file.
* ``z`` (present exactly when some array is ``{"z": "zstd"}``): base64 of one
  zstd frame holding the little-endian values of every such array, columns in
  schema order and then each slot's ``g`` and ``p``. Trigger masks are mostly
  zero bytes and one frame catches what columns share (after-veto bits are
  nearly always the after-prescale bits); numbers cost no Python object per
  value to decode.

Version 1 is the same without ``z`` and with plain arrays and ``"b64"`` masks only.

Decoding validates everything and rejects a message with :class:`MessageError`,
naming the field, the 0-based row and the reason; it never drops rows. Each JSON
array is checked in bulk, by one C-level conversion (``array.fromlist``) that
checks JSON type and range together, and running sums of deltas by the same
conversion of ``itertools.accumulate`` (exact: Python integers do not
overflow; long arrays of int32 deltas go through numpy's int64 ``cumsum``,
which cannot overflow either, and a range check); only an array known to be
bad is scanned row by row, to name its first bad row. The compressed block
must decompress to exactly the bytes its arrays need. What a message may expand
to is bounded before anything is allocated: ``count`` by its size in bytes,
masks, references and the block each by ``MAX_EXPANSION`` times ``max_bytes``.
The record batch is then assembled from the decoded buffers with a single Arrow
IPC read rather than twenty-odd array constructors, which for a 10 kB message
would cost more than parsing its JSON.

:func:`decode_messages` decodes several messages into one table: each is
checked as :func:`decode_events` checks it and accepted or refused on its own,
but the work numpy does per call (reference buffers, the key order check, the
GUID index range check, the IPC read) is done once for all of them, and only a
message a bulk pass flags gets its own check, which names field, row and reason.
Base64 goes through pybase64 (SIMD) and zstd through one reused context per
thread; :func:`encode_message_batches` compresses at a cheap level and fits
rows to the target from the bytes per row of the previous message.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import itertools
import logging
import math
import re
import struct
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pybase64
import zstandard

from eventindex.config import CodecSettings
from eventindex.errors import ValidationError
from eventindex.records.schema import EVENT_KEY, EVENT_SCHEMA, REFERENCE_TYPE

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "FORMAT_VERSION",
    "MAX_EXPANSION",
    "SUPPORTED_VERSIONS",
    "DecodedMessages",
    "MessageError",
    "MessageHeader",
    "decode_events",
    "decode_messages",
    "encode_events",
    "encode_message_batches",
]

log = logging.getLogger(__name__)

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
# Level 3 compresses a 10 kB message's block ~8x faster than level 9, for ~7% more
# bytes (higher levels barely decompress faster), which producers need.
_ZSTD_LEVEL: Final = 3

_GUID_RE: Final = re.compile(
    r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
)
# Data formats as ATLAS names them: RAW, ESD, AOD, DAOD_PHYS, EVNT, ...
_FORMAT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
# float32(x) is infinite from here on (FLT_MAX plus half an ulp rounds up).
_F32_OVERFLOW: Final = 3.4028235677973366e38
_F32_MAX: Final = float(np.finfo(np.float32).max)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


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


class _Zstd:
    """zstd with one compression and one decompression context per thread.

    Making a context costs as much as decompressing a small block, and a
    context may not be shared by threads that use it at the same time.
    """

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def compress(self, data: bytes) -> bytes:
        """One frame that declares its content size."""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor.compress(data)

    def decompress(self, frame: bytes, size: int) -> bytes:
        """Exactly ``size`` bytes from one frame and nothing after it, or zstandard.ZstdError.

        A frame that declares another size is refused before anything is
        allocated: the declared size is what the decompressor would allocate.
        """
        declared = _zstd_content_size(frame)
        if declared is not None and declared != size:
            raise zstandard.ZstdError(f"frame declares {declared} bytes")
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        data = decompressor.decompress(frame, max_output_size=size, allow_extra_data=False)
        if len(data) != size:
            raise zstandard.ZstdError(f"frame holds {len(data)} bytes")
        return data


# The codec of the ``z`` block; tests set it to None to see how the codec does without.
_ZSTD: _Zstd | None = _Zstd(_ZSTD_LEVEL)


# --------------------------------------------------------------------------- header

_HEADER_TEXT_FIELDS: Final = (
    "producer",
    "message_id",
    "dataset",
    "collection",
    "guid",
    "task_id",
    "job_id",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageHeader:
    """What a message says about itself; every field is checked on construction.

    ``version`` is also the layout :func:`encode_events` writes: 2 (the default)
    or 1, the plain layout older consumers read.
    """

    version: int = FORMAT_VERSION
    producer: str
    message_id: str
    dataset: str
    collection: str
    guid: str
    task_id: str
    job_id: str
    count: int
    sent_at: float | None = None

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version not in SUPPORTED_VERSIONS:
            raise MessageError(
                f"unknown format version {_describe(self.version)} "
                f"(supported: {sorted(SUPPORTED_VERSIONS)})",
                field="v",
            )
        texts = (
            self.producer,
            self.message_id,
            self.dataset,
            self.collection,
            self.guid,
            self.task_id,
            self.job_id,
        )
        # One set() over the seven values is the common case; the loop only explains.
        if set(map(type, texts)) != {str} or "" in texts:
            for name, value in zip(_HEADER_TEXT_FIELDS, texts, strict=True):
                if type(value) is not str or not value:
                    raise MessageError(
                        f"expected a non-empty string, got {_describe(value)}",
                        field=f"header.{name}",
                    )
        if self.guid not in _KNOWN_GUIDS and _GUID_RE.fullmatch(self.guid) is None:
            raise MessageError(
                f"not a canonical 8-4-4-4-12 hex GUID: {self.guid!r}", field="header.guid"
            )
        if type(self.count) is not int or not 0 <= self.count <= MAX_COUNT:
            raise MessageError(
                f"expected an event count in [0, {MAX_COUNT}], got {_describe(self.count)}",
                field="header.count",
            )
        sent_at = self.sent_at
        if sent_at is not None and (
            type(sent_at) not in (int, float) or not math.isfinite(sent_at) or sent_at < 0
        ):
            raise MessageError(
                f"expected seconds since the epoch, got {_describe(sent_at)}",
                field="header.sent_at",
            )

    def wire_fields(self) -> dict[str, Any]:
        """The header as it is written under ``"h"``: everything but the version."""
        fields: dict[str, Any] = {
            "producer": self.producer,
            "message_id": self.message_id,
            "dataset": self.dataset,
            "collection": self.collection,
            "guid": self.guid,
            "task_id": self.task_id,
            "job_id": self.job_id,
            "count": self.count,
        }
        if self.sent_at is not None:
            fields["sent_at"] = self.sent_at
        return fields


_HEADER_KEYS: Final = frozenset((*_HEADER_TEXT_FIELDS, "count"))
_HEADER_KEYS_SENT: Final = _HEADER_KEYS | {"sent_at"}
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


def _key_error(what: str, found: Any, expected: frozenset[str], field: str) -> MessageError:
    if type(found) is not dict:
        return MessageError(f"{what}: expected an object, got {_describe(found)}", field=field)
    missing = sorted(expected - found.keys())
    if missing:
        return MessageError(f"{what}: missing key {missing[0]!r}", field=field)
    return MessageError(f"{what}: unknown key {sorted(found.keys() - expected)[0]!r}", field=field)


# (version, producer, dataset, collection, guid, task_id, job_id) of headers already
# checked: a producer's messages differ only in message_id, count and sent_at.
_KNOWN_SOURCES: set[tuple[Any, ...]] = set()
_SET = object.__setattr__  # MessageHeader is frozen


def _decode_header(version: object, fields: object) -> MessageHeader:
    if type(fields) is not dict:
        raise MessageError(f"expected an object, got {_describe(fields)}", field="h")
    get = fields.get
    source = (
        version,
        get("producer"),
        get("dataset"),
        get("collection"),
        get("guid"),
        get("task_id"),
        get("job_id"),
    )
    message_id, count, sent_at = get("message_id"), get("count"), get("sent_at")
    try:
        known = source in _KNOWN_SOURCES
    except TypeError:  # an array or object where a string belongs
        known = False
    if (
        known
        and type(version) is int  # True == 1 as a set member
        and len(fields) == (8 if sent_at is None else 9)
        and type(message_id) is str
        and message_id
        and type(count) is int
        and 0 <= count <= MAX_COUNT
        and (
            sent_at is None
            or (type(sent_at) in (int, float) and math.isfinite(sent_at) and sent_at >= 0)
        )
    ):
        header = object.__new__(MessageHeader)
        for name, value in zip(_HEADER_FIELDS, (*source, message_id, count, sent_at), strict=True):
            _SET(header, name, value)
        return header
    header = _checked_header(version, fields)
    if len(_KNOWN_SOURCES) < _KNOWN_LIMIT:
        _KNOWN_SOURCES.add(source)
    return header


# MessageHeader's fields in the order _decode_header's fast path sets them.
_HEADER_FIELDS: Final = (
    "version",
    "producer",
    "dataset",
    "collection",
    "guid",
    "task_id",
    "job_id",
    "message_id",
    "count",
    "sent_at",
)


def _checked_header(version: object, fields: dict[str, Any]) -> MessageHeader:
    keys = fields.keys()
    if keys not in (_HEADER_KEYS, _HEADER_KEYS_SENT):
        missing = sorted(_HEADER_KEYS - keys)
        if missing:
            raise MessageError("missing header field", field=f"header.{missing[0]}")
        unknown = sorted(keys - _HEADER_KEYS_SENT)
        raise MessageError("unknown header field", field=f"header.{unknown[0]}")
    return MessageHeader(version=version, **fields)  # type: ignore[arg-type]


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


class _Place:
    """Where an array sits in a message, to name field, row and reason when it is bad.

    ``prefix`` starts every reason (``"slot 1: position: "``); ``rows`` maps an
    index in the array to the event row (the identity when None); ``expected``
    says what a value should be, for the JSON boolean test.
    """

    __slots__ = ("_runs", "expected", "field", "first", "prefix", "rows")

    def __init__(
        self,
        field: str,
        prefix: str = "",
        rows: Callable[[int], int | None] | None = None,
        expected: str = "an integer",
    ) -> None:
        self.field = field
        self.prefix = prefix
        self.rows = rows
        self.expected = expected
        self._runs: _Place | None = None
        self.first = self  # where item 0 is: a delta array's first item is a value

    @property
    def runs(self) -> _Place:
        """The place of this array written as runs (built once, on first use)."""
        if self._runs is None:
            self._runs = _runs_place(self)
        return self._runs

    def error(self, reason: str, index: int | None = None) -> MessageError:
        row = index if index is None or self.rows is None else self.rows(index)
        return MessageError(self.prefix + reason, field=self.field, row=row)

    def delta(self) -> _Place:
        place = _Place(self.field, self.prefix + "delta: ", self.rows, self.expected)
        place.first = self
        return place


_COLUMN_PLACES: Final = {
    name: _Place(
        name, expected={pa.bool_(): "0 or 1", pa.float32(): "a number"}.get(t, "an integer")
    )
    for name, t in zip(EVENT_SCHEMA.names, EVENT_SCHEMA.types, strict=True)
}


# --------------------------------------------------------------------------- row scans
# These run only once a bulk check has failed, to name the first bad row.


def _integer_problem(value: object, high: int) -> str | None:
    """Why ``value`` is not an integer in ``[0, high]``, or None."""
    # orjson turns integers beyond 64 bits into floats: for those the range is what is wrong.
    huge = type(value) is float and value.is_integer() and not 0 <= value <= high
    if type(value) is not int and not huge:
        return f"expected an integer, got {_describe(value)}"
    if value < 0:  # type: ignore[operator]
        return f"negative value {value}"
    if value > high:  # type: ignore[operator]
        return f"value {value} out of range for {_TYPE_NAMES.get(high, '')} (max {high})"
    return None


def _scan_integers(place: _Place, values: Sequence[object], high: int) -> MessageError:
    for row, value in enumerate(values):
        problem = _integer_problem(value, high)
        if problem is not None:
            return place.error(problem, row)
    return place.error(f"not an array of {_TYPE_NAMES.get(high, '')} integers")


def _scan_booleans(place: _Place, values: Sequence[object]) -> MessageError:
    for row, value in enumerate(values):
        if type(value) is not int or value not in (0, 1):
            return place.error(f"expected 0 or 1, got {_describe(value)}", row)
    return place.error("not an array of 0/1")


def _float_problem(value: object) -> str | None:
    if type(value) not in (int, float):
        return f"expected a number, got {_describe(value)}"
    if abs(value) >= _F32_OVERFLOW:  # type: ignore[arg-type]
        return f"value {value} out of range for float32 (max {_F32_MAX:.8g})"
    return None


def _scan_floats(place: _Place, values: Sequence[object]) -> MessageError:
    for row, value in enumerate(values):
        problem = _float_problem(value)
        if problem is not None:
            return place.error(problem, row)
    return place.error("not an array of float32 numbers")


def _scan_deltas(place: _Place, steps: list[Any], high: int) -> MessageError:
    """The first bad delta, or the first running sum out of range."""
    total = 0
    for row, step in enumerate(steps):
        if type(step) is not int:
            what = place.delta() if row else place
            return what.error(f"expected an integer, got {_describe(step)}", row)
        total += step
        problem = _integer_problem(total, high)
        if problem is not None:
            return place.error(problem, row)
    return place.error("bad deltas")  # pragma: no cover - only called on a bad array


def _shape_error(place: _Place, values: object, n: int, what: str = "values") -> MessageError:
    if type(values) is not list:
        return place.error(f"expected an array, got {_describe(values)}")
    return place.error(f"has {len(values)} {what}, the header count is {n}")


def _encoding_error(place: _Place, spec: object, version: int, forms: str) -> MessageError:
    if version < 2 or type(spec) is not dict:
        return place.error(f"expected an array, got {_describe(spec)}")
    return place.error(f"expected an array or {forms}, got {_describe(spec)}")


_INT_FORMS: Final = '{"k": value}, {"d": [first, deltas...]} or {"r": [value, count, ...]}'


def _find_json_boolean(lists: list[list[Any]], places: list[_Place]) -> MessageError:
    """The first JSON true/false where a number belongs (array() takes them for 1/0)."""
    for values, place in zip(lists, places, strict=True):
        for row, value in enumerate(values):
            if type(value) is bool:
                where = place.first if row == 0 else place
                return where.error(f"expected {place.expected}, got {_describe(value)}", row)
    return MessageError("JSON boolean where a number belongs")  # pragma: no cover


def _find_duplicate_key(runs: list[int], events: list[int]) -> MessageError:
    seen: dict[tuple[int, int], int] = {}
    for row, key in enumerate(zip(runs, events, strict=True)):
        if key in seen:
            return MessageError(
                f"duplicate key (run_number={key[0]}, event_number={key[1]}), "
                f"first at row {seen[key]}",
                field="event_number",
                row=row,
            )
        seen[key] = row
    return MessageError("duplicate (run_number, event_number)", field="event_number")


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


# Formats and GUIDs already seen to be valid: a set lookup instead of a regex per message.
_KNOWN_FORMATS: set[str] = set()
_KNOWN_GUIDS: set[str] = set()
_KNOWN_LIMIT: Final = 4096


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


def _b64(text: object) -> bytes | None:
    """Strict base64 decoding, or None.

    pybase64 decodes with SIMD, dozens of times faster than binascii, and is the
    stricter of the two: besides everything binascii's strict mode refuses, it
    refuses padding after a whole group.
    """
    if type(text) is not str:
        return None
    try:
        return pybase64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error included
        return None


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


def _no_row(index: int) -> None:
    return None


def _runs_place(place: _Place) -> _Place:
    """Where a runs array's problems are: its rows are not one per item, so none is named."""
    return _Place(place.field, place.prefix + "runs: ", _no_row, place.expected)


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


def _marker_error(place: _Place, marker: object) -> MessageError:
    return place.error(f'compressed: expected "zstd", got {_describe(marker)}')


# --------------------------------------------------------------------------- references


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


# --------------------------------------------------------------------------- batch assembly


class _Decoded(NamedTuple):
    """One checked message's events as Arrow body pieces (see _BatchAssembler)."""

    n: int
    total: int  # references
    widths: tuple[int, ...]  # of the mask columns
    pieces: list[Any]  # without the references' pieces when ``references`` is set
    keys_checked: bool = True  # else: one run, events to be checked with _unsorted_messages
    references: _References | None = None  # checked, buffers left for assemble_many


def _reference_pieces(references: Sequence[_References], n: int) -> list[Any]:
    """The references' pieces of several messages that share one signature().

    One GUID gather and one formats buffer for all of them: per message there is
    only an assignment per slot of its GUID indices and positions.
    """
    depth, formats = references[0].depth, references[0].slot_formats
    tables = [_guid_tables(tuple(r.guids))[1] for r in references]
    numbers = np.empty((n, depth), dtype=np.uint32)
    positions = np.empty((n, depth), dtype=np.uint64)
    at = base = 0
    for reference, table in zip(references, tables, strict=True):
        stop = at + reference.n
        for k, index in enumerate(reference.guid_index):
            if type(index) is int:
                numbers[at:stop, k] = index + base
            else:
                values = index if type(index) is list else np.frombuffer(index, np.uint32)
                np.add(values, base, out=numbers[at:stop, k], casting="unsafe")
            positions[at:stop, k] = np.frombuffer(reference.positions[k], np.uint64)
        at, base = stop, base + len(table)
    total = n * depth
    format_offsets, format_data = _uniform_format_buffers(tuple(formats), n)
    guid_data = np.concatenate(tables)[numbers].view(np.uint8)
    return [
        _offsets(depth, n),
        format_offsets,
        format_data,
        _offsets(GUID_LENGTH, total),
        guid_data,
        positions,
    ]


def _offsets(width: int, n: int) -> npt.NDArray[np.int32]:
    return np.arange(n + 1, dtype=np.int32) * np.int32(width)


def _joined_bits(pieces: Sequence[Any], counts: Sequence[int]) -> Any:
    """One bit-packed buffer of several, each holding ``counts[i]`` bits."""
    if not any(bytes(piece).strip(b"\x00") for piece in pieces):  # all false: the usual flags
        return bytes(-(-sum(counts) // 8))
    bits = [
        np.unpackbits(np.frombuffer(piece, dtype=np.uint8), count=count, bitorder="little")
        for piece, count in zip(pieces, counts, strict=True)
    ]
    return np.packbits(np.concatenate(bits), bitorder="little")


def _rebased(pieces: Sequence[Any]) -> npt.NDArray[np.int32]:
    """One int32 offsets buffer of several, each starting at 0, laid end to end."""
    offsets = [np.frombuffer(piece, dtype=np.int32) for piece in pieces]
    joined = np.empty(sum(len(o) for o in offsets) - len(offsets) + 1, dtype=np.int32)
    at = base = 0
    for values in offsets:
        size = len(values) - 1
        np.add(values[:-1], base, out=joined[at : at + size])
        at += size
        base += int(values[-1])
    joined[at] = base
    return joined


class _BatchAssembler:
    """Turns decoded buffers into a RecordBatch of EVENT_SCHEMA.

    An Arrow IPC record batch message is a flatbuffer of buffer offsets and sizes
    followed by the buffers themselves, so the metadata is taken once from a
    batch that pyarrow serialises, its numbers are patched for each layout
    (cached: a producer's messages share a handful of layouts) and the whole
    batch is read with one call. With ``use_ipc`` off it builds the same arrays
    with ``Array.from_buffers`` one by one: slower, and what the IPC path is
    checked against.

    Body pieces, in schema order: the values of each number column (bit-packed
    for booleans), offsets and data of each mask column, then the references'
    list offsets, format offsets and data, guid offsets and data, and positions.
    """

    def __init__(self) -> None:
        nodes: list[bool] = []  # per Arrow node: True if one per event, False if per reference
        buffers: list[int | None] = []  # the piece of each buffer; None: no nulls
        sizes: list[tuple[str, int]] = []  # per piece: (kind, item size or mask number)
        for field in EVENT_SCHEMA:
            piece = len(sizes)
            if field.name in _MASK_COLUMNS:
                nodes.append(True)
                buffers += [None, piece, piece + 1]
                sizes += [("offsets", 0), ("mask", _MASK_COLUMNS.index(field.name))]
            elif field.name == _REFERENCES:  # list<struct<format, guid, position>>
                nodes += [True, False, False, False, False]
                buffers += [None, piece, None, None, piece + 1, piece + 2]
                buffers += [None, piece + 3, piece + 4, None, piece + 5]
                self.format_data = piece + 2
                sizes += [("offsets", 0), ("ref_offsets", 0), ("format", 0)]
                sizes += [("ref_offsets", 0), ("ref", GUID_LENGTH), ("ref", 8)]
            else:
                nodes.append(True)
                buffers += [None, piece]
                if field.type == pa.bool_():
                    sizes.append(("bits", 0))
                else:
                    sizes.append(("row", field.type.bit_width // 8))
        self.nodes = tuple(nodes)
        self.buffers = tuple(buffers)
        self.piece_sizes = tuple(sizes)
        # How assemble_many joins each piece of several messages: "join" the bytes,
        # "bits" (bit-packed), "rebase" offsets, or ("mask", k) / "guid": fixed-width offsets.
        self.reference_piece = len(sizes) - 6  # the first of the references' six pieces
        self.joins: tuple[Any, ...] = tuple(
            ("mask", following[1])
            if (kind, following[0]) == ("offsets", "mask")
            else "rebase"
            if kind in ("offsets", "ref_offsets") and following[0] in ("ref_offsets", "format")
            else "guid"
            if kind == "ref_offsets"
            else "bits"
            if kind == "bits"
            else "join"
            for (kind, _), following in zip(sizes, [*sizes[1:], ("", 0)], strict=True)
        )
        self._template: tuple[bytes, int, int, int, int] | None
        try:
            self._template = self._parse_template()
        except (RuntimeError, struct.error, IndexError) as exc:  # pragma: no cover
            log.warning("Arrow IPC batch assembly is off: %s", exc)
            self._template = None
        self.use_ipc = self._template is not None

    def _parse_template(self) -> tuple[bytes, int, int, int, int]:
        """Metadata of a serialised template batch, and where its numbers are.

        Returns the message prefix (marker, length, flatbuffer) and the positions
        of bodyLength, RecordBatch.length and the FieldNode and Buffer vectors.
        """
        guid = "00000000-0000-0000-0000-000000000000"
        samples: dict[pa.DataType, Any] = {
            pa.bool_(): True,
            pa.binary(): b"\x01",
            pa.float32(): 1.0,
            EVENT_SCHEMA.field(_REFERENCES).type: [{"format": "RAW", "guid": guid, "position": 1}],
        }
        columns = [pa.array([samples.get(f.type, 1)], f.type) for f in EVENT_SCHEMA]
        message = pa.RecordBatch.from_arrays(columns, schema=EVENT_SCHEMA).serialize().to_pybytes()
        marker, meta_size = struct.unpack_from("<Ii", message, 0)
        if marker != 0xFFFFFFFF:  # pragma: no cover
            raise RuntimeError("unexpected IPC message framing")
        meta = message[8 : 8 + meta_size]

        def u32(pos: int) -> int:
            return int(struct.unpack_from("<I", meta, pos)[0])

        def field_at(table: int, index: int) -> int:
            vtable = table - int(struct.unpack_from("<i", meta, table)[0])
            entry = 4 + 2 * index
            vtable_size = int(struct.unpack_from("<H", meta, vtable)[0])
            offset = (
                int(struct.unpack_from("<H", meta, vtable + entry)[0]) if entry < vtable_size else 0
            )
            if not offset:  # pragma: no cover
                raise RuntimeError(f"template IPC metadata lacks field {index}")
            return table + offset

        def vector_at(table: int, index: int) -> tuple[int, int]:
            ref = field_at(table, index)
            start = ref + u32(ref)
            return start + 4, u32(start)

        root = u32(0)
        if meta[field_at(root, 1)] != 3:  # pragma: no cover - Message.header_type == RecordBatch
            raise RuntimeError("template IPC message is not a record batch")
        body_length_at = field_at(root, 3)
        batch_ref = field_at(root, 2)
        batch = batch_ref + u32(batch_ref)
        length_at = field_at(batch, 0)
        nodes_at, node_count = vector_at(batch, 1)
        buffers_at, buffer_count = vector_at(batch, 2)
        if node_count != len(self.nodes) or buffer_count != len(self.buffers):  # pragma: no cover
            raise RuntimeError("template IPC metadata does not match the schema")
        if any((8 + pos) % 8 for pos in (body_length_at, length_at, nodes_at, buffers_at)):
            raise RuntimeError("template IPC metadata is not 8-byte aligned")  # pragma: no cover
        return message[: 8 + meta_size], body_length_at, length_at, nodes_at, buffers_at

    @functools.lru_cache(maxsize=512)  # noqa: B019 - one instance, for the process's life
    def layout(
        self, n: int, total: int, format_bytes: int, widths: tuple[int, ...]
    ) -> tuple[bytes, tuple[bytes, ...], tuple[tuple[int, int], ...], list[bytes]]:
        """IPC metadata, the zero padding after each piece, each buffer's (offset, size),
        and the message's parts with a blank before each padding, for the pieces."""
        sizes = []
        for kind, size in self.piece_sizes:
            if kind == "row":
                sizes.append(n * size)
            elif kind == "bits":
                sizes.append(-(-n // 8))
            elif kind == "offsets":
                sizes.append(4 * (n + 1))
            elif kind == "mask":
                sizes.append(n * widths[size])
            elif kind == "ref_offsets":
                sizes.append(4 * (total + 1))
            elif kind == "format":
                sizes.append(format_bytes)
            else:
                sizes.append(total * size)
        pads = tuple(bytes(-size % 8) for size in sizes)
        starts = []
        body = 0
        for size, pad in zip(sizes, pads, strict=True):
            starts.append(body)
            body += size + len(pad)
        spans = tuple(
            (0, 0) if piece is None else (starts[piece], sizes[piece]) for piece in self.buffers
        )
        if self._template is None:  # pragma: no cover
            return b"", pads, spans, [b"", *itertools.chain(*((b"", pad) for pad in pads))]
        prefix, body_length_at, length_at, nodes_at, buffers_at = self._template
        meta = bytearray(prefix)
        struct.pack_into("<q", meta, 8 + body_length_at, body)
        struct.pack_into("<q", meta, 8 + length_at, n)
        node_values = [v for per_event in self.nodes for v in (n if per_event else total, 0)]
        struct.pack_into(f"<{len(node_values)}q", meta, 8 + nodes_at, *node_values)
        span_values = [v for span in spans for v in span]
        struct.pack_into(f"<{len(span_values)}q", meta, 8 + buffers_at, *span_values)
        parts = [bytes(meta), *itertools.chain(*((b"", pad) for pad in pads))]
        return parts[0], pads, spans, parts

    def assemble(
        self, n: int, total: int, widths: tuple[int, ...], pieces: list[Any]
    ) -> pa.RecordBatch:
        """A RecordBatch from the body pieces (buffer-protocol objects, in piece order)."""
        meta, _, spans, blank = self.layout(n, total, len(pieces[self.format_data]), widths)
        parts = blank.copy()
        parts[1::2] = pieces  # each piece before its padding
        return self._read(pa.py_buffer(b"".join(parts)), len(meta), n, total, spans)

    def _read(
        self, message: pa.Buffer, meta_size: int, n: int, total: int, spans: Any
    ) -> pa.RecordBatch:
        if self.use_ipc:
            return pa.ipc.read_record_batch(message, EVENT_SCHEMA)
        return self._from_buffers(message.slice(meta_size), n, total, spans)

    def assemble_many(self, decoded: Sequence[_Decoded]) -> pa.RecordBatch:
        """One RecordBatch of several messages, which must share mask widths and fit int32
        offsets: one IPC read instead of one per message."""
        widths = decoded[0].widths
        counts = [d.n for d in decoded]
        n, total = sum(counts), sum(d.total for d in decoded)
        pieces: list[list[Any]] = []  # per piece, the buffers to lay end to end
        deferred = decoded[0].references is not None
        if deferred:
            references = [d.references for d in decoded]
            tail = _reference_pieces(references, n)  # type: ignore[arg-type]
        for i, join in enumerate(self.joins):
            if deferred and i >= self.reference_piece:
                pieces.append([tail[i - self.reference_piece]])
            elif join == "join":  # copied once, into the IPC message
                pieces.append([d.pieces[i] for d in decoded])
            elif join == "bits":
                pieces.append([_joined_bits([d.pieces[i] for d in decoded], counts)])
            elif join == "rebase":
                pieces.append([_rebased([d.pieces[i] for d in decoded])])
            elif join == "guid":
                pieces.append([_offsets(GUID_LENGTH, total)])
            else:
                pieces.append([_offsets(widths[join[1]], n)])
        format_bytes = sum(len(piece) for piece in pieces[self.format_data])
        meta, pads, spans, _ = self.layout(n, total, format_bytes, widths)
        parts = [meta]
        for buffers, pad in zip(pieces, pads, strict=True):
            parts += buffers
            parts.append(pad)
        return self._read(pa.py_buffer(b"".join(parts)), len(meta), n, total, spans)

    def _from_buffers(
        self, body: pa.Buffer, n: int, total: int, spans: tuple[tuple[int, int], ...]
    ) -> pa.RecordBatch:
        buffers = iter(
            None if piece is None else body.slice(*span)
            for piece, span in zip(self.buffers, spans, strict=True)
        )
        lengths = iter(n if per_event else total for per_event in self.nodes)

        def build(data_type: pa.DataType) -> pa.Array:
            length = next(lengths)
            if pa.types.is_list(data_type):
                own = [next(buffers), next(buffers)]
                children = [build(data_type.value_type)]
            elif pa.types.is_struct(data_type):
                own = [next(buffers)]
                children = [build(data_type.field(i).type) for i in range(data_type.num_fields)]
            else:
                count = 3 if data_type in (pa.binary(), pa.string()) else 2
                own = [next(buffers) for _ in range(count)]
                children = None
            return pa.Array.from_buffers(data_type, length, own, null_count=0, children=children)

        columns = [build(field.type) for field in EVENT_SCHEMA]
        return pa.RecordBatch.from_arrays(columns, schema=EVENT_SCHEMA)


_ASSEMBLER: Final = _BatchAssembler()
_FORMAT_DATA: Final = _ASSEMBLER.format_data


# --------------------------------------------------------------------------- decode


def decode_events(
    payload: bytes | str, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[MessageHeader, pa.Table]:
    """Validate one message and return its header and its events, as an EVENT_SCHEMA table.

    Raises :class:`MessageError` naming the field, row and reason of the first
    problem found: a message is accepted whole or not at all. Messages over
    ``max_bytes`` are refused unread, and none may decode to more than
    ``MAX_EXPANSION * max_bytes`` bytes of masks (or of references).
    """
    header, (n, total, widths, pieces, *_) = _decode_message(payload, max_bytes)
    return header, pa.Table.from_batches([_ASSEMBLER.assemble(n, total, widths, pieces)])


@dataclass(frozen=True, slots=True)
class DecodedMessages:
    """What :func:`decode_messages` made of a batch of messages.

    ``headers[k]`` is the header of input message ``accepted[k]``; ``table`` holds
    the events of the accepted messages, message after message (``headers[k].count``
    rows each); ``errors`` says why each refused message (by input index) was refused.
    """

    headers: list[MessageHeader]
    accepted: list[int]
    table: pa.Table
    errors: list[tuple[int, MessageError]]


def decode_messages(
    payloads: Iterable[bytes | str], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> DecodedMessages:
    """Validate several messages as :func:`decode_events` does, into one table.

    Each message is checked on its own and accepted whole or refused whole; the
    accepted ones are assembled into Arrow together, which costs a fraction of
    assembling each one: what a consumer that takes messages in batches wants.
    """
    decoded_messages: list[tuple[int, MessageHeader, _Decoded]] = []
    errors: list[tuple[int, MessageError]] = []
    for index, payload in enumerate(payloads):
        try:
            header, decoded = _decode_message(payload, max_bytes, defer=True)
        except MessageError as exc:
            errors.append((index, exc))
        else:
            decoded_messages.append((index, header, decoded))
    # Checks left to bulk passes over every message: the few that a bulk pass flags
    # get the message's own check, which names field, row and reason.
    decoded_only = [decoded for _, _, decoded in decoded_messages]
    flagged = {*_bad_guid_indices(decoded_only), *_unsorted_messages(decoded_only)}
    if flagged:
        for at in sorted(flagged, reverse=True):
            index, _, decoded = decoded_messages[at]
            try:
                _check_references(decoded)
                _check_keys(decoded)
            except MessageError as exc:
                errors.append((index, exc))
                del decoded_messages[at]
        errors.sort(key=lambda error: error[0])
    batches = [_ASSEMBLER.assemble_many(group) for group in _groups(decoded_messages)]
    return DecodedMessages(
        [header for _, header, _ in decoded_messages],
        [index for index, _, _ in decoded_messages],
        pa.Table.from_batches(batches, EVENT_SCHEMA),
        errors,
    )


def _check_references(decoded: _Decoded) -> None:
    if decoded.references is not None:
        decoded.references.check_indices()


def _check_keys(decoded: _Decoded) -> None:
    if not decoded.keys_checked:
        _check_key_pieces(decoded.pieces, one_run=True)


def _groups(decoded_messages: list[tuple[int, MessageHeader, _Decoded]]) -> list[list[_Decoded]]:
    """Runs of messages that one record batch can hold: the same mask widths and
    references layout, and Arrow's int32 offsets within range."""
    groups: list[list[_Decoded]] = []
    group: list[_Decoded] = []
    widths: tuple[int, ...] = ()
    layout: tuple[int, tuple[str, ...]] | None = None
    rows = references = format_bytes = 0
    for _, _, decoded in decoded_messages:
        rows += decoded.n
        references += decoded.total
        formats = _format_bytes(decoded)
        format_bytes += formats
        signature = None if decoded.references is None else decoded.references.signature()
        if (
            not groups
            or decoded.widths != widths
            or signature != layout
            or rows * max(widths, default=1) > MAX_COUNT
            or GUID_LENGTH * references > MAX_COUNT
            or format_bytes > MAX_COUNT
        ):
            group = [decoded]
            groups.append(group)
            widths, layout = decoded.widths, signature
            rows, references, format_bytes = decoded.n, decoded.total, formats
        else:
            group.append(decoded)
    return groups


def _format_bytes(decoded: _Decoded) -> int:
    """The bytes of format names a decoded message adds to a record batch."""
    if decoded.references is None:
        return len(decoded.pieces[_FORMAT_DATA])
    return decoded.n * sum(map(len, decoded.references.slot_formats))


def _decode_message(
    payload: bytes | str, max_bytes: int, *, defer: bool = False
) -> tuple[MessageHeader, _Decoded]:
    """What decode_events checks and decodes, short of building the Arrow table."""
    if type(payload) is str and not payload.isascii():  # isascii() is a flag, not a scan
        size = len(payload.encode("utf-8", "surrogatepass"))
    else:
        size = len(payload)
    if size > max_bytes:
        raise MessageError(f"message is {size} bytes, over the limit of {max_bytes}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if type(doc) is not dict:
        raise MessageError(f"expected a JSON object, got {_describe(doc)}")
    keys = doc.keys()
    if keys not in (_TOP_KEYS, _TOP_KEYS_PACKED):
        if "v" not in doc:
            raise MessageError("missing format version", field="v")
        missing = [key for key in ("h", "c") if key not in doc]
        if missing:
            raise MessageError("missing", field=missing[0])
        raise MessageError("unknown key", field=sorted(keys - _TOP_KEYS_PACKED)[0])
    header = _decode_header(doc["v"], doc["h"])
    columns = doc["c"]
    if type(columns) is not dict:
        raise MessageError(f"expected an object, got {_describe(columns)}", field="c")
    if columns.keys() != _COLUMN_KEYS:
        missing = [name for name in EVENT_SCHEMA.names if name not in columns]
        if missing:
            raise MessageError("missing column", field=missing[0])
        raise MessageError("unknown column", field=sorted(columns.keys() - _COLUMN_KEYS)[0])
    n = header.count
    if n > size:  # every event takes at least a digit and a comma of event_number
        raise MessageError(
            f"count {n} is more events than a {size}-byte message can hold", field="header.count"
        )
    if header.version < 2 and "z" in doc:
        raise MessageError("unknown key", field="z")
    limit = MAX_EXPANSION * max_bytes
    return header, _decode_columns(columns, n, header.version, doc.get("z"), limit, defer)


def _decode_columns(
    columns: dict[str, Any], n: int, version: int, block: object, limit: int, defer: bool
) -> _Decoded:
    """Every column's Arrow buffers, checked, as the body pieces of a record batch.

    One pass in schema order over the columns, the common encodings inline, so
    that a message costs few Python steps besides the conversions themselves.
    """
    pieces: list[Any] = []
    checked: tuple[list[list[Any]], list[_Place]] = ([], [])  # for the JSON boolean test
    packed = _Packed()
    requests = packed.requests  # (target, key, size): _Packed.add, inline
    widths = []
    mask_bytes = 0
    floats = []
    v2 = version > 1
    constants = _CONSTANTS
    for name, kind, code, high, size in _LAYOUT:
        spec = columns[name]
        if kind == _MASK:
            if type(spec) is not dict or not 2 <= len(spec) <= 3 or "w" not in spec:
                raise _mask_key_error(name, spec, version)
            width = spec["w"]
            if type(width) is not int or width < 0:
                raise MessageError(
                    f"mask width: expected bytes >= 0, got {_describe(width)}", field=name
                )
            mask_bytes += n * width
            # before anything is allocated: constant, dictionary and compressed
            # masks can claim any size in a few bytes
            if mask_bytes > limit or n * width > MAX_COUNT:
                raise MessageError(
                    f"{n} masks of {width} bytes take the masks of this message over the "
                    f"decoding limit of {min(limit, MAX_COUNT)} bytes",
                    field=name,
                )
            widths.append(width)
            pieces.append(_fixed_offsets(width, n))
            if len(spec) == 2 and "z" in spec and v2:
                if spec["z"] != "zstd":
                    raise _marker_error(_COLUMN_PLACES[name], spec["z"])
                requests.append((pieces, len(pieces), n * width))
                pieces.append(None)
            elif len(spec) == 2 and "b64" in spec:
                data = _b64(spec["b64"])
                if data is None or len(data) != width * n:
                    raise _mask_error(name, spec, n)
                pieces.append(data)
            elif len(spec) == 2 and "k" in spec and v2:
                data = _b64(spec["k"])
                if data is None:
                    raise _base64_error("constant mask", spec["k"], name)
                if len(data) != width:
                    raise MessageError(
                        f"constant mask is {len(data)} bytes, not width {width}", field=name
                    )
                pieces.append(_tiled(data, n) if width * n <= 1 << 16 else data * n)
            elif len(spec) == 3 and "u" in spec and "i" in spec and v2:
                pieces.append(_dictionary_masks(spec, name, width, n, version, checked))
            else:
                raise _mask_key_error(name, spec, version)
            continue
        if type(spec) is dict and len(spec) == 1 and v2:
            if "k" in spec:
                value = spec["k"]
                if kind == _INT and type(value) is int and 0 <= value <= high:
                    data = constants.get((code, value, n))
                    pieces.append(_constant(code, value, n) if data is None else data)
                elif kind == _BOOL and type(value) is int and value in (0, 1):
                    pieces.append(_bits(value, n))
                elif kind == _FLOAT and _float_problem(value) is None:
                    pieces.append(_repeated("f", value, n))
                else:
                    raise _constant_error(name, kind, value, high)
                continue
            if "z" in spec and kind != _BOOL:
                if spec["z"] != "zstd":
                    raise _marker_error(_COLUMN_PLACES[name], spec["z"])
                requests.append((pieces, len(pieces), n * size))
                pieces.append(None)
                if kind == _FLOAT:
                    floats.append(name)
                continue
        if kind == _INT:
            if type(spec) is list and len(spec) == n:  # inline: the plain array
                items = array(code)
                try:
                    items.fromlist(spec)
                except (TypeError, OverflowError):
                    raise _scan_integers(_COLUMN_PLACES[name], spec, high) from None
                checked[0].append(spec)
                checked[1].append(_COLUMN_PLACES[name])
                pieces.append(items)
            else:
                place = _COLUMN_PLACES[name]
                pieces.append(_int_array(spec, n, code, high, place, version, checked))
        elif kind == _BOOL:
            pieces.append(_decode_bools(spec, n, version, name, checked))
        else:
            pieces.append(_decode_floats(spec, n, version, name, checked))

    references = _References(columns[_REFERENCES], n, version, limit, checked, packed)
    packed.unpack(block, limit)
    for name in floats:
        values = np.frombuffer(pieces[_PIECE[name]], dtype=np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            row = int(np.argmin(finite))
            raise _COLUMN_PLACES[name].error(f"not a finite number: {float(values[row])}", row)

    # array() takes JSON true/false for 1/0. Written back out, numbers never
    # contain "t" or "f", so one dump of every JSON number array finds them.
    if checked[0]:
        dumped = orjson.dumps(checked[0])
        if b"t" in dumped or b"f" in dumped:
            raise _find_json_boolean(*checked)
    keys_checked = n < 2 or _check_unique_keys(columns, pieces, n, defer)
    if defer and references.signature() is not None:  # GUID indices: see _bad_guid_indices
        return _Decoded(n, references.total, tuple(widths), pieces, keys_checked, references)
    pieces += references.buffers()
    return _Decoded(n, references.total, tuple(widths), pieces, keys_checked)


def _constant_error(name: str, kind: int, value: object, high: int) -> MessageError:
    if kind == _INT:
        problem = _integer_problem(value, high) or f"expected an integer, got {_describe(value)}"
    elif kind == _BOOL:
        problem = f"expected 0 or 1, got {_describe(value)}"
    else:
        problem = _float_problem(value) or f"expected a number, got {_describe(value)}"
    return _COLUMN_PLACES[name].error(f"constant: {problem}")


def _check_unique_keys(
    columns: dict[str, Any], pieces: list[Any], n: int, defer: bool = False
) -> bool:
    """No two events of a message may share (run_number, event_number).

    With ``defer``, a message of one run whose keys need numpy to check is left
    to the caller (False is returned), to be checked with other messages in bulk
    by :func:`_unsorted_messages` and, if its events do not increase, by
    :func:`_check_key_pieces`.
    """
    run_spec, event_spec = columns[EVENT_KEY[0]], columns[EVENT_KEY[1]]
    if type(run_spec) is list:
        one_run = run_spec.count(run_spec[0]) == n
    elif "d" in run_spec:
        one_run = not any(run_spec["d"][1:])
    elif "r" in run_spec:
        one_run = len(run_spec["r"]) == 2
    else:  # {"k": run} or {"z": ...}
        one_run = "k" in run_spec
    if one_run:
        if type(event_spec) is list:
            if len(set(event_spec)) == n:
                return True
        elif "d" in event_spec and min(event_spec["d"][1:]) > 0:  # strictly increasing
            return True
        if defer:
            return False
    _check_key_pieces(pieces, one_run)
    return True


def _check_key_pieces(pieces: list[Any], one_run: bool) -> None:
    """_check_unique_keys on the decoded key columns."""
    events = np.frombuffer(pieces[_PIECE[EVENT_KEY[1]]], dtype=np.uint64)
    if one_run and bool((events[1:] > events[:-1]).all()):  # increasing, as written
        return
    runs = np.frombuffer(pieces[_PIECE[EVENT_KEY[0]]], dtype=np.uint32)
    if one_run:
        ordered = np.sort(events)
        duplicate = bool((ordered[1:] == ordered[:-1]).any())
    else:
        order = np.lexsort((events, runs))
        run, event = runs[order], events[order]
        duplicate = bool(((run[1:] == run[:-1]) & (event[1:] == event[:-1])).any())
    if duplicate:
        raise _find_duplicate_key(runs.tolist(), events.tolist())


def _bad_guid_indices(decoded: Sequence[_Decoded]) -> list[int]:
    """Which of the messages whose references were left for assembly have a GUID index
    beyond their table: one numpy pass over all of them instead of one per slot."""
    buffers, limits, sizes, owners = [], [], [], []
    for i, message in enumerate(decoded):
        references = message.references
        if references is None:
            continue
        for k, index in enumerate(references.guid_index):
            if type(index) is not int and references.sizes[k]:  # constants are checked as read
                buffers.append(array("I", index) if type(index) is list else index)
                limits.append(len(references.guids))
                sizes.append(references.sizes[k])
                owners.append(i)
    if not buffers:
        return []
    numbers = np.frombuffer(b"".join(buffers), np.uint32)
    beyond = np.flatnonzero(numbers >= np.repeat(np.array(limits, np.uint32), sizes))
    ends = np.cumsum(sizes)
    return sorted({owners[at] for at in np.searchsorted(ends, beyond, side="right").tolist()})


def _unsorted_messages(decoded: Sequence[_Decoded]) -> list[int]:
    """Which of the messages whose keys were left unchecked have events that do not
    strictly increase: one numpy pass over all of them instead of one per message."""
    pending = [i for i, d in enumerate(decoded) if not d.keys_checked]
    if not pending:
        return []
    piece = _PIECE[EVENT_KEY[1]]
    joined = np.frombuffer(b"".join([decoded[i].pieces[piece] for i in pending]), np.uint64)
    ends = np.cumsum([decoded[i].n for i in pending])
    not_increasing = joined[1:] <= joined[:-1]
    not_increasing[ends[:-1] - 1] = False  # the last event of one message, the first of the next
    at = np.flatnonzero(not_increasing)
    return sorted({pending[i] for i in np.searchsorted(ends, at, side="right").tolist()})


def _decode_bools(
    spec: Any, n: int, version: int, name: str, checked: tuple[list[list[Any]], list[_Place]]
) -> Any:
    place = _COLUMN_PLACES[name]
    if type(spec) is list:
        if len(spec) != n:
            raise _shape_error(place, spec, n)
        block = array("B")
        try:
            block.fromlist(spec)
        except (TypeError, OverflowError):
            raise _scan_booleans(place, spec) from None
        raw = block.tobytes()
        if raw.translate(None, b"\x00\x01"):
            raise _scan_booleans(place, spec)
        checked[0].append(spec)
        checked[1].append(place)
        return np.packbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if type(spec) is dict and version >= 2 and spec.keys() == {"k"}:
        value = spec["k"]
        if type(value) is not int or value not in (0, 1):
            raise place.error(f"constant: expected 0 or 1, got {_describe(value)}")
        return _bits(value, n)
    raise _encoding_error(place, spec, version, '{"k": 0} or {"k": 1}')


def _decode_floats(
    spec: Any, n: int, version: int, name: str, checked: tuple[list[list[Any]], list[_Place]]
) -> Any:
    place = _COLUMN_PLACES[name]
    if type(spec) is list:
        if len(spec) != n:
            raise _shape_error(place, spec, n)
        block = array("f")
        try:
            block.fromlist(spec)
        except (TypeError, OverflowError):
            raise _scan_floats(place, spec) from None
        # float32 overflow is the only range problem of a float column; max/min of
        # the Python numbers is cheaper than a numpy round trip
        if n and (max(spec) >= _F32_OVERFLOW or min(spec) <= -_F32_OVERFLOW):
            raise _scan_floats(place, spec)
        checked[0].append(spec)
        checked[1].append(place)
        return block
    if type(spec) is dict and version >= 2 and spec.keys() == {"k"}:
        value = spec["k"]
        problem = _float_problem(value)
        if problem is not None:
            raise place.error(f"constant: {problem}")
        return _repeated("f", value, n)
    raise _encoding_error(place, spec, version, '{"k": value}')


def _mask_key_error(name: str, spec: Any, version: int) -> MessageError:
    if version < 2 or type(spec) is not dict or "b64" in spec:
        return _key_error("trigger mask", spec, _PLAIN_MASK_KEYS, name)
    if spec.keys() in _MASK_ENCODINGS:  # the right keys: then the value of z is wrong
        return _marker_error(_COLUMN_PLACES[name], spec["z"])
    keys = spec.keys()
    if "w" not in keys:
        return MessageError("trigger mask: missing key 'w'", field=name)
    return MessageError(
        f"trigger mask: expected the keys w and b64, k, u and i, or z; got {sorted(keys)}",
        field=name,
    )


def _mask_error(name: str, spec: Any, n: int) -> MessageError:
    """What is wrong with a plain trigger mask column the bulk checks refused."""
    width, text = spec["w"], spec["b64"]
    if type(text) is not str:
        return MessageError(f"mask data: expected base64 text, got {_describe(text)}", field=name)
    try:
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        return MessageError(f"mask data: bad base64: {exc}", field=name)
    if _b64(text) is None:
        return _base64_error("mask data", text, name)
    return MessageError(
        f"mask data is {len(data)} bytes, not width {width} x {n} events = {width * n}",
        field=name,
    )


def _base64_error(what: str, text: object, field: str) -> MessageError:
    if type(text) is not str:
        return MessageError(f"{what}: expected base64 text, got {_describe(text)}", field=field)
    try:
        binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        return MessageError(f"{what}: bad base64: {exc}", field=field)
    return MessageError(f"{what}: bad base64: padding after a whole group", field=field)


def _zstd_content_size(frame: bytes) -> int | None:
    """The content size a zstd frame header declares, if it declares one (for error messages)."""
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = frame[4]
    size_flag, single = descriptor >> 6, (descriptor >> 5) & 1
    at = 5 + (not single) + (0, 1, 2, 4)[descriptor & 3]
    field_size = (1 if single else 0, 2, 4, 8)[size_flag]
    if not field_size or len(frame) < at + field_size:
        return None
    size = int.from_bytes(frame[at : at + field_size], "little")
    return size + 256 if field_size == 2 else size


def _unpack_block(packed: object, expected: int) -> bytes:
    """The decompressed ``z`` block, exactly ``expected`` bytes, or MessageError."""
    data = _b64(packed)
    if data is None:
        raise _base64_error("compressed block", packed, "z")
    if _ZSTD is None:
        raise MessageError("compressed block: zstd is not available here", field="z")
    try:
        return _ZSTD.decompress(data, expected)
    except zstandard.ZstdError as exc:
        declared = _zstd_content_size(data)
        if declared is not None and declared != expected:
            reason = f"decompresses to {declared} bytes, not the {expected} of its arrays"
        else:
            reason = f"not a zstd frame of {expected} bytes: {exc}"
        raise MessageError(f"compressed block: {reason}", field="z") from None


def _dictionary_masks(
    spec: dict[str, Any],
    name: str,
    width: int,
    n: int,
    version: int,
    checked: tuple[list[list[Any]], list[_Place]],
) -> bytes:
    table = _b64(spec["u"])
    if table is None:
        raise _base64_error("mask dictionary", spec["u"], name)
    if not width or len(table) % width:
        raise MessageError(
            f"mask dictionary is {len(table)} bytes, not a whole number of {width}-byte masks",
            field=name,
        )
    entries = len(table) // width
    place = _Place(name, "mask index: ")
    indices = np.frombuffer(
        _int_array(spec["i"], n, "I", 2**32 - 1, place, version, checked), dtype=np.uint32
    )
    if n and int(indices.max()) >= entries:
        row = int(np.argmax(indices >= entries))
        raise place.error(
            f"{int(indices[row])} out of range (the dictionary has {entries} masks)", row
        )
    return np.frombuffer(table, dtype=np.uint8).reshape(entries, width)[indices].tobytes()


# --------------------------------------------------------------------------- encode

_NUMPY: Final = orjson.OPT_SERIALIZE_NUMPY


def _conform(table: pa.Table) -> pa.Table:
    """The table with exactly EVENT_SCHEMA, or ValidationError saying what differs."""
    if not table.schema.equals(EVENT_SCHEMA):
        if sorted(table.column_names) != sorted(EVENT_SCHEMA.names):
            missing = sorted(set(EVENT_SCHEMA.names) - set(table.column_names))
            unknown = sorted(set(table.column_names) - set(EVENT_SCHEMA.names))
            raise ValidationError(
                f"table columns differ from the event schema: missing {missing}, unknown {unknown}"
            )
        try:
            table = table.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
            raise ValidationError(f"table does not fit the event schema: {exc}") from exc
    for name, column in zip(table.column_names, table.columns, strict=True):
        if column.null_count:
            raise ValidationError(f"column {name!r} has {column.null_count} nulls")
    for chunk in table.column(_REFERENCES).chunks:
        flat = chunk.flatten()
        if flat.null_count or any(flat.field(i).null_count for i in range(flat.type.num_fields)):
            raise ValidationError("column 'references' holds null references")
    return table


def _padded_masks(column: pa.ChunkedArray) -> npt.NDArray[np.uint8]:
    """Masks as an (events, width) byte matrix; zero bytes, which set no bits, pad short ones."""
    array_ = column.combine_chunks()
    n = len(array_)
    if n == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    buffers = array_.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=n + 1, offset=4 * array_.offset)
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None
        else np.zeros(0, np.uint8)
    )
    data = data[offsets[0] : offsets[-1]]
    lengths = np.diff(offsets)
    width = int(lengths.max())
    if (lengths == width).all():
        return data.reshape(n, width)
    padded = np.zeros((n, width), dtype=np.uint8)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(data)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    padded[rows, cols] = data
    return padded


@functools.lru_cache(maxsize=64)
def _word_weights(words: int) -> npt.NDArray[np.uint64]:
    """Fixed odd pseudo-random multipliers, one per 8-byte word of a mask."""
    return np.random.default_rng(words).integers(0, 2**63, words, dtype=np.uint64) | np.uint64(1)


def _row_sums(rows: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
    """One number per mask, equal for equal masks (wrapping weighted sums of its words)."""
    width = rows.shape[1]
    if width % 8:
        return np.ascontiguousarray(rows).view(np.dtype((np.void, width))).ravel()
    words = np.ascontiguousarray(rows).view(np.uint64)
    sums: npt.NDArray[np.uint64] = (words * _word_weights(width // 8)).sum(axis=1, dtype=np.uint64)
    return sums


def _b64_text(data: bytes) -> str:
    return pybase64.b64encode(data).decode("ascii")


def _b64_size(size: int) -> int:
    return -(-size // 3) * 4


# A delta array must save this many characters per row over the plain one: summing
# it costs more than converting plain numbers.
_DELTA_SAVING: Final = 2
# Stands for "this array goes into the compressed block".
_PACK: Final = {"z": "zstd"}


def _number_spec(values: npt.NDArray[Any], *, pack: bool, delta: bool = True) -> Any:
    """The best encoding of a number array: constant, packed, runs, delta or plain.

    A constant is the smallest and the cheapest to decode; every other array
    goes into the compressed block when there is one: smaller than any JSON
    spelling (runs included, once compressed), and decoded without a Python
    step per value or per run. Without the block, runs or a delta array are
    used where they are clearly smaller than the plain array.
    """
    n = len(values)
    if n < 2:
        return values
    first = values[0]
    differs = values[1:] != values[:-1]
    change_count = int(np.count_nonzero(differs))
    if not change_count:
        return {"k": first if values.dtype.kind == "f" else first.item()}
    if pack:
        return _PACK
    # runs and deltas are for integers (booleans are held as uint8, floats are floats)
    integers = values.dtype.kind == "u" and values.dtype.itemsize > 1
    runs = None
    if integers and 4 * change_count < n:  # few runs
        changes = np.flatnonzero(differs)
        starts = np.concatenate(([0], changes + 1))
        pairs = np.empty(2 * len(starts), dtype=np.uint64)
        pairs[0::2], pairs[1::2] = values[starts], np.diff(np.append(starts, n))
        runs = b'{"r":%s}' % orjson.dumps(pairs, option=_NUMPY)
    plain = orjson.dumps(values, option=_NUMPY)
    best: Any = orjson.Fragment(plain)
    size = len(plain)
    if runs is not None and len(runs) < size:
        best, size = orjson.Fragment(runs), len(runs)
    if delta and n > 2 and integers:
        if values.dtype == np.uint64:
            steps = (values[1:] - values[:-1]).view(np.int64)  # wraps: exact when signs agree
            exact = bool(((values[1:] >= values[:-1]) == (steps >= 0)).all())
        else:
            steps = np.diff(values.astype(np.int64))
            exact = True
        if exact:
            encoded = b'{"d":[%d,%s}' % (int(first), orjson.dumps(steps, option=_NUMPY)[1:])
            if len(encoded) + _DELTA_SAVING * n <= min(size, len(plain)):
                best = orjson.Fragment(encoded)
    return best


def _renumbered(
    indices: npt.NDArray[Any], table_size: int
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.intp]]:
    """Indices into the used entries of a table (in table order), and those entries."""
    if table_size > 4 * len(indices) + 64:  # a big table: sorting the few indices is cheaper
        used, local = np.unique(indices, return_inverse=True)
        return local.ravel().astype(np.uint32), used
    present = np.zeros(table_size, dtype=bool)
    present[indices] = True
    number = np.cumsum(present, dtype=np.uint32) - np.uint32(1)
    return number[indices], np.flatnonzero(present)


def _little_endian(values: npt.NDArray[Any]) -> bytes:
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


class _EventColumns:
    """A table's columns as numpy arrays, checked once and then cut into messages."""

    def __init__(self, table: pa.Table) -> None:
        table = _conform(table)
        self.rows = table.num_rows
        self.numbers: dict[str, npt.NDArray[Any]] = {}
        for field in EVENT_SCHEMA:
            if field.name not in _NUMBER_COLUMNS:
                continue
            values = table.column(field.name).to_numpy()
            if field.type == pa.bool_():
                values = values.astype(np.uint8)  # written as 0/1
            elif field.type == pa.float32() and not np.isfinite(values).all():
                row = int(np.argmin(np.isfinite(values)))
                raise ValidationError(f"column {field.name!r}, row {row}: not a finite number")
            self.numbers[field.name] = values
        self.masks = {name: _padded_masks(table.column(name)) for name in _MASK_COLUMNS}

        references = table.column(_REFERENCES).combine_chunks()
        offsets = references.offsets.to_numpy().astype(np.int64)
        self.ref_starts = offsets - offsets[0]
        self.ref_counts = np.diff(offsets)
        flat = references.flatten()
        guids = pc.dictionary_encode(flat.field("guid"))
        formats = pc.dictionary_encode(flat.field("format"))
        self.guid_table: list[str] = guids.dictionary.to_pylist()
        self.format_table: list[str] = formats.dictionary.to_pylist()
        for guid in self.guid_table:
            if _GUID_RE.fullmatch(guid) is None:
                raise ValidationError(f"column 'references': not a canonical GUID: {guid!r}")
        for name in self.format_table:
            if _FORMAT_RE.fullmatch(name) is None:
                raise ValidationError(f"column 'references': invalid format {name!r}")
        self.guid_index = guids.indices.to_numpy()
        self.format_index = formats.indices.to_numpy()
        self.positions = flat.field("position").to_numpy()

    def encode(self, start: int, stop: int, header: MessageHeader) -> bytes:
        """Rows ``start:stop`` as one message with ``header``, in the layout of its version."""
        if header.count != stop - start:
            raise ValidationError(
                f"header count {header.count} but the message has {stop - start} rows"
            )
        if header.version < 2:
            return self._encode_plain(start, stop, header)
        n = stop - start
        # A handful of rows is smaller in plain JSON than with a compressed block.
        pack = _ZSTD is not None and n > 2
        parts: list[bytes] = []  # the compressed block's arrays, in message order
        masks, mask_bytes = self._masks(start, stop, pack)
        columns: dict[str, Any] = {}
        for name in _PLAIN_NAMES:
            if name in masks:
                spec = masks[name]
                if type(spec) is np.ndarray:
                    parts.append(spec.tobytes())
                    spec = {"w": spec.shape[1], "z": "zstd"}
            else:
                part = self.numbers[name][start:stop]
                spec = _number_spec(part, pack=pack and part.dtype != np.uint8)
                if spec is _PACK:
                    parts.append(_little_endian(part))
            columns[name] = spec
        columns[_REFERENCES], total = self._references(start, stop, parts if pack else None)
        document = {"v": header.version, "h": header.wire_fields(), "c": columns}
        if parts:
            assert _ZSTD is not None
            document["z"] = _b64_text(_ZSTD.compress(b"".join(parts)))
        payload = orjson.dumps(document, option=_NUMPY)
        # Keep every message within what any consumer with the default max_bytes decodes.
        ceiling = MAX_EXPANSION * max(len(payload), DEFAULT_MAX_MESSAGE_BYTES)
        if mask_bytes > ceiling or total * _REFERENCE_BYTES > ceiling:  # pragma: no cover
            return self._encode_plain(start, stop, header)
        return payload

    def _encode_plain(self, start: int, stop: int, header: MessageHeader) -> bytes:
        """The version 1 layout: plain arrays and base64 masks only."""
        columns: dict[str, Any] = {name: v[start:stop] for name, v in self.numbers.items()}
        for name, matrix in self.masks.items():
            rows = matrix[start:stop]
            columns[name] = {"w": rows.shape[1], "b64": _b64_text(rows.tobytes())}
        columns[_REFERENCES], _ = self._references(start, stop, None, plain=True)
        document = {"v": header.version, "h": header.wire_fields(), "c": columns}
        return orjson.dumps(document, option=_NUMPY)

    def _masks(self, start: int, stop: int, pack: bool) -> tuple[dict[str, Any], int]:
        """Mask column specs (the row matrix itself for a packed one), and their decoded bytes."""
        n = stop - start
        specs: dict[str, Any] = {}
        pending: dict[str, npt.NDArray[np.uint8]] = {}
        decoded = 0
        for name, matrix in self.masks.items():
            rows = matrix[start:stop]
            width = rows.shape[1]
            decoded += rows.size
            if n > 1 and width and (rows == rows[0]).all():
                specs[name] = {"w": width, "k": _b64_text(rows[0].tobytes())}
            elif n > 2 and width:
                pending[name] = rows
            else:
                specs[name] = {"w": width, "b64": _b64_text(rows.tobytes())}

        # Without the compressed block, a table of few distinct masks and an index per
        # row where that is smaller. With it, repeated masks cost a few bytes each in
        # the block anyway, and trying both would cost a compression per column.
        dictionaries = {}
        for name, rows in {} if pack else pending.items():
            # Equal rows have equal weighted sums, so more distinct sums than n / 4 rules
            # a dictionary out cheaply; only then are the rows sorted.
            if 4 * len(set(_row_sums(rows).tolist())) > n:
                continue
            keyed = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()
            if 4 * len(set(keyed.tolist())) <= n:
                _, first, index = np.unique(keyed, return_index=True, return_inverse=True)
                spec = {
                    "w": rows.shape[1],
                    "u": _b64_text(rows[first].tobytes()),
                    "i": _number_spec(index.ravel().astype(np.uint32), pack=False, delta=False),
                }
                dictionaries[name] = (len(orjson.dumps(spec, option=_NUMPY)), spec)

        zipped = list(pending)
        for name, (dictionary_size, spec) in dictionaries.items():
            if dictionary_size < _b64_size(pending[name].size):
                specs[name] = spec
                zipped.remove(name)
        for name in zipped:
            rows = pending[name]
            specs[name] = rows if pack else {"w": rows.shape[1], "b64": _b64_text(rows.tobytes())}
        return specs, decoded

    def _references(
        self, start: int, stop: int, parts: list[bytes] | None, *, plain: bool = False
    ) -> tuple[dict[str, Any], int]:
        """The references spec and their number; packed arrays go to ``parts``, if given."""
        counts = self.ref_counts[start:stop]
        if not len(counts):
            return {"n": 0, "g": [], "s": []}, 0
        first, last = self.ref_starts[start], self.ref_starts[stop]
        guid_index, used = _renumbered(self.guid_index[first:last], len(self.guid_table))
        format_index = self.format_index[first:last]
        positions = self.positions[first:last]
        depth = int(counts.max())
        uniform = bool((counts == depth).all())
        slot_starts = self.ref_starts[start:stop] - first
        slots = []
        for k in range(depth):
            take = slot_starts + k if uniform else slot_starts[counts > k] + k
            formats = format_index[take]
            slot: dict[str, Any] = {
                "f": self.format_table[formats[0]]
                if (formats == formats[0]).all()
                else list(map(self.format_table.__getitem__, formats.tolist()))
            }
            for key, values, delta in (
                ("g", guid_index[take], False),
                ("p", positions[take], True),
            ):
                spec = (
                    values if plain else _number_spec(values, pack=parts is not None, delta=delta)
                )
                if spec is _PACK:
                    assert parts is not None
                    parts.append(_little_endian(values))
                slot[key] = spec
            slots.append(slot)
        spec = {
            "n": depth if uniform else counts.astype(np.uint32),
            "g": [self.guid_table[i] for i in used.tolist()],
            "s": slots,
        }
        return spec, last - first


def encode_events(table: pa.Table, header: MessageHeader) -> bytes:
    """Encode an EVENT_SCHEMA table as one message; ``header.count`` must equal its rows.

    The layout follows ``header.version``: 2 (the default) picks the smallest
    encoding of every column, 1 writes the plain layout of version 1. Raises
    ValidationError when the table does not fit the event schema or holds what
    the format cannot carry (nulls, non-finite weights, malformed GUIDs).
    """
    columns = _EventColumns(table)
    return columns.encode(0, columns.rows, header)


def encode_message_batches(
    table: pa.Table, header_template: MessageHeader, target_bytes: int
) -> Iterator[tuple[MessageHeader, bytes]]:
    """Split a table, in row order, into messages of at most about ``target_bytes`` each.

    Message ``i`` gets the id ``f"{header_template.message_id}:{i}"`` and its own
    count; the rest of the header is the template's. Rows per message follow the
    bytes per row of the messages encoded so far; a message that comes out too
    large is encoded again with fewer rows, so only a single row bigger than the
    target makes a bigger message. An empty table gives one empty message, so
    that every output file is announced.
    """
    columns = _EventColumns(table)
    n = columns.rows

    def encode(start: int, rows: int, sequence: int) -> tuple[MessageHeader, bytes]:
        header = dataclasses.replace(
            header_template, message_id=f"{header_template.message_id}:{sequence}", count=rows
        )
        return header, columns.encode(start, start + rows, header)

    if n == 0:
        yield encode(0, 0, 0)
        return
    overhead = len(encode(0, 0, 0)[1])
    probe = min(n, 64)
    per_row = max((len(encode(0, probe, 0)[1]) - overhead) / probe, 1.0)
    start = 0
    sequence = 0
    while start < n:
        header, payload = _fit(
            encode,
            start,
            sequence,
            remaining=n - start,
            per_row=per_row,
            target_bytes=target_bytes,
            overhead=overhead,
        )
        per_row = max((len(payload) - overhead) / header.count, 1.0)
        yield header, payload
        start += header.count
        sequence += 1


# A message at least this full of its target is kept; guesses aim at _AIM of it.
# Fitting each message to 98% took several encodes a message; aiming at 97.5% from
# the previous message's bytes per row fits ~9 in 10 at the first encode.
_FULL, _AIM = 0.90, 0.975


def _fit(
    encode: Callable[[int, int, int], tuple[MessageHeader, bytes]],
    start: int,
    sequence: int,
    *,
    remaining: int,
    per_row: float,
    target_bytes: int,
    overhead: int,
) -> tuple[MessageHeader, bytes]:
    """A message from ``start`` on that fits ``target_bytes`` and fills at least _FULL of it.

    Guesses rows from bytes per row (usually right the first time), and keeps
    the rows known to fit and the rows known not to fit as a bracket, bisecting
    after a few guesses, so that it always ends. A fuller message spreads the
    fixed cost of decoding one over more events.
    """
    room = max(target_bytes - overhead, 1)
    fits, too_many = 0, remaining + 1
    best: tuple[MessageHeader, bytes] | None = None
    # Aim a little under the target: an oversized message costs a second encode.
    rows = max(1, min(remaining, int(room * _AIM / per_row)))
    for attempt in itertools.count():
        header, payload = encode(start, rows, sequence)
        size = len(payload)
        if size <= target_bytes or rows == 1:  # a single oversized row goes alone
            best, fits = (header, payload), rows
            if size >= _FULL * target_bytes or rows == too_many - 1 or size > target_bytes:
                break
        else:
            too_many = rows
        if attempt < 4:
            guess = int(rows * room * _AIM / max(size - overhead, 1))
        else:
            guess = (fits + too_many) // 2
        rows = min(max(guess, fits + 1), too_many - 1)
        if rows <= fits:
            break
    assert best is not None  # rows == 1 always fits
    return best


def _self_check() -> None:
    """Decode a small message both ways; if the IPC shortcut disagrees, build arrays instead.

    The shortcut leans on details of Arrow's IPC reader (alignment, metadata
    layout), so a pyarrow that differs costs speed, never correctness.
    """
    if not _ASSEMBLER.use_ipc:  # pragma: no cover
        return
    guid = "0A66C3F2-56B6-E511-8B7B-02163E011F0E"
    columns: dict[str, Any] = {name: [0, 1, 1] for name in _NUMBER_COLUMNS}
    columns["event_number"] = {"d": [2**64 - 3, 1, 1]}
    columns["run_number"] = {"k": 7}
    columns["mc_event_weight"] = {"k": 0.5}
    columns["is_testbeam"] = {"k": 1}
    columns |= {name: {"w": 3, "b64": "AQIDBAUGBwgJ"} for name in _MASK_COLUMNS}
    columns[_MASK_COLUMNS[0]] = {"w": 2, "k": "AQI="}
    columns[_REFERENCES] = {
        "n": [2, 0, 1],
        "g": [guid],
        "s": [
            {"f": ["RAW", "AOD"], "g": {"k": 0}, "p": {"d": [5, 2**31 - 1]}},
            {"f": "ESD", "g": [0], "p": [1]},
        ],
    }
    header = {
        "producer": "codec", "message_id": "self-check", "dataset": "self-check",
        "collection": "self-check", "guid": guid, "task_id": "0", "job_id": "0", "count": 3,
    }  # fmt: skip
    document = {"v": FORMAT_VERSION, "h": header, "c": columns}
    if _ZSTD is not None:  # packed arrays are memoryviews into the block: check them too
        columns["bcid"] = columns["mc_event_weight"] = _PACK
        columns[_MASK_COLUMNS[1]] = {"w": 2, "z": "zstd"}
        block = array("H", [1, 2, 3]).tobytes() + array("f", [1, 2, 3]).tobytes() + b"abcdef"
        document["z"] = _b64_text(_ZSTD.compress(block))
    payload = orjson.dumps(document)
    try:
        _, fast = decode_events(payload)
        fast.validate(full=True)
        _ASSEMBLER.use_ipc = False
        _, slow = decode_events(payload)
        ok = fast.equals(slow)
    except (pa.ArrowException, MessageError, ValueError) as exc:  # pragma: no cover
        log.warning("Arrow IPC batch assembly failed its self-check: %s", exc)
        ok = False
    _ASSEMBLER.use_ipc = ok


_self_check()
