"""Input readers of ``produce extract``: JSON lines, CSV and ROOT files → event tables.

Every reader returns a table with exactly ``EVENT_SCHEMA`` or raises
``ValidationError`` naming the file, the field and the reason.

* JSON lines: as ``eventindex.records.jsonl`` writes them (one object per event).
* CSV: a header line naming every ``EVENT_SCHEMA`` field; flags ``true``/``false``
  or ``1``/``0``; trigger masks as hex strings (bit ``i`` = bit ``i % 8`` of byte
  ``i // 8``); ``references`` as space-separated ``FORMAT:GUID:POSITION`` items.
* ROOT (extra ``root``, through uproot): a TTree (default ``EventIndex``) with a
  branch per scalar field, and the trigger masks as variable-length ``uint8``
  branches. The references of a ROOT input are the file itself: the event's
  entry number in the tree, under the input file's format and GUID (given by
  the caller, as the processing job knows them).
"""

from __future__ import annotations

import csv
import enum
import re
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from eventindex.errors import MissingExtraError, ValidationError
from eventindex.records.jsonl import read_jsonl
from eventindex.records.schema import EVENT_SCHEMA, REFERENCE_TYPE, TRIGGER_MASK_FIELDS

_GUID_PATTERN: Final = (
    r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"
)
_FORMAT_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_SCALAR_FIELDS: Final = tuple(
    f.name for f in EVENT_SCHEMA if f.name not in TRIGGER_MASK_FIELDS and f.name != "references"
)
DEFAULT_TREE: Final = "EventIndex"


class InputFormat(enum.StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    ROOT = "root"


_SUFFIXES: Final = {
    ".jsonl": InputFormat.JSONL,
    ".ndjson": InputFormat.JSONL,
    ".json": InputFormat.JSONL,
    ".csv": InputFormat.CSV,
    ".root": InputFormat.ROOT,
}


def detect_format(path: Path) -> InputFormat:
    """The input format from the file name's suffix."""
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(_SUFFIXES))
        raise ValidationError(
            f"{path}: cannot tell the input format from the suffix {path.suffix!r} "
            f"(known: {known}); name it with --format"
        ) from None


