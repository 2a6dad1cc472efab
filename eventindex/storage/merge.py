"""Pure table transforms behind compaction (the Appender) and vertical parts (the Extender).

* ``merge_tables``: many key-sorted tables (small TagFiles) into one, in key
  order, stable, so rows with equal keys keep the order of their inputs. The
  permutation is returned too: it reorders any table aligned row by row with
  the inputs (their extension parts) the same way.
* ``align_extension``: the rows of an extension table (columns computed
  elsewhere, keyed like the master) laid out in a master file's row order, so
  the extension file and the master file can be read side by side.

No Spark, no catalog: the jobs in ``spark_jobs`` call these on executors, and
the tests call them on small tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from eventindex.errors import ValidationError
from eventindex.storage.keys import EncodedKeys, decode_key_columns, encode_key_columns

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Key = tuple[int, ...]
# Keys quoted in an error or a report: enough to find the problem, not a flood.
SAMPLE_KEYS = 5


def encoded_keys(table: pa.Table, key: Sequence[str]) -> EncodedKeys:
    """The table's key columns as one sortable byte-string array (``storage.keys``)."""
    return encode_key_columns([table.column(name).to_numpy() for name in key])


def _decoded(encoded: EncodedKeys, table: pa.Table, key: Sequence[str]) -> list[Key]:
    dtypes = [np.dtype(table.schema.field(name).type.to_pandas_dtype()) for name in key]
    columns = decode_key_columns(encoded, dtypes)
    return [tuple(int(v) for v in row) for row in zip(*columns, strict=True)]


@dataclass(frozen=True)
class MergeResult:
    """The merged table; ``order[i]`` is the row of the concatenated inputs that became
    row ``i``; ``duplicates`` counts rows whose key equals the row before them
    (``duplicate_keys`` shows a few of those keys)."""

    table: pa.Table
    order: IntArray
    duplicates: int
    duplicate_keys: list[Key]


def merge_tables(tables: Sequence[pa.Table], key: Sequence[str]) -> MergeResult:
    """Concatenate ``tables`` (same schema) and sort the rows by ``key``, stably.

    Rows with equal keys are kept, every copy, next to each other in input
    order: compaction moves records, it does not decide which copy of a
    duplicated event is right (the consistency check lists them), and keeping
    every row is what keeps extension parts aligned with their master.
    """
    if not tables:
        raise ValueError("nothing to merge")
    schema = tables[0].schema
    for number, table in enumerate(tables[1:], start=1):
        if not table.schema.equals(schema, check_metadata=False):
            raise ValidationError(
                f"input {number} has another schema than input 0:\n{table.schema}\nvs\n{schema}"
            )
    combined = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    encoded = encoded_keys(combined, key)
    order = np.argsort(encoded, kind="stable").astype(np.int64)
    ordered = encoded[order]
    same = ordered[1:] == ordered[:-1] if len(ordered) > 1 else np.zeros(0, dtype=bool)
    duplicates = int(np.count_nonzero(same))
    sample = (
        _decoded(np.unique(ordered[1:][same])[:SAMPLE_KEYS], combined, key) if duplicates else []
    )
    already_sorted = bool(np.all(order[1:] > order[:-1])) if len(order) > 1 else True
    merged = combined if already_sorted else combined.take(pa.array(order))
    return MergeResult(merged, order, duplicates, sample)


def reorder_like(tables: Sequence[pa.Table], order: IntArray) -> pa.Table:
    """Concatenate ``tables`` (aligned row by row with a merge's inputs) and apply the
    merge's permutation, so row ``i`` lines up with row ``i`` of the merged table."""
    combined = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    if combined.num_rows != len(order):
        raise ValueError(f"{combined.num_rows} rows to reorder, the merge had {len(order)}")
    return combined.take(pa.array(order))


