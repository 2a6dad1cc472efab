"""The producer → consumer wire format: versioned, columnar JSON messages of event records.

A message is one JSON object with three keys::

    {"v": 1,
     "h": {"producer": "node17.cern.ch", "message_id": "t7562.j42:0",
           "dataset": "data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521",
           "collection": "data15_13TeV.physics_Main",
           "guid": "F2B1A5B0-1F57-E511-9E3E-02163E0133C9",
           "task_id": "7562", "job_id": "42", "count": 2, "sent_at": 1716900000.25},
     "c": {"run_number": [284484, 284484], "event_number": [4294967312, 10045],
           "lumi_block": [112, 112], "timestamp": [1444700000, 1444700001],
           "timestamp_ns": [120000, 5000], "bcid": [11, 1187], "lvl1_id": [7, 8],
           "is_simulation": [0, 0], "is_calibration": [0, 0], "is_testbeam": [0, 0],
           "mc_channel_number": [0, 0], "mc_event_weight": [1.0, 1.0],
           "l1_tbp": {"w": 1, "b64": "BIA="}, "l1_tap": {"w": 1, "b64": "BIA="},
           "l1_tav": {"w": 1, "b64": "BAA="}, "hlt_passed": {"w": 0, "b64": ""},
           "smk": [2160, 2160], "l1psk": [3, 3], "hltpsk": [5, 5],
           "references": {"n": 2,
                          "g": ["0A66C3F2-56B6-E511-8B7B-02163E011F0E",
                                "5D2C7A1E-0B2D-4B3A-9C4E-1F2A3B4C5D6E"],
                          "s": [{"f": "RAW", "g": [0, 0], "p": [41, 42]},
                                {"f": "AOD", "g": [1, 1], "p": [0, 1]}]}}}

* ``v``: the format version (this module writes and reads 1).
* ``h``: the header: the fields of :class:`MessageHeader` except ``version``;
  ``sent_at`` may be left out. ``message_id`` is unique per message and is what
  consumers use to make redelivery idempotent; ``guid`` is the producer's output
  file; ``count`` the number of events.
* ``c``: one entry per column of ``EVENT_SCHEMA``, all present and no other:

  - integer columns: an array of ``count`` integers within the Arrow type
    (uint16, uint32, uint64). Booleans are written ``0``/``1``, so JSON
    ``true``/``false`` never appear in a valid message, which makes a stray
    boolean cheap to detect. ``mc_event_weight``: numbers that fit float32.
  - trigger masks: ``{"w": width_in_bytes, "b64": base64}`` of the ``count``
    masks concatenated, each exactly ``w`` bytes (the encoder pads shorter masks
    with zero bytes, which set no bits). Bit ``i`` is bit ``i % 8`` of byte ``i // 8``.
  - ``references``: ``n`` is the number of references of each event (one
    integer when every event has the same number, else an array of ``count``
    integers); ``g`` is the table of distinct file GUIDs of this message
    (canonical 8-4-4-4-12 hex); ``s`` holds one object per reference slot: slot
    ``k`` covers the ``k``-th reference of every event that has more than ``k``
    references, in event order: ``f`` its data format (one string for the whole
    slot, or an array of strings), ``g`` indices into the GUID table, ``p`` the
    event's position (entry number, uint64) in that file.

Decoding validates everything and rejects a message with :class:`MessageError`,
naming the field, the 0-based row and the reason; it never drops rows. Each
column is checked in bulk, by one C-level conversion (``array.fromlist``) that
checks JSON type and range together; only a column known to be bad is scanned
row by row, to name its first bad row. The record batch is then assembled from
the decoded buffers with a single Arrow IPC read rather than twenty-odd array
constructors, which for a 10 kB message would cost more than parsing its JSON.
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
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from eventindex.config import CodecSettings
from eventindex.errors import ValidationError
from eventindex.records.schema import EVENT_KEY, EVENT_SCHEMA, REFERENCE_TYPE

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "MessageError",
    "MessageHeader",
    "decode_events",
    "encode_events",
    "encode_message_batches",
]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({FORMAT_VERSION})
DEFAULT_MAX_MESSAGE_BYTES: Final = CodecSettings.model_validate({}).max_message_bytes

# Arrow binary and list offsets are int32: no message may need more.
MAX_COUNT: Final = 2**31 - 1
GUID_LENGTH: Final = 36

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
    """What a message says about itself; every field is checked on construction."""

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
        if _GUID_RE.fullmatch(self.guid) is None:
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
_MASK_KEYS: Final = frozenset(("w", "b64"))
_REFERENCE_KEYS: Final = frozenset(("n", "g", "s"))
_SLOT_KEYS: Final = frozenset(("f", "g", "p"))


def _key_error(what: str, found: Any, expected: frozenset[str], field: str) -> MessageError:
    if type(found) is not dict:
        return MessageError(f"{what}: expected an object, got {_describe(found)}", field=field)
    missing = sorted(expected - found.keys())
    if missing:
        return MessageError(f"{what}: missing key {missing[0]!r}", field=field)
    return MessageError(f"{what}: unknown key {sorted(found.keys() - expected)[0]!r}", field=field)


def _decode_header(version: object, fields: object) -> MessageHeader:
    if type(fields) is not dict:
        raise MessageError(f"expected an object, got {_describe(fields)}", field="h")
    keys = fields.keys()
    if keys not in (_HEADER_KEYS, _HEADER_KEYS_SENT):
        missing = sorted(_HEADER_KEYS - keys)
        if missing:
            raise MessageError("missing header field", field=f"header.{missing[0]}")
        unknown = sorted(keys - _HEADER_KEYS_SENT)
        raise MessageError("unknown header field", field=f"header.{unknown[0]}")
    return MessageHeader(version=version, **fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- column groups

_INT, _BOOL, _FLOAT = "int", "bool", "float"


@dataclass(frozen=True)
class _Group:
    """Columns of one Arrow type, decoded together into one contiguous buffer.

    Every column starts on an 8-byte boundary, as Arrow IPC requires, so each is
    followed by ``pad`` zeros up to a multiple of ``pad_unit`` elements (64 for
    bools, which are bit-packed afterwards).
    """

    kind: str
    arrow_type: pa.DataType
    typecode: str
    itemsize: int
    names: tuple[str, ...]
    low: int
    high: int

    @property
    def pad_unit(self) -> int:
        return 64 if self.kind == _BOOL else 8 // self.itemsize

    def column_stride(self, n: int) -> int:
        """Bytes from the start of one column to the next in the group's buffer."""
        padded = -(-n // self.pad_unit) * self.pad_unit
        return padded // 8 if self.kind == _BOOL else padded * self.itemsize

    def column_bytes(self, n: int) -> int:
        return -(-n // 8) if self.kind == _BOOL else n * self.itemsize


# arrow type: (kind, array typecode, itemsize, low, high). array() checks JSON type
# and range in its C conversion loop: 'I' refuses floats, strings, null, negatives
# and anything above 2**32-1 on its own.
_GROUP_TYPES: Final[dict[pa.DataType, tuple[str, str, int, int, int]]] = {
    pa.uint16(): (_INT, "H", 2, 0, 2**16 - 1),
    pa.uint32(): (_INT, "I", 4, 0, 2**32 - 1),
    pa.uint64(): (_INT, "Q", 8, 0, 2**64 - 1),
    pa.bool_(): (_BOOL, "B", 1, 0, 1),
    pa.float32(): (_FLOAT, "f", 4, 0, 0),
}


def _column_groups() -> tuple[_Group, ...]:
    names: dict[pa.DataType, list[str]] = {}
    for field in EVENT_SCHEMA:
        if field.type in _GROUP_TYPES:
            names.setdefault(field.type, []).append(field.name)
    groups = []
    for arrow_type, columns in names.items():
        kind, code, size, low, high = _GROUP_TYPES[arrow_type]
        if array(code).itemsize != size:  # pragma: no cover - exotic platforms only
            raise RuntimeError(f"array typecode {code!r} is not {size} bytes here")
        groups.append(_Group(kind, arrow_type, code, size, tuple(columns), low, high))
    return tuple(groups)


_GROUPS: Final = _column_groups()
_GROUP_OF: Final = {name: group for group in _GROUPS for name in group.names}
_MASK_COLUMNS: Final = tuple(f.name for f in EVENT_SCHEMA if f.type == pa.binary())
_REFERENCES: Final = "references"
_COLUMN_KEYS: Final = frozenset(EVENT_SCHEMA.names)

if set(_GROUP_OF) | set(_MASK_COLUMNS) | {_REFERENCES} != set(EVENT_SCHEMA.names) or (
    EVENT_SCHEMA.field(_REFERENCES).type != pa.list_(REFERENCE_TYPE)
):  # pragma: no cover - a schema change this codec does not know how to carry
    raise RuntimeError("EVENT_SCHEMA has columns the wire codec cannot carry")


# --------------------------------------------------------------------------- row scans
# These run only once a bulk check has failed, to name the first bad row.


def _scan_integers(field: str, values: Sequence[object], low: int, high: int) -> MessageError:
    type_name = {2**16 - 1: "uint16", 2**32 - 1: "uint32", 2**64 - 1: "uint64"}.get(high, "")
    for row, value in enumerate(values):
        # orjson turns integers beyond 64 bits into floats: for those the range is what is wrong.
        huge = type(value) is float and value.is_integer() and not low <= value <= high
        if type(value) is not int and not huge:
            return MessageError(
                f"expected an integer, got {_describe(value)}", field=field, row=row
            )
        if value < low:  # type: ignore[operator]
            return MessageError(f"negative value {value}", field=field, row=row)
        if value > high:  # type: ignore[operator]
            return MessageError(
                f"value {value} out of range for {type_name} (max {high})", field=field, row=row
            )
    return MessageError(f"not an array of {type_name} integers", field=field)


def _scan_booleans(field: str, values: Sequence[object]) -> MessageError:
    for row, value in enumerate(values):
        if type(value) is not int or value not in (0, 1):
            return MessageError(f"expected 0 or 1, got {_describe(value)}", field=field, row=row)
    return MessageError("not an array of 0/1", field=field)


def _scan_floats(field: str, values: Sequence[object]) -> MessageError:
    for row, value in enumerate(values):
        if type(value) not in (int, float):
            return MessageError(f"expected a number, got {_describe(value)}", field=field, row=row)
        if abs(value) >= _F32_OVERFLOW:  # type: ignore[arg-type]
            return MessageError(
                f"value {value} out of range for float32 (max {_F32_MAX:.8g})",
                field=field,
                row=row,
            )
    return MessageError("not an array of float32 numbers", field=field)


def _scan_group(group: _Group, field: str, values: Sequence[object]) -> MessageError:
    if group.kind == _BOOL:
        return _scan_booleans(field, values)
    if group.kind == _FLOAT:
        return _scan_floats(field, values)
    return _scan_integers(field, values, group.low, group.high)


def _shape_error(field: str, values: object, n: int, what: str = "values") -> MessageError:
    if type(values) is not list:
        return MessageError(f"expected an array, got {_describe(values)}", field=field)
    return MessageError(f"has {len(values)} {what}, the header count is {n}", field=field)


def _find_json_boolean(columns: dict[str, Any]) -> MessageError:
    """The first JSON true/false where a number belongs (array() takes them for 1/0)."""
    for name, group in _GROUP_OF.items():
        for row, value in enumerate(columns[name]):
            if type(value) is bool:
                expected = {_BOOL: "0 or 1", _FLOAT: "a number"}.get(group.kind, "an integer")
                return MessageError(
                    f"expected {expected}, got {_describe(value)}", field=name, row=row
                )
    spec = columns[_REFERENCES]
    counts = spec["n"] if type(spec["n"]) is list else None
    if counts is not None and bool in set(map(type, counts)):
        row = next(i for i, value in enumerate(counts) if type(value) is bool)
        return MessageError(
            "reference count: expected an integer, got boolean", field=_REFERENCES, row=row
        )
    for k, slot in enumerate(spec["s"]):
        for key in ("g", "p"):
            for i, value in enumerate(slot[key]):
                if type(value) is bool:
                    what = "guid index" if key == "g" else "position"
                    return MessageError(
                        f"slot {k}: {what}: expected an integer, got {_describe(value)}",
                        field=_REFERENCES,
                        row=int(_slot_rows(counts, len(columns[EVENT_KEY[0]]), k)[i]),
                    )
    return MessageError("JSON boolean where a number belongs")


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
def _uniform_formats(formats: tuple[str, ...], n: int) -> tuple[bytes, bytes]:
    """Offsets and data of the format strings when every event has ``formats``, in order."""
    encoded = [f.encode() for f in formats]
    lengths = np.tile(np.array([len(e) for e in encoded], dtype=np.int32), n)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return offsets.tobytes(), b"".join(encoded) * n


# Formats already seen to be valid: a set lookup instead of a regex per slot and message.
_KNOWN_FORMATS: set[str] = set()


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


def _slot_numbers_error(
    k: int, indices: object, places: object, *, size: int, counts: list[Any] | None, n: int
) -> MessageError:
    for what, values, high in (("guid index", indices, 2**32 - 1), ("position", places, 2**64 - 1)):
        if type(values) is not list or len(values) != size:
            got = f"{len(values)}" if type(values) is list else _describe(values)
            return MessageError(
                f"slot {k}: {what}: expected an array of {size} integers, got {got}",
                field=_REFERENCES,
            )
        bad = _scan_integers(_REFERENCES, values, 0, high)
        if bad.row is not None:
            row = int(_slot_rows(counts, n, k)[bad.row])
            return MessageError(f"slot {k}: {what}: {bad.reason}", field=_REFERENCES, row=row)
    return MessageError(f"slot {k}: bad guid indices or positions", field=_REFERENCES)


def _guid_index_error(
    guid_index: array[int], sizes: Sequence[int], counts: list[Any] | None, n: int, table: int
) -> MessageError:
    slot_major = np.frombuffer(guid_index, dtype=np.uint32)
    at = int(np.argmax(slot_major >= table))
    bounds = np.cumsum([0, *sizes])
    k = int(np.searchsorted(bounds, at, side="right")) - 1
    return MessageError(
        f"slot {k}: guid index {int(slot_major[at])} out of range "
        f"(the guid table has {table} entries)",
        field=_REFERENCES,
        row=int(_slot_rows(counts, n, k)[at - int(bounds[k])]),
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
    return MessageError("bad guid table", field=_REFERENCES)


def _reference_counts(
    counts: list[Any], n: int, depth: int, checked: list[list[Any]]
) -> tuple[list[int], int]:
    """Slot sizes and total of per-event reference counts, after checking them."""
    if len(counts) != n:
        raise _shape_error(_REFERENCES, counts, n, "reference counts")
    try:
        values = np.frombuffer(array("I", counts), dtype=np.uint32).astype(np.int64)
    except (TypeError, OverflowError):
        bad = _scan_integers(_REFERENCES, counts, 0, 2**32 - 1)
        raise MessageError(
            f"reference count: {bad.reason}", field=_REFERENCES, row=bad.row
        ) from None
    checked.append(counts)
    deepest = int(values.max()) if n else 0
    if depth != deepest:
        raise MessageError(
            f"has {depth} reference slots, but the most references of an event is {deepest}",
            field=_REFERENCES,
        )
    # slot k holds the events with more than k references
    at_most = np.cumsum(np.bincount(values, minlength=depth + 1))
    return (n - at_most[:depth]).tolist(), int(values.sum())


def _decode_references(
    spec: object, n: int, checked: list[list[Any]]
) -> tuple[int, bytes, bytes, bytes, bytes, Any]:
    """The references column as row-major Arrow buffers.

    Returns (total references, list offsets, format offsets, format data, guid
    data, positions); ``checked`` collects the number arrays for the JSON boolean test.
    """
    if type(spec) is not dict or spec.keys() != _REFERENCE_KEYS:
        raise _key_error("references", spec, _REFERENCE_KEYS, _REFERENCES)
    guids, slots, count_spec = spec["g"], spec["s"], spec["n"]
    if type(guids) is not list:
        raise MessageError(
            f"guid table: expected an array, got {_describe(guids)}", field=_REFERENCES
        )
    try:
        guids_ok = all(map(_GUID_RE.fullmatch, guids)) and len(set(guids)) == len(guids)
    except TypeError:  # a non-string entry
        guids_ok = False
    if not guids_ok:
        raise _guid_table_error(guids)
    if type(slots) is not list:
        raise MessageError(f"slots: expected an array, got {_describe(slots)}", field=_REFERENCES)
    depth = len(slots)

    counts: list[Any] | None
    if type(count_spec) is int:
        # Every event has the same number of references: the common case, kept cheap.
        if count_spec != depth:
            raise MessageError(
                f"every event has {count_spec} references but there are {depth} slots",
                field=_REFERENCES,
            )
        counts = None
        sizes = [n] * depth
        total = n * depth
    elif type(count_spec) is list:
        counts = count_spec
        sizes, total = _reference_counts(counts, n, depth, checked)
    else:
        raise MessageError(
            f"reference count: expected an integer or an array, got {_describe(count_spec)}",
            field=_REFERENCES,
        )
    if GUID_LENGTH * total > MAX_COUNT:  # Arrow's int32 offsets of the GUID strings
        raise MessageError(f"{total} references are too many for one message", field=_REFERENCES)

    guid_index = array("I")
    positions = array("Q")
    slot_formats: list[Any] = []
    all_uniform = True
    # The GUID index of each slot while every slot names a single file, as in most messages.
    one_file: list[int] | None = [] if counts is None else None
    for k, slot in enumerate(slots):
        size = sizes[k]
        if type(slot) is not dict or slot.keys() != _SLOT_KEYS:
            raise _key_error(f"slot {k}", slot, _SLOT_KEYS, _REFERENCES)
        formats, indices, places = slot["f"], slot["g"], slot["p"]
        if type(formats) is list:
            all_uniform = False
            if len(formats) != size or not all(map(_is_format, formats)):
                raise _slot_formats_error(k, formats, size, counts, n)
        elif not _is_format(formats):
            raise MessageError(f"slot {k}: invalid format {_describe(formats)}", field=_REFERENCES)
        slot_formats.append(formats)
        if not (type(indices) is type(places) is list and len(indices) == len(places) == size):
            raise _slot_numbers_error(k, indices, places, size=size, counts=counts, n=n)
        try:
            guid_index.fromlist(indices)
            positions.fromlist(places)
        except (TypeError, OverflowError):
            raise _slot_numbers_error(k, indices, places, size=size, counts=counts, n=n) from None
        checked += (indices, places)
        if one_file is not None:
            if size and indices.count(indices[0]) == size:
                one_file.append(indices[0])
            else:
                one_file = None

    if counts is None:
        # (slot, event) to (event, slot) is a transpose: no index arithmetic needed.
        flat_positions: Any = (
            positions
            if depth == 1
            else np.frombuffer(positions, dtype=np.uint64).reshape(depth, n).T.tobytes()
        )
        list_offsets = _fixed_offsets(depth, n)
        targets = None
        if all_uniform:
            format_offsets, format_data = _uniform_formats(tuple(slot_formats), n)
        else:
            targets = (np.arange(depth)[:, None] + depth * np.arange(n)[None, :]).ravel()
            format_offsets, format_data = _format_buffers(slot_formats, sizes, targets, total)
    else:
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.asarray(counts, dtype=np.int64), out=starts[1:])
        per_event = np.diff(starts)
        # Row-major place of every slot-major entry: one numpy pass per slot, none per row.
        targets = np.concatenate(
            [starts[:-1][per_event > k] + k for k in range(depth)] or [np.zeros(0, np.int64)]
        ).astype(np.intp)
        flat_positions = np.empty(total, dtype=np.uint64)
        flat_positions[targets] = np.frombuffer(positions, dtype=np.uint64)
        list_offsets = starts.astype(np.int32).tobytes()
        format_offsets, format_data = _format_buffers(slot_formats, sizes, targets, total)

    if not total:
        guid_data = b""
    elif one_file is not None:
        # Every event names the same files: repeat one event's GUIDs, no gather needed.
        if max(one_file) >= len(guids):
            raise _guid_index_error(guid_index, sizes, counts, n, len(guids))
        guid_data = "".join([guids[i] for i in one_file]).encode("ascii") * n
    else:
        slot_major = np.frombuffer(guid_index, dtype=np.uint32)
        if int(slot_major.max()) >= len(guids):
            raise _guid_index_error(guid_index, sizes, counts, n, len(guids))
        if targets is None:
            flat_guids = slot_major.reshape(depth, n).T.ravel()
        else:
            flat_guids = np.empty(total, dtype=np.uint32)
            flat_guids[targets] = slot_major
        matrix = np.frombuffer("".join(guids).encode("ascii"), dtype=np.uint8)
        guid_data = matrix.reshape(len(guids), GUID_LENGTH)[flat_guids].tobytes()
    return total, list_offsets, format_offsets, format_data, guid_data, flat_positions


# --------------------------------------------------------------------------- batch assembly


class _BatchAssembler:
    """Turns decoded buffers into a RecordBatch of EVENT_SCHEMA.

    An Arrow IPC record batch message is a flatbuffer of buffer offsets and sizes
    followed by the buffers themselves, so the metadata is taken once from a
    batch that pyarrow serialises, its numbers are patched for each layout
    (cached: a producer's messages share a handful of layouts) and the whole
    batch is read with one call. With ``use_ipc`` off it builds the same arrays
    with ``Array.from_buffers`` one by one: slower, and what the IPC path is
    checked against.

    Body pieces, in order: one buffer per column group, offsets and data of each
    mask column, then the references' list offsets, format offsets and data,
    guid offsets and data, and positions.
    """

    def __init__(self) -> None:
        self.mask_base = len(_GROUPS)
        ref_base = self.mask_base + 2 * len(_MASK_COLUMNS)
        self.format_data = ref_base + 2
        nodes: list[bool] = []  # per Arrow node: True if one per event, False if per reference
        buffers: list[tuple[int, int] | None] = []  # (piece, column in piece); None: no nulls
        group_index = {group: g for g, group in enumerate(_GROUPS)}
        for field in EVENT_SCHEMA:
            if field.name in _GROUP_OF:
                group = _GROUP_OF[field.name]
                nodes.append(True)
                buffers += [None, (group_index[group], group.names.index(field.name))]
            elif field.name in _MASK_COLUMNS:
                piece = self.mask_base + 2 * _MASK_COLUMNS.index(field.name)
                nodes.append(True)
                buffers += [None, (piece, 0), (piece + 1, 0)]
            else:  # list<struct<format, guid, position>>
                nodes += [True, False, False, False, False]
                pieces = iter(range(ref_base, ref_base + 6))
                for own in (2, 1, 3, 3, 2):  # buffers of list, struct, string, string, uint64
                    buffers += [None] + [(next(pieces), 0) for _ in range(own - 1)]
        self.nodes = tuple(nodes)
        self.buffers = tuple(buffers)
        self._template: tuple[bytes, int, int, int, int] | None
        try:
            self._template = self._parse_template()
        except (RuntimeError, struct.error, IndexError) as exc:
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
        if marker != 0xFFFFFFFF:
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
            if not offset:
                raise RuntimeError(f"template IPC metadata lacks field {index}")
            return table + offset

        def vector_at(table: int, index: int) -> tuple[int, int]:
            ref = field_at(table, index)
            start = ref + u32(ref)
            return start + 4, u32(start)

        root = u32(0)
        if meta[field_at(root, 1)] != 3:  # Message.header_type == RecordBatch
            raise RuntimeError("template IPC message is not a record batch")
        body_length_at = field_at(root, 3)
        batch_ref = field_at(root, 2)
        batch = batch_ref + u32(batch_ref)
        length_at = field_at(batch, 0)
        nodes_at, node_count = vector_at(batch, 1)
        buffers_at, buffer_count = vector_at(batch, 2)
        if node_count != len(self.nodes) or buffer_count != len(self.buffers):
            raise RuntimeError("template IPC metadata does not match the schema")
        if any((8 + pos) % 8 for pos in (body_length_at, length_at, nodes_at, buffers_at)):
            raise RuntimeError("template IPC metadata is not 8-byte aligned")
        return message[: 8 + meta_size], body_length_at, length_at, nodes_at, buffers_at

    @functools.lru_cache(maxsize=512)  # noqa: B019 - one instance, for the process's life
    def layout(
        self, n: int, total: int, format_bytes: int, widths: tuple[int, ...]
    ) -> tuple[bytes, tuple[bytes, ...], tuple[tuple[int, int], ...]]:
        """IPC metadata, the zero padding after each piece, and each buffer's (offset, size)."""
        sizes = [group.column_stride(n) * len(group.names) for group in _GROUPS]
        for width in widths:
            sizes += [4 * (n + 1), width * n]
        sizes += [4 * (n + 1), 4 * (total + 1), format_bytes, 4 * (total + 1)]
        sizes += [GUID_LENGTH * total, 8 * total]
        pads = tuple(bytes(-size % 8) for size in sizes)
        starts = []
        body = 0
        for size, pad in zip(sizes, pads, strict=True):
            starts.append(body)
            body += size + len(pad)
        spans = []
        for entry in self.buffers:
            if entry is None:
                spans.append((0, 0))
            elif entry[0] < len(_GROUPS):
                group = _GROUPS[entry[0]]
                start = starts[entry[0]] + entry[1] * group.column_stride(n)
                spans.append((start, group.column_bytes(n)))
            else:
                spans.append((starts[entry[0]], sizes[entry[0]]))
        if self._template is None:
            return b"", pads, tuple(spans)
        prefix, body_length_at, length_at, nodes_at, buffers_at = self._template
        meta = bytearray(prefix)
        struct.pack_into("<q", meta, 8 + body_length_at, body)
        struct.pack_into("<q", meta, 8 + length_at, n)
        node_values = [v for per_event in self.nodes for v in (n if per_event else total, 0)]
        struct.pack_into(f"<{len(node_values)}q", meta, 8 + nodes_at, *node_values)
        span_values = [v for span in spans for v in span]
        struct.pack_into(f"<{len(span_values)}q", meta, 8 + buffers_at, *span_values)
        return bytes(meta), pads, tuple(spans)

    def assemble(
        self, n: int, total: int, widths: tuple[int, ...], pieces: list[Any]
    ) -> pa.RecordBatch:
        """A RecordBatch from the body pieces (buffer-protocol objects, in piece order)."""
        meta, pads, spans = self.layout(n, total, len(pieces[self.format_data]), widths)
        parts = itertools.chain((meta,), *zip(pieces, pads, strict=True))
        message = pa.py_buffer(b"".join(parts))
        if self.use_ipc:
            return pa.ipc.read_record_batch(message, EVENT_SCHEMA)
        return self._from_buffers(message.slice(len(meta)), n, total, spans)

    def _from_buffers(
        self, body: pa.Buffer, n: int, total: int, spans: tuple[tuple[int, int], ...]
    ) -> pa.RecordBatch:
        buffers = iter(
            None if entry is None else body.slice(*span)
            for entry, span in zip(self.buffers, spans, strict=True)
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


# --------------------------------------------------------------------------- decode


def decode_events(
    payload: bytes | str, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[MessageHeader, pa.Table]:
    """Validate one message and return its header and its events, as an EVENT_SCHEMA table.

    Raises :class:`MessageError` naming the field, row and reason of the first
    problem found: a message is accepted whole or not at all.
    """
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
    if doc.keys() != _TOP_KEYS:
        if "v" not in doc:
            raise MessageError("missing format version", field="v")
        missing = [key for key in ("h", "c") if key not in doc]
        if missing:
            raise MessageError("missing", field=missing[0])
        raise MessageError("unknown key", field=sorted(doc.keys() - _TOP_KEYS)[0])
    header = _decode_header(doc["v"], doc["h"])
    columns = doc["c"]
    if type(columns) is not dict:
        raise MessageError(f"expected an object, got {_describe(columns)}", field="c")
    if columns.keys() != _COLUMN_KEYS:
        missing = [name for name in EVENT_SCHEMA.names if name not in columns]
        if missing:
            raise MessageError("missing column", field=missing[0])
        raise MessageError("unknown column", field=sorted(columns.keys() - _COLUMN_KEYS)[0])
    return header, pa.Table.from_batches([_decode_columns(columns, header.count)])


def _decode_columns(columns: dict[str, Any], n: int) -> pa.RecordBatch:
    pieces: list[Any] = []
    checked: list[list[Any]] = []  # every array of numbers, for the JSON boolean test
    for group in _GROUPS:
        block = array(group.typecode)
        pad = [0] * (-n % group.pad_unit)
        for name in group.names:
            values = columns[name]
            if type(values) is not list or len(values) != n:
                raise _shape_error(name, values, n)
            try:
                block.fromlist(values)
            except (TypeError, OverflowError):
                raise _scan_group(group, name, values) from None
            if pad:
                block.fromlist(pad)
            checked.append(values)
        if group.kind == _BOOL:
            raw = block.tobytes()
            if raw.translate(None, b"\x00\x01"):
                bad = next(name for name in group.names if not set(columns[name]) <= {0, 1})
                raise _scan_booleans(bad, columns[bad])
            pieces.append(np.packbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little"))
        else:
            if group.kind == _FLOAT and n:
                # float32 overflow is the only range problem of a float column; max/min of
                # the few Python numbers is cheaper than a numpy round trip
                for name in group.names:
                    values = columns[name]
                    if max(values) >= _F32_OVERFLOW or min(values) <= -_F32_OVERFLOW:
                        raise _scan_floats(name, values)
            pieces.append(block)

    widths = []
    for name in _MASK_COLUMNS:
        spec = columns[name]
        if type(spec) is not dict or spec.keys() != _MASK_KEYS:
            raise _mask_error(name, spec, n)
        width, text = spec["w"], spec["b64"]
        if type(width) is not int or width < 0 or type(text) is not str:
            raise _mask_error(name, spec, n)
        try:
            data = binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            raise _mask_error(name, spec, n) from None
        if len(data) != width * n or len(data) > MAX_COUNT:
            raise _mask_error(name, spec, n)
        widths.append(width)
        pieces += (_fixed_offsets(width, n), data)

    total, list_offsets, format_offsets, format_data, guid_data, positions = _decode_references(
        columns[_REFERENCES], n, checked
    )
    pieces += (
        list_offsets,
        format_offsets,
        format_data,
        _fixed_offsets(GUID_LENGTH, total),
        guid_data,
        positions,
    )

    # array() takes JSON true/false for 1/0. Written back out, numbers never contain
    # "t" or "f", so one dump of every number array finds a stray boolean.
    dumped = orjson.dumps(checked)
    if b"t" in dumped or b"f" in dumped:
        raise _find_json_boolean(columns)

    if n > 1:
        runs, events = columns[EVENT_KEY[0]], columns[EVENT_KEY[1]]
        if runs.count(runs[0]) == n:  # one run, as nearly always
            unique = len(set(events))
        else:
            unique = len(set(zip(runs, events, strict=True)))
        if unique != n:
            raise _find_duplicate_key(runs, events)

    return _ASSEMBLER.assemble(n, total, tuple(widths), pieces)


def _mask_error(name: str, spec: Any, n: int) -> MessageError:
    """What is wrong with a trigger mask column the bulk checks refused."""
    if type(spec) is not dict or spec.keys() != _MASK_KEYS:
        return _key_error("trigger mask", spec, _MASK_KEYS, name)
    width, text = spec["w"], spec["b64"]
    if type(width) is not int or width < 0:
        return MessageError(f"mask width: expected bytes >= 0, got {_describe(width)}", field=name)
    if type(text) is not str:
        return MessageError(f"mask data: expected base64 text, got {_describe(text)}", field=name)
    try:
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        return MessageError(f"mask data: bad base64: {exc}", field=name)
    if len(data) > MAX_COUNT:
        return MessageError(f"mask data is {len(data)} bytes: too large", field=name)
    return MessageError(
        f"mask data is {len(data)} bytes, not width {width} x {n} events = {width * n}",
        field=name,
    )


# --------------------------------------------------------------------------- encode


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


class _EventColumns:
    """A table's columns as numpy arrays, checked once and then cut into messages."""

    def __init__(self, table: pa.Table) -> None:
        table = _conform(table)
        self.rows = table.num_rows
        self.numbers: dict[str, npt.NDArray[Any]] = {}
        for name, group in _GROUP_OF.items():
            values = table.column(name).to_numpy()
            if group.kind == _BOOL:
                values = values.astype(np.uint8)  # written as 0/1
            elif group.kind == _FLOAT and not np.isfinite(values).all():
                row = int(np.argmin(np.isfinite(values)))
                raise ValidationError(f"column {name!r}, row {row}: not a finite number")
            self.numbers[name] = values
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
        """Rows ``start:stop`` as one message with ``header``."""
        if header.count != stop - start:
            raise ValidationError(
                f"header count {header.count} but the message has {stop - start} rows"
            )
        columns: dict[str, Any] = {name: v[start:stop] for name, v in self.numbers.items()}
        for name, matrix in self.masks.items():
            rows = matrix[start:stop]
            columns[name] = {
                "w": rows.shape[1],
                "b64": binascii.b2a_base64(rows.tobytes(), newline=False).decode("ascii"),
            }
        columns[_REFERENCES] = self._references(start, stop)
        document = {"v": header.version, "h": header.wire_fields(), "c": columns}
        return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)

    def _references(self, start: int, stop: int) -> dict[str, Any]:
        counts = self.ref_counts[start:stop]
        if not len(counts):
            return {"n": 0, "g": [], "s": []}
        first, last = self.ref_starts[start], self.ref_starts[stop]
        used, local = np.unique(self.guid_index[first:last], return_inverse=True)
        guid_index = local.astype(np.uint32)
        format_index = self.format_index[first:last]
        positions = self.positions[first:last]
        depth = int(counts.max())
        uniform = bool((counts == depth).all())
        slot_starts = self.ref_starts[start:stop] - first
        slots = []
        for k in range(depth):
            take = slot_starts + k if uniform else slot_starts[counts > k] + k
            formats = format_index[take]
            slots.append(
                {
                    "f": self.format_table[formats[0]]
                    if (formats == formats[0]).all()
                    else list(map(self.format_table.__getitem__, formats.tolist())),
                    "g": guid_index[take],
                    "p": positions[take],
                }
            )
        return {
            "n": depth if uniform else counts.astype(np.uint32),
            "g": [self.guid_table[i] for i in used.tolist()],
            "s": slots,
        }


def encode_events(table: pa.Table, header: MessageHeader) -> bytes:
    """Encode an EVENT_SCHEMA table as one message; ``header.count`` must equal its rows.

    Raises ValidationError when the table does not fit the event schema or holds
    what the format cannot carry (nulls, non-finite weights, malformed GUIDs).
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
    """The largest message from ``start`` on that fits ``target_bytes``, give or take 5%.

    Guesses rows from bytes per row (usually right the first time), and keeps
    the rows known to fit and the rows known not to fit as a bracket, bisecting
    after a few guesses, so that it always ends.
    """
    room = max(target_bytes - overhead, 1)
    fits, too_many = 0, remaining + 1
    best: tuple[MessageHeader, bytes] | None = None
    # Aim a little under the target: an oversized message costs a second encode.
    rows = max(1, min(remaining, int(room * 0.98 / per_row)))
    for attempt in itertools.count():
        header, payload = encode(start, rows, sequence)
        size = len(payload)
        if size <= target_bytes or rows == 1:  # a single oversized row goes alone
            best, fits = (header, payload), rows
            if size >= 0.95 * target_bytes or rows == too_many - 1 or size > target_bytes:
                break
        else:
            too_many = rows
        if attempt < 4:
            guess = int(rows * room * 0.98 / max(size - overhead, 1))
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
    if not _ASSEMBLER.use_ipc:
        return
    guid = "0A66C3F2-56B6-E511-8B7B-02163E011F0E"
    columns: dict[str, Any] = {name: [0, 1, 1] for name in _GROUP_OF}
    columns["event_number"] = [1, 2, 2**64 - 1]
    columns |= {name: {"w": 3, "b64": "AQIDBAUGBwgJ"} for name in _MASK_COLUMNS}
    columns[_REFERENCES] = {
        "n": [2, 0, 1],
        "g": [guid],
        "s": [
            {"f": ["RAW", "AOD"], "g": [0, 0], "p": [5, 2**63]},
            {"f": "ESD", "g": [0], "p": [1]},
        ],
    }
    header = {
        "producer": "codec", "message_id": "self-check", "dataset": "self-check",
        "collection": "self-check", "guid": guid, "task_id": "0", "job_id": "0", "count": 3,
    }  # fmt: skip
    payload = orjson.dumps({"v": FORMAT_VERSION, "h": header, "c": columns})
    try:
        _, fast = decode_events(payload)
        fast.validate(full=True)
        _ASSEMBLER.use_ipc = False
        _, slow = decode_events(payload)
        ok = fast.equals(slow)
    except (pa.ArrowException, MessageError, ValueError) as exc:
        log.warning("Arrow IPC batch assembly failed its self-check: %s", exc)
        ok = False
    _ASSEMBLER.use_ipc = ok


_self_check()
