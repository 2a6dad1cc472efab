"""The inverted trigger index (the Indexer's transform): trigger bit -> roaring bitmap of rows.

For one master TagFile, every (run, SMK) group of its rows and every trigger mask
bit set in at least one row of the group get one roaring bitmap of the row
ordinals (positions in the master file) whose bit is set. The index of a file is
itself a map-file keyed by ``(run_number, smk, mask, bit)`` with the bitmap in
the portable roaring serialisation, so any roaring implementation reads it and
the catalog's run-range filters and ``catalog verify`` work on it unchanged.

``mask`` 0 (``events``) holds one bitmap per group with every row of the group:
the universe a ``NOT`` is taken against, and the group's event count.

The transform is numpy over the packed mask bytes: per block of rows, the
masks are turned byte-major and their non-zero bytes found at once (ordered by
byte, rows ascending inside each), then split into their eight bits, so every
bit's rows come out sorted and each bitmap is built from contiguous arrays.
Nothing runs per event in Python.
"""

from __future__ import annotations

import array
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from pyroaring import BitMap, FrozenBitMap

from eventindex.records.schema import TRIGGER_MASK_FIELDS

INDEX_PART = "triggers"
INDEX_KEY: tuple[str, ...] = ("run_number", "smk", "mask", "bit")
EVENTS_MASK = 0
# Mask codes in the index: 0 is every row of the group, then the record's masks.
MASK_CODES: dict[str, int] = {"events": EVENTS_MASK} | {
    name: code for code, name in enumerate(TRIGGER_MASK_FIELDS, start=1)
}
MASK_NAMES: dict[int, str] = {code: name for name, code in MASK_CODES.items()}
# Catalog attribute of an index entry naming the master file it indexes.
MASTER_ATTRIBUTE = "master"
INDEX_COLUMNS: tuple[str, ...] = ("run_number", "smk", *TRIGGER_MASK_FIELDS)

INDEX_SCHEMA = pa.schema(
    [
        pa.field("run_number", pa.uint32(), nullable=False),
        pa.field("smk", pa.uint32(), nullable=False),
        pa.field("mask", pa.uint8(), nullable=False),
        pa.field("bit", pa.uint32(), nullable=False),
        pa.field("cardinality", pa.uint64(), nullable=False),
        pa.field("bitmap", pa.binary(), nullable=False),
    ]
)

# Rows per block: bounds the temporary arrays (a few bytes per set bit) whatever the file size.
_BLOCK_ROWS = 1 << 18
# Roaring stores 32-bit values: a master file holds fewer rows than this.
MAX_FILE_ROWS = 2**32

UInt8Matrix = npt.NDArray[np.uint8]
IntArray = npt.NDArray[np.int64]
RowArray = npt.NDArray[np.uint32]


