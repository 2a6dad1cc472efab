"""The encoding entry points: :func:`encode_events` and :func:`encode_message_batches`.

:class:`_EventColumns` checks a table once (schema, nulls, finite weights,
GUIDs and formats) and holds its columns as numpy arrays, from which it cuts
messages: version 2 picks each array's encoding (constant, compressed block,
runs, deltas, mask dictionary or plain) by :func:`_number_spec` and the mask
rules, version 1 writes plain arrays and base64 masks. :func:`_fit` sizes
messages to a byte target from the bytes per row of the previous message, so
that most messages take a single encode.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from eventindex.errors import ValidationError
from eventindex.records.codec import compression
from eventindex.records.codec.compression import _PACK, _b64_size, _b64_text
from eventindex.records.codec.header import MessageHeader
from eventindex.records.codec.wire import (
    _FORMAT_RE,
    _GUID_RE,
    _MASK_COLUMNS,
    _NUMBER_COLUMNS,
    _PLAIN_NAMES,
    _REFERENCE_BYTES,
    _REFERENCES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_EXPANSION,
)
from eventindex.records.schema import EVENT_SCHEMA

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


# A delta array must save this many characters per row over the plain one: summing
# it costs more than converting plain numbers.
_DELTA_SAVING: Final = 2


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
        pack = compression._ZSTD is not None and n > 2
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
            assert compression._ZSTD is not None
            document["z"] = _b64_text(compression._ZSTD.compress(b"".join(parts)))
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
