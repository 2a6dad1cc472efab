"""From decoded buffers to a RecordBatch of ``EVENT_SCHEMA``, with one Arrow IPC read.

:class:`_BatchAssembler` parses the IPC metadata of a template batch once,
patches its lengths and buffer offsets for each layout (cached: a producer's
messages share a handful) and reads the body pieces of one message, or of
many laid end to end, as one record batch; a slower path builds the same
arrays with ``Array.from_buffers`` and is what the IPC path is checked
against. :class:`_Decoded` is what the decoder hands over: one message's body
pieces, and the checks left to bulk passes over many messages.
"""

from __future__ import annotations

import functools
import itertools
import logging
import struct
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from eventindex.records.codec.arrays import _uniform_format_buffers
from eventindex.records.codec.references import _guid_tables, _References
from eventindex.records.codec.wire import _MASK_COLUMNS, _REFERENCES, GUID_LENGTH
from eventindex.records.schema import EVENT_SCHEMA

log = logging.getLogger(__name__)


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
