"""Why a message is refused: where (field, 0-based row) and the reason, in words.

:class:`_Place` says where an array sits in a message (column, reference slot,
delta or runs form) and turns an index in that array into the event row. The
row scans here run only once a bulk conversion has refused an array, to name
its first bad value; the other helpers build the :class:`MessageError` of a
bad constant, mask, marker, shape or set of keys. These reasons are what a
consumer puts in the dead-letter header, so their wording is part of what the
codec promises and the tests pin it.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Sequence
from typing import Any, Final

import pyarrow as pa

from eventindex.records.codec.compression import _b64
from eventindex.records.codec.wire import (
    _BOOL,
    _F32_MAX,
    _F32_OVERFLOW,
    _INT,
    _MASK_ENCODINGS,
    _PLAIN_MASK_KEYS,
    _TYPE_NAMES,
    MessageError,
    _describe,
)
from eventindex.records.schema import EVENT_SCHEMA


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


def _no_row(index: int) -> None:
    return None


def _runs_place(place: _Place) -> _Place:
    """Where a runs array's problems are: its rows are not one per item, so none is named."""
    return _Place(place.field, place.prefix + "runs: ", _no_row, place.expected)


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


# --------------------------------------------------------------------------- reasons


def _key_error(what: str, found: Any, expected: frozenset[str], field: str) -> MessageError:
    if type(found) is not dict:
        return MessageError(f"{what}: expected an object, got {_describe(found)}", field=field)
    missing = sorted(expected - found.keys())
    if missing:
        return MessageError(f"{what}: missing key {missing[0]!r}", field=field)
    return MessageError(f"{what}: unknown key {sorted(found.keys() - expected)[0]!r}", field=field)


def _shape_error(place: _Place, values: object, n: int, what: str = "values") -> MessageError:
    if type(values) is not list:
        return place.error(f"expected an array, got {_describe(values)}")
    return place.error(f"has {len(values)} {what}, the header count is {n}")


def _encoding_error(place: _Place, spec: object, version: int, forms: str) -> MessageError:
    if version < 2 or type(spec) is not dict:
        return place.error(f"expected an array, got {_describe(spec)}")
    return place.error(f"expected an array or {forms}, got {_describe(spec)}")


_INT_FORMS: Final = '{"k": value}, {"d": [first, deltas...]} or {"r": [value, count, ...]}'


def _constant_error(name: str, kind: int, value: object, high: int) -> MessageError:
    if kind == _INT:
        problem = _integer_problem(value, high) or f"expected an integer, got {_describe(value)}"
    elif kind == _BOOL:
        problem = f"expected 0 or 1, got {_describe(value)}"
    else:
        problem = _float_problem(value) or f"expected a number, got {_describe(value)}"
    return _COLUMN_PLACES[name].error(f"constant: {problem}")


def _marker_error(place: _Place, marker: object) -> MessageError:
    return place.error(f'compressed: expected "zstd", got {_describe(marker)}')


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