def mask_matrix(column: pa.Array | pa.ChunkedArray) -> UInt8Matrix:
    """A binary mask column as a (rows, bytes) uint8 matrix, shorter masks zero-padded."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_large_binary(column.type):
        column = column.cast(pa.binary())
    if not pa.types.is_binary(column.type):
        raise ValueError(f"a trigger mask column must be binary, not {column.type}")
    rows = len(column)
    if column.null_count:
        raise ValueError(f"trigger mask column has {column.null_count} null values")
    _, offsets_buffer, data_buffer = column.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[
        column.offset : column.offset + rows + 1
    ]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, dtype=np.uint8)
    )
    lengths = np.diff(offsets)
    width = int(lengths.max(initial=0))
    start = int(offsets[0]) if rows else 0
    if rows == 0 or width == 0:
        return np.zeros((rows, width), dtype=np.uint8)
    if bool(np.all(lengths == width)):
        return data[start : start + rows * width].reshape(rows, width)
    # Variable widths (masks of several menus in one file): scatter into a padded matrix.
    matrix = np.zeros((rows, width), dtype=np.uint8)
    row_of_byte = np.repeat(np.arange(rows), lengths)
    column_of_byte = np.arange(len(row_of_byte)) - np.repeat(offsets[:-1] - start, lengths)
    matrix[row_of_byte, column_of_byte] = data[start : int(offsets[-1])]
    return matrix


def bit_rows(matrix: UInt8Matrix, row_offset: int = 0) -> dict[int, list[RowArray]]:
    """For every bit set in some row of ``matrix``: the ascending rows (plus ``row_offset``)
    that have it, as pieces to concatenate (one per block of rows)."""
    found: dict[int, list[RowArray]] = {}
    for block_start in range(0, matrix.shape[0], _BLOCK_ROWS):
        # Byte-major, so the non-zero bytes come out by byte column, rows ascending in each.
        by_byte = np.ascontiguousarray(matrix[block_start : block_start + _BLOCK_ROWS].T)
        byte_columns, rows = np.nonzero(by_byte)
        if len(rows) == 0:
            continue
        values = by_byte[byte_columns, rows]
        rows = (rows + (row_offset + block_start)).astype(np.uint32)
        for shift in range(8):
            has_bit = ((values >> shift) & 1).astype(bool)
            if not has_bit.any():
                continue
            columns = byte_columns[has_bit]
            cuts = np.flatnonzero(np.diff(columns)) + 1
            starts = np.concatenate(([0], cuts))
            for start, piece in zip(starts, np.split(rows[has_bit], cuts), strict=True):
                found.setdefault(int(columns[start]) * 8 + shift, []).append(piece)
    return found


def bitmap_of(rows: RowArray) -> BitMap:
    """A roaring bitmap of ascending uint32 rows (through the fast buffer path)."""
    values = array.array("I")
    values.frombytes(np.ascontiguousarray(rows, dtype=np.uint32).tobytes())
    bitmap = BitMap(values)
    bitmap.run_optimize()
    return bitmap


@dataclass(frozen=True)
class _Group:
    run_number: int
    smk: int
    start: int
    stop: int


def _groups(run_numbers: IntArray, smks: IntArray) -> list[_Group] | None:
    """Contiguous (run, SMK) row ranges, or ``None`` when a pair comes back after another."""
    if len(run_numbers) == 0:
        return []
    change = np.flatnonzero((np.diff(run_numbers) != 0) | (np.diff(smks) != 0)) + 1
    starts = np.concatenate(([0], change))
    stops = np.concatenate((change, [len(run_numbers)]))
    groups = [
        _Group(int(run_numbers[s]), int(smks[s]), int(s), int(e))
        for s, e in zip(starts, stops, strict=True)
    ]
    if len({(g.run_number, g.smk) for g in groups}) != len(groups):
        return None
    return groups


def build_trigger_index(table: pa.Table) -> pa.Table:
    """The index table of one master file's rows (``run_number``, ``smk`` and the four
    mask columns are needed; row ordinals are positions in ``table``)."""
    missing = [name for name in INDEX_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"cannot index triggers: columns {missing} are missing")
    if table.num_rows >= MAX_FILE_ROWS:
        raise ValueError(f"cannot index {table.num_rows} rows in one file (limit {MAX_FILE_ROWS})")
    run_numbers = table.column("run_number").to_numpy().astype(np.int64)
    smks = table.column("smk").to_numpy().astype(np.int64)
    groups = _groups(run_numbers, smks)
    pair_of_row: IntArray | None = None
    if groups is None:
        # Rows of one (run, SMK) are scattered: label each row with its pair's ordinal.
        pairs = np.stack([run_numbers, smks], axis=1)
        unique, pair_of_row = np.unique(pairs, axis=0, return_inverse=True)
        pair_of_row = pair_of_row.reshape(-1)
        labels = [(int(r), int(s)) for r, s in unique]
    else:
        labels = [(g.run_number, g.smk) for g in groups]
        bounds = np.array([g.start for g in groups[1:]], dtype=np.int64)

    out_run: list[int] = []
    out_smk: list[int] = []
    out_mask: list[int] = []
    out_bit: list[int] = []
    out_card: list[int] = []
    out_bitmap: list[bytes] = []

    def emit(pair: int, mask: int, bit: int, rows: RowArray) -> None:
        bitmap = bitmap_of(rows)
        run_number, smk = labels[pair]
        out_run.append(run_number)
        out_smk.append(smk)
        out_mask.append(mask)
        out_bit.append(bit)
        out_card.append(len(bitmap))
        out_bitmap.append(bitmap.serialize())

    def split(rows: RowArray) -> list[tuple[int, RowArray]]:
        """Rows of one bit, cut by (run, SMK) pair: [(pair, rows)] without empty pieces."""
        if pair_of_row is None:
            cuts = np.searchsorted(rows, bounds, side="left")
            pieces = np.split(rows, cuts)
            return [(pair, piece) for pair, piece in enumerate(pieces) if len(piece)]
        pair_ids = pair_of_row[rows]
        order = np.argsort(pair_ids, kind="stable")
        sorted_ids = pair_ids[order]
        cuts = np.flatnonzero(np.diff(sorted_ids)) + 1
        return [
            (int(pair_ids[piece_order[0]]), rows[piece_order])
            for piece_order in np.split(order, cuts)
            if len(piece_order)
        ]

    every_row = np.arange(table.num_rows, dtype=np.uint32)
    for pair, rows in split(every_row):
        emit(pair, EVENTS_MASK, 0, rows)
    for name in TRIGGER_MASK_FIELDS:
        by_bit = bit_rows(mask_matrix(table.column(name)))
        for bit in sorted(by_bit):
            pieces = by_bit[bit]
            rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            for pair, piece in split(rows):
                emit(pair, MASK_CODES[name], bit, piece)
    index = pa.table(
        {
            "run_number": pa.array(out_run, pa.uint32()),
            "smk": pa.array(out_smk, pa.uint32()),
            "mask": pa.array(out_mask, pa.uint8()),
            "bit": pa.array(out_bit, pa.uint32()),
            "cardinality": pa.array(out_card, pa.uint64()),
            "bitmap": pa.array(out_bitmap, pa.binary()),
        },
        schema=INDEX_SCHEMA,
    )
    return index.sort_by([(name, "ascending") for name in INDEX_KEY])


IndexKey = tuple[int, int, int, int]


class LoadedIndex:
    """One trigger index in memory: bitmaps deserialised on first use and kept.

    ``groups`` lists the (run, SMK) pairs of the indexed file with their event
    counts; ``bitmap`` answers one (run, SMK, mask, bit), empty when no row has it.
    """

    def __init__(self, table: pa.Table) -> None:
        keys = [table.column(name).to_numpy() for name in INDEX_KEY]
        self._position: dict[IndexKey, int] = {
            (int(r), int(s), int(m), int(b)): i
            for i, (r, s, m, b) in enumerate(zip(*keys, strict=True))
        }
        self._serialized = table.column("bitmap").combine_chunks()
        self._bitmaps: dict[int, BitMap] = {}
        self.nbytes = int(self._serialized.nbytes)
        cardinality = table.column("cardinality").to_numpy()
        self.groups: dict[tuple[int, int], int] = {
            (key[0], key[1]): int(cardinality[i])
            for key, i in self._position.items()
            if key[2] == EVENTS_MASK
        }

    def bitmap(self, run_number: int, smk: int, mask: int, bit: int) -> BitMap | FrozenBitMap:
        position = self._position.get((run_number, smk, mask, bit))
        if position is None:
            return _EMPTY
        bitmap = self._bitmaps.get(position)
        if bitmap is None:
            bitmap = BitMap.deserialize(self._serialized[position].as_py())
            self._bitmaps[position] = bitmap
        return bitmap

    def events(self, run_number: int, smk: int) -> BitMap | FrozenBitMap:
        return self.bitmap(run_number, smk, EVENTS_MASK, 0)


_EMPTY = FrozenBitMap()