def cast_keys(table: pa.Table, key: Sequence[str], types: Sequence[pa.DataType]) -> pa.Table:
    """``table`` with its key columns cast to the master's key types (a CSV or Spark
    table has int64 where the master has uint32/uint64); ``ValidationError`` naming
    the column when a value does not fit or a column is missing or has nulls."""
    for name, wanted in zip(key, types, strict=True):
        if name not in table.column_names:
            raise ValidationError(f"key column {name!r} is missing (columns: {table.column_names})")
        column = table.column(name)
        if column.null_count:
            raise ValidationError(f"key column {name!r} has {column.null_count} empty values")
        if not pa.types.is_integer(column.type):
            raise ValidationError(f"key column {name!r} must hold integers, not {column.type}")
        if column.type != wanted:
            try:
                column = pc.cast(column, wanted)
            except pa.ArrowInvalid as exc:
                raise ValidationError(f"key column {name!r}: {exc}") from None
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def duplicate_extension_keys(extension: pa.Table, key: Sequence[str]) -> list[Key]:
    """A few keys that the extension table holds more than once (empty if none)."""
    encoded = np.sort(encoded_keys(extension, key))
    same = encoded[1:] == encoded[:-1] if len(encoded) > 1 else np.zeros(0, dtype=bool)
    return _decoded(np.unique(encoded[1:][same])[:SAMPLE_KEYS], extension, key)


@dataclass(frozen=True)
class Alignment:
    """An extension laid out in a master file's row order.

    ``table`` has the master's key columns, then the extension columns (null in
    the ``missing`` master rows that the extension has no row for);
    ``matched[j]`` says whether extension row ``j`` found its key in the master.
    """

    table: pa.Table
    matched: BoolArray
    missing: int


def align_extension(master_keys: pa.Table, extension: pa.Table, key: Sequence[str]) -> Alignment:
    """Lay out ``extension`` rows in the order of ``master_keys`` (a master file's key
    columns, in file order). The extension's key columns must have the master's types
    (``cast_keys``) and each key at most once (``ValidationError`` naming a few
    repeated keys otherwise); a master key held twice gets the same values twice."""
    master = encoded_keys(master_keys, key)
    ext = encoded_keys(extension, key)
    ext_order = np.argsort(ext, kind="stable")
    ext_sorted = ext[ext_order]
    if len(ext_sorted) > 1 and bool(np.any(ext_sorted[1:] == ext_sorted[:-1])):
        repeated = duplicate_extension_keys(extension, key)
        raise ValidationError(f"the extension holds keys more than once, e.g. {repeated}")
    found = np.zeros(len(master), dtype=bool)
    rows = np.zeros(len(master), dtype=np.int64)
    if len(ext_sorted):
        position = np.minimum(np.searchsorted(ext_sorted, master), len(ext_sorted) - 1)
        found = ext_sorted[position] == master
        rows = np.where(found, ext_order[position], 0)
    matched = np.zeros(extension.num_rows, dtype=bool)
    matched[rows[found]] = True
    payload = extension.drop_columns(list(key))
    indices = pa.array(rows.astype(np.int64), mask=~found)
    columns = payload.take(indices) if extension.num_rows else _nulls(payload.schema, len(master))
    fields = [master_keys.schema.field(name) for name in key]
    fields += [field.with_nullable(True) for field in payload.schema]
    table = pa.Table.from_arrays(
        [master_keys.column(name) for name in key] + list(columns.columns),
        schema=pa.schema(fields),
    )
    return Alignment(table, matched, int(len(master) - np.count_nonzero(found)))


def _nulls(schema: pa.Schema, rows: int) -> pa.Table:
    return pa.Table.from_arrays([pa.nulls(rows, field.type) for field in schema], schema=schema)


def unmatched_keys(extension: pa.Table, matched: BoolArray, key: Sequence[str]) -> list[Key]:
    """A few keys of extension rows that no master row took."""
    rows = np.flatnonzero(~matched)[:SAMPLE_KEYS]
    picked = extension.select(list(key)).take(pa.array(rows))
    return [tuple(int(v) for v in row.values()) for row in picked.to_pylist()]