def _hex_masks(path: Path, name: str, column: pa.ChunkedArray) -> pa.Array:
    """A binary array from a column of hex strings, checked in bulk."""
    values = column.combine_chunks()
    if values.null_count:
        row = pc.index(pc.is_null(values), True).as_py()
        raise ValidationError(f"{path}: row {row}: field {name!r}: empty value")
    texts = values.to_pylist()
    joined = "".join(texts)
    try:
        data = bytes.fromhex(joined)
    except ValueError:
        data = None
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    if data is None or (lengths & 1).any():
        for row, text in enumerate(texts):
            if len(text) % 2 or re.fullmatch(r"[0-9A-Fa-f]*", text) is None:
                raise ValidationError(
                    f"{path}: row {row}: field {name!r}: not a hex string of whole bytes: "
                    f"{text[:40]!r}"
                )
        raise ValidationError(f"{path}: field {name!r}: not hex strings")  # pragma: no cover
    offsets = np.zeros(len(texts) + 1, dtype=np.int32)
    np.cumsum(lengths // 2, out=offsets[1:])
    return pa.Array.from_buffers(
        pa.binary(), len(texts), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def _first_false(mask: pa.Array) -> int:
    return int(np.flatnonzero(~mask.to_numpy(zero_copy_only=False))[0])


def _csv_references(path: Path, column: pa.ChunkedArray) -> pa.Array:
    """``FORMAT:GUID:POSITION FORMAT:GUID:POSITION ...`` per row → list of reference structs."""
    values = pc.fill_null(column.combine_chunks(), "")
    items = pc.split_pattern(pc.utf8_trim_whitespace(values), " ")
    # An empty cell means no references, not one empty reference.
    items = pc.if_else(pc.equal(values, ""), pa.scalar([], pa.list_(pa.string())), items)
    flat = pc.list_flatten(items)
    rows = pc.list_parent_indices(items)
    parts = pc.split_pattern(flat, ":")
    good = pc.equal(pc.list_value_length(parts), 3)
    if not pc.all(good).as_py() and len(flat):
        bad = _first_false(good)
        raise ValidationError(
            f"{path}: row {rows[bad].as_py()}: field 'references': expected "
            f"FORMAT:GUID:POSITION, got {flat[bad].as_py()!r}"
        )
    formats = pc.list_element(parts, 0) if len(flat) else pa.array([], pa.string())
    guids = pc.list_element(parts, 1) if len(flat) else pa.array([], pa.string())
    positions_text = pc.list_element(parts, 2) if len(flat) else pa.array([], pa.string())
    for what, array, pattern in (
        ("format", formats, _FORMAT_PATTERN),
        ("guid", guids, _GUID_PATTERN),
        ("position", positions_text, r"^[0-9]{1,20}$"),
    ):
        matches = pc.match_substring_regex(array, pattern)
        if len(array) and not pc.all(matches).as_py():
            bad = _first_false(matches)
            raise ValidationError(
                f"{path}: row {rows[bad].as_py()}: field 'references': bad {what} "
                f"{array[bad].as_py()!r}"
            )
    try:
        positions = pc.cast(positions_text, pa.uint64())
    except pa.ArrowInvalid as exc:
        raise ValidationError(f"{path}: field 'references': position: {exc}") from None
    structs = pa.StructArray.from_arrays([formats, guids, positions], fields=list(REFERENCE_TYPE))
    offsets = items.offsets
    return pa.ListArray.from_arrays(offsets, structs, type=EVENT_SCHEMA.field("references").type)


def _name_csv_column(path: Path, message: str) -> str:
    """Arrow says ``CSV column #3``: say which field that is."""
    match = re.search(r"CSV column #(\d+)", message)
    if match is None:
        return message
    with path.open(newline="") as handle:
        names = next(csv.reader(handle), [])
    index = int(match.group(1))
    if index >= len(names):
        return message
    return message.replace(match.group(0), f"CSV column #{index} ({names[index]!r})")


def read_csv(path: Path) -> pa.Table:
    types: dict[str, pa.DataType] = {name: EVENT_SCHEMA.field(name).type for name in _SCALAR_FIELDS}
    types |= {name: pa.string() for name in (*TRIGGER_MASK_FIELDS, "references")}
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                true_values=["true", "True", "1"],
                false_values=["false", "False", "0"],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise ValidationError(f"{path}: {_name_csv_column(path, str(exc))}") from None
    missing = [name for name in EVENT_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValidationError(f"{path}: missing column {missing[0]!r}")
    unknown = sorted(set(table.column_names) - set(EVENT_SCHEMA.names))
    if unknown:
        raise ValidationError(f"{path}: unknown column {unknown[0]!r}")
    arrays: list[Any] = []
    for field in EVENT_SCHEMA:
        column = table.column(field.name)
        if field.name in TRIGGER_MASK_FIELDS:
            arrays.append(_hex_masks(path, field.name, column))
        elif field.name == "references":
            arrays.append(_csv_references(path, column))
        else:
            if column.null_count:
                row = pc.index(pc.is_null(column), True).as_py()
                raise ValidationError(f"{path}: row {row}: field {field.name!r}: empty value")
            arrays.append(column)
    return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)


def write_csv(table: pa.Table, path: Path) -> None:
    """Write an ``EVENT_SCHEMA`` table in the CSV layout ``read_csv`` reads."""
    columns: dict[str, Any] = {}
    for field in EVENT_SCHEMA:
        column = table.column(field.name)
        if field.name in TRIGGER_MASK_FIELDS:
            columns[field.name] = pa.array([v.hex() for v in column.to_pylist()], pa.string())
        elif field.name == "references":
            columns[field.name] = pa.array(
                [
                    " ".join(f"{r['format']}:{r['guid']}:{r['position']}" for r in refs)
                    for refs in column.to_pylist()
                ],
                pa.string(),
            )
        elif field.type == pa.bool_():
            columns[field.name] = pc.cast(column, pa.uint8())
        else:
            columns[field.name] = column
    pacsv.write_csv(pa.table(columns), path)


def read_root(path: Path, *, tree: str, input_format: str, input_guid: str) -> pa.Table:
    """Events of a ROOT TTree; each references its entry in this file (format, GUID)."""
    try:
        import uproot
    except ImportError:
        raise MissingExtraError("uproot", "root", "reading ROOT files") from None
    if re.fullmatch(_GUID_PATTERN, input_guid) is None:
        raise ValidationError(f"input GUID {input_guid!r} is not an 8-4-4-4-12 hex GUID")
    if re.fullmatch(_FORMAT_PATTERN, input_format) is None:
        raise ValidationError(f"input format {input_format!r} is not a data format name")
    try:
        with uproot.open(path) as handle:
            if tree not in handle:
                raise ValidationError(f"{path}: no TTree {tree!r} (has: {sorted(handle.keys())})")
            ttree = handle[tree]
            missing = [
                name for name in (*_SCALAR_FIELDS, *TRIGGER_MASK_FIELDS) if name not in ttree
            ]
            if missing:
                raise ValidationError(f"{path}: tree {tree!r} has no branch {missing[0]!r}")
            scalars = ttree.arrays(list(_SCALAR_FIELDS), library="np")
            masks = ttree.arrays(list(TRIGGER_MASK_FIELDS), library="ak")
    except (OSError, ValueError, KeyError) as exc:
        raise ValidationError(f"{path}: cannot read as ROOT: {exc}") from None
    n = ttree.num_entries
    arrays: list[Any] = []
    for field in EVENT_SCHEMA:
        if field.name in _SCALAR_FIELDS:
            values = np.asarray(scalars[field.name])
            try:
                arrays.append(pa.array(values).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValidationError(f"{path}: branch {field.name!r}: {exc}") from None
        elif field.name in TRIGGER_MASK_FIELDS:
            arrays.append(_root_masks(path, field.name, masks[field.name]))
        else:
            positions = pa.array(np.arange(n, dtype=np.uint64))
            structs = pa.StructArray.from_arrays(
                [
                    pa.array([input_format] * n, pa.string()),
                    pa.array([input_guid.upper()] * n, pa.string()),
                    positions,
                ],
                fields=list(REFERENCE_TYPE),
            )
            offsets = pa.array(np.arange(n + 1, dtype=np.int32))
            arrays.append(
                pa.ListArray.from_arrays(
                    offsets, structs, type=EVENT_SCHEMA.field("references").type
                )
            )
    return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)


def _root_masks(path: Path, name: str, masks: Any) -> pa.Array:
    import awkward as ak

    counts = np.asarray(ak.num(masks, axis=1), dtype=np.int64)
    flat = np.asarray(ak.flatten(masks, axis=None))
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise ValidationError(f"{path}: branch {name!r}: mask bytes must be in [0, 255]")
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.Array.from_buffers(
        pa.binary(),
        len(counts),
        [None, pa.py_buffer(offsets), pa.py_buffer(flat.astype(np.uint8).tobytes())],
    )


def read_events(
    path: Path,
    input_format: InputFormat | None = None,
    *,
    tree: str = DEFAULT_TREE,
    root_format: str = "",
    root_guid: str = "",
) -> pa.Table:
    """Read one input file into an ``EVENT_SCHEMA`` table."""
    if not path.is_file():
        raise ValidationError(f"{path}: no such input file")
    chosen = input_format or detect_format(path)
    if chosen is InputFormat.JSONL:
        try:
            return read_jsonl(path)
        except ValidationError as exc:
            raise ValidationError(f"{path}: {exc}") from None
    if chosen is InputFormat.CSV:
        return read_csv(path)
    if not root_format or not root_guid:
        raise ValidationError(
            f"{path}: a ROOT input needs its own data format and GUID "
            "(--input-format, --input-guid): events reference their entry in it"
        )
    return read_root(path, tree=tree, input_format=root_format, input_guid=root_guid)
