"""One message, from JSON text to checked Arrow body pieces.

:func:`_decode_message` bounds the message's size, parses it and checks its
top-level keys, header and column names; :func:`_decode_columns` then reads
every column in schema order in one pass (the common encodings inline, the
rest through :mod:`.arrays`, booleans, floats and dictionary masks here), the
references last, and the compressed block once every array in it is known.
What is checked after the pass: finite floats, no JSON boolean where a number
belongs, and unique (run_number, event_number) keys, which may be left to the
bulk check of :func:`~eventindex.records.codec.decode.decode_messages`.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from eventindex.records.codec.arrays import (
    _CONSTANTS,
    _bits,
    _constant,
    _fixed_offsets,
    _int_array,
    _Packed,
    _repeated,
    _tiled,
)
from eventindex.records.codec.assembly import _Decoded
from eventindex.records.codec.compression import _b64
from eventindex.records.codec.header import MessageHeader, _decode_header
from eventindex.records.codec.reasons import (
    _COLUMN_PLACES,
    _base64_error,
    _constant_error,
    _encoding_error,
    _find_duplicate_key,
    _find_json_boolean,
    _float_problem,
    _marker_error,
    _mask_error,
    _mask_key_error,
    _Place,
    _scan_booleans,
    _scan_floats,
    _scan_integers,
    _shape_error,
)
from eventindex.records.codec.references import _References
from eventindex.records.codec.wire import (
    _BOOL,
    _COLUMN_KEYS,
    _F32_OVERFLOW,
    _FLOAT,
    _INT,
    _LAYOUT,
    _MASK,
    _PIECE,
    _REFERENCES,
    _TOP_KEYS,
    _TOP_KEYS_PACKED,
    MAX_COUNT,
    MAX_EXPANSION,
    MessageError,
    _describe,
)
from eventindex.records.schema import EVENT_KEY, EVENT_SCHEMA


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


def _list_block(
    spec: list[Any], n: int, place: _Place, typecode: str, scan: Callable[..., Exception]
) -> array[Any]:
    """A column given as a JSON list, as an ``array`` of ``typecode``, converted in one C
    call; ``scan`` names the first bad value when the conversion refuses one."""
    if len(spec) != n:
        raise _shape_error(place, spec, n)
    block: array[Any] = array(typecode)
    try:
        block.fromlist(spec)
    except (TypeError, OverflowError):
        raise scan(place, spec) from None
    return block


def _decode_bools(
    spec: Any, n: int, version: int, name: str, checked: tuple[list[list[Any]], list[_Place]]
) -> Any:
    place = _COLUMN_PLACES[name]
    if type(spec) is list:
        raw = _list_block(spec, n, place, "B", _scan_booleans).tobytes()
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
        block = _list_block(spec, n, place, "f", _scan_floats)
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
