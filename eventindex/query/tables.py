"""Scan tables: a name from a query resolved to an ordered list of units (map-files).

A table is what ``FROM`` names: a dataset, a collection (every dataset of it),
or a glob over dataset names (``data15_13TeV.*.RAW``). Its units are the
committed chunk files of each dataset when it is spatially partitioned (ordered
by chunk id), else its master TagFiles (ordered by key range). A scan walks the
units in that order; a key or region restriction keeps only the units whose
key range or column statistics can hold a match.

Every table also has the virtual column ``dataset`` (the dataset each row comes
from) unless its files hold a column of that name.
"""

from __future__ import annotations

import fnmatch
import math
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog.base import Catalog
from catalog.model import Dataset, FileKind, Key, TagFile
from eventindex.errors import NotFoundError, StorageError
from eventindex.query.open_files import OpenFiles
from eventindex.records.schema import RecordKind
from eventindex.storage import resolve

DATASET_COLUMN = "dataset"
_GLOB_CHARACTERS = frozenset("*?[")

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TableUnit:
    """One map-file of a table: the unit a scan reads and decodes at once."""

    file_id: str
    dataset: str
    uri: str
    rows: int
    key_min: Key
    key_max: Key
    part: str = ""

    @classmethod
    def of(cls, entry: TagFile) -> TableUnit:
        return cls(
            file_id=entry.file_id,
            dataset=entry.dataset,
            uri=entry.uri,
            rows=entry.rows,
            key_min=entry.key_min,
            key_max=entry.key_max,
            part=entry.part,
        )

    def may_hold(self, low: Key, high: Key) -> bool:
        """Whether keys in ``[low, high]`` (bounds on leading key columns) can be here."""
        width = len(low)
        return not (self.key_max[:width] < low or self.key_min[:width] > high)


@dataclass(frozen=True)
class ScanTable:
    """A resolved ``FROM`` table: its units in walk order, schema and key."""

    name: str
    collection: str
    kind: RecordKind
    key: tuple[str, ...]
    schema: pa.Schema
    units: tuple[TableUnit, ...]
    virtual_dataset: bool
    # Partitioning parameters (``spatial.*`` attributes) of each chunked dataset.
    grids: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def key_ordered(self) -> bool:
        """Whether every unit is a map-file of the collection key, so key ranges prune
        units and the key index reads them (chunk files sorted by sub-chunk are not)."""
        return all(len(unit.key_min) == len(self.key) for unit in self.units)

    @property
    def rows(self) -> int:
        return sum(unit.rows for unit in self.units)

    def file_columns(self, columns: Sequence[str]) -> list[str]:
        """The columns to read from the files (virtual ones are made, not read)."""
        return [c for c in columns if not (self.virtual_dataset and c == DATASET_COLUMN)]

    def read_unit(self, unit: TableUnit, columns: Sequence[str]) -> pa.Table:
        """Decode ``columns`` of the whole unit (one pass over the file)."""
        filesystem, path = resolve(unit.uri)
        try:
            table = pq.read_table(
                path, columns=self.file_columns(columns), filesystem=filesystem, use_threads=True
            )
        except FileNotFoundError as exc:
            raise StorageError(f"{unit.uri}: file of table {self.name!r} not found") from exc
        except (pa.ArrowException, OSError) as exc:
            raise StorageError(f"{unit.uri}: cannot read: {exc}") from exc
        return self._with_virtual(table, unit, columns)

    def read_key_ranges(
        self, unit: TableUnit, bounds: Sequence[tuple[Key, Key]], columns: Sequence[str]
    ) -> pa.Table:
        """The rows of ``unit`` inside any of the key ``bounds``, through the map-file's
        key index: only the row groups that can hold them are decoded."""
        wanted = self.file_columns(columns)
        pieces: list[pa.Table] = []
        reader = _OPEN_MAPFILES.open(unit.uri, unit.uri)
        for low, high in bounds:
            if unit.may_hold(low, high):
                pieces.extend(reader.scan(low, high, wanted))
        if not pieces:
            schema = pa.schema([self.schema.field(c) for c in wanted])
            table = schema.empty_table()
        else:
            table = pa.concat_tables(pieces)
        return self._with_virtual(table, unit, columns)

    def _with_virtual(self, table: pa.Table, unit: TableUnit, columns: Sequence[str]) -> pa.Table:
        if self.virtual_dataset and DATASET_COLUMN in columns:
            values = pa.repeat(pa.scalar(unit.dataset), table.num_rows)
            table = table.append_column(DATASET_COLUMN, values)
        return table.select(list(columns))


def _is_glob(name: str) -> bool:
    return any(ch in _GLOB_CHARACTERS for ch in name)


def _datasets_named(catalog: Catalog, name: str) -> list[Dataset]:
    if _is_glob(name):
        matched = [d for d in catalog.list_datasets() if fnmatch.fnmatchcase(d.name, name)]
        if not matched:
            raise NotFoundError(f"no dataset matches the table pattern {name!r}")
        return matched
    try:
        return [catalog.get_dataset(name)]
    except NotFoundError:
        pass
    try:
        catalog.get_collection(name)
    except NotFoundError:
        raise NotFoundError(
            f"no table {name!r}: name a dataset, a collection, or a dataset pattern with *"
        ) from None
    return catalog.list_datasets(name)


def _unit_order(unit: TableUnit) -> tuple[str, int, Key, str]:
    chunk = int(unit.part) if unit.part.lstrip("-").isdigit() else 0
    return (unit.dataset, chunk, unit.key_min, unit.file_id)


def _table_units(catalog: Catalog, datasets: list[Dataset]) -> list[TableUnit]:
    """Chunk files of partitioned datasets, master files of the others: one catalog
    query per collection, not per dataset."""
    wanted = {d.name for d in datasets}
    entries: list[TagFile] = []
    for collection in sorted({d.collection for d in datasets}):
        if len(wanted) == 1:
            entries += catalog.list_tagfiles(
                dataset=next(iter(wanted)), kinds=[FileKind.CHUNK, FileKind.MASTER]
            )
        else:
            entries += catalog.list_tagfiles(
                collection=collection, kinds=[FileKind.CHUNK, FileKind.MASTER]
            )
    chunked = {e.dataset for e in entries if e.kind is FileKind.CHUNK}
    return [
        TableUnit.of(e)
        for e in entries
        if e.dataset in wanted
        and e.kind is (FileKind.CHUNK if e.dataset in chunked else FileKind.MASTER)
    ]


def _resolve(catalog: Catalog, name: str) -> ScanTable:
    datasets = _datasets_named(catalog, name)
    collections = sorted({d.collection for d in datasets})
    kinds = {catalog.get_collection(c).kind for c in collections}
    if len(kinds) > 1:
        raise ValueError(f"table {name!r} mixes events and objects: {', '.join(collections)}")
    units = _table_units(catalog, datasets)
    if not units:
        raise NotFoundError(f"table {name!r} has no committed files")
    units.sort(key=_unit_order)
    collection = catalog.get_collection(collections[0])
    filesystem, path = resolve(units[0].uri)
    try:
        schema = pq.read_schema(path, filesystem=filesystem).remove_metadata()
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{units[0].uri}: cannot read the schema: {exc}") from exc
    virtual = DATASET_COLUMN not in schema.names
    if virtual:
        schema = schema.append(pa.field(DATASET_COLUMN, pa.string(), nullable=False))
    chunked = {u.dataset for u in units if u.part}
    grids = {
        d.name: dict(d.attributes)
        for d in datasets
        if d.name in chunked and any(k.startswith("spatial.") for k in d.attributes)
    }
    return ScanTable(
        name=name,
        collection=collection.name,
        kind=collection.kind,
        key=collection.key,
        schema=schema,
        units=tuple(units),
        virtual_dataset=virtual,
        grids=grids,
    )


_RESOLVED_LOCK = threading.Lock()
_RESOLVED: weakref.WeakKeyDictionary[Catalog, dict[str, tuple[float, ScanTable]]] = (
    weakref.WeakKeyDictionary()
)


def resolve_table(catalog: Catalog, name: str, *, max_age_seconds: float = 1.0) -> ScanTable:
    """The table ``name`` names, with its committed units in walk order.

    A table resolved less than ``max_age_seconds`` ago through the same catalog is
    reused (so interactive queries do not ask the catalog each time; new files show
    within that delay). ``NotFoundError`` for an unknown name or a table with no
    committed file; ``ValueError`` when a pattern spans events and objects.
    """
    now = time.monotonic()
    with _RESOLVED_LOCK:
        known = _RESOLVED.setdefault(catalog, {}).get(name)
    if known is not None and now - known[0] < max_age_seconds:
        return known[1]
    table = _resolve(catalog, name)
    with _RESOLVED_LOCK:
        tables = _RESOLVED.setdefault(catalog, {})
        if len(tables) > 256:
            tables.clear()
        tables[name] = (now, table)
    return table


# Recently used map-file readers for key-range reads, keyed by URI (files are immutable).
_OPEN_MAPFILES = OpenFiles(256)


# -- spherical geometry ----------------------------------------------------------


def angular_distance_deg(
    ra: npt.ArrayLike, dec: npt.ArrayLike, ra0: float, dec0: float
) -> FloatArray:
    """Great-circle distance in degrees from (ra0, dec0) to each (ra, dec), by the
    haversine formula (accurate at small separations, where cones are used)."""
    ra_rad = np.radians(np.asarray(ra, dtype=np.float64))
    dec_rad = np.radians(np.asarray(dec, dtype=np.float64))
    ra0_rad, dec0_rad = math.radians(ra0), math.radians(dec0)
    half = (
        np.sin((dec_rad - dec0_rad) / 2.0) ** 2
        + np.cos(dec_rad) * math.cos(dec0_rad) * np.sin((ra_rad - ra0_rad) / 2.0) ** 2
    )
    return np.asarray(np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(half, 0.0, 1.0)))))


def cone_ra_half_width(dec0: float, radius: float) -> float | None:
    """The largest right-ascension offset of a point of the cone, in degrees, or
    ``None`` when the cone holds a pole (every right ascension)."""
    if abs(dec0) + radius >= 90.0:
        return None
    return math.degrees(
        math.asin(min(1.0, math.sin(math.radians(radius)) / math.cos(math.radians(dec0))))
    )


@dataclass(frozen=True)
class Cone:
    """A circle on the sky: centre (ra, dec) and radius, in degrees."""

    ra_column: str
    dec_column: str
    ra: float
    dec: float
    radius: float

    def may_intersect(self, ra_range: tuple[float, float], dec_range: tuple[float, float]) -> bool:
        """Whether a box of positions (from column statistics) can hold a point of the cone."""
        if dec_range[1] < self.dec - self.radius or dec_range[0] > self.dec + self.radius:
            return False
        half = cone_ra_half_width(self.dec, self.radius)
        if half is None or half >= 180.0:
            return True
        low, high = self.ra - half, self.ra + half
        # Right ascension wraps: try the cone's interval shifted by a full turn either way.
        return any(
            low + shift <= ra_range[1] and high + shift >= ra_range[0]
            for shift in (-360.0, 0.0, 360.0)
        )


_STATS_LOCK = threading.Lock()
_STATS_CACHE: dict[
    tuple[str, str, str], tuple[tuple[float, float], tuple[float, float]] | None
] = {}


def _footer_ranges(
    unit: TableUnit, columns: tuple[str, str]
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    filesystem, path = resolve(unit.uri)
    metadata = pq.read_metadata(path, filesystem=filesystem)
    names = metadata.schema.to_arrow_schema().names
    lows = dict.fromkeys(columns, math.inf)
    highs = dict.fromkeys(columns, -math.inf)
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in columns:
            stats = row_group.column(names.index(column)).statistics
            if stats is None or not stats.has_min_max:
                return None
            lows[column] = min(lows[column], float(stats.min))
            highs[column] = max(highs[column], float(stats.max))
    ra, dec = columns
    return (lows[ra], highs[ra]), (lows[dec], highs[dec])


def _data_ranges(
    unit: TableUnit, columns: tuple[str, str]
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    filesystem, path = resolve(unit.uri)
    table = pq.read_table(path, columns=list(columns), filesystem=filesystem)
    if table.num_rows == 0:
        return None
    ra = pc.min_max(table.column(columns[0]))
    dec = pc.min_max(table.column(columns[1]))
    return (
        (float(ra["min"].as_py()), float(ra["max"].as_py())),
        (float(dec["min"].as_py()), float(dec["max"].as_py())),
    )


def position_ranges(
    unit: TableUnit, ra_column: str, dec_column: str, *, read_data: bool = True
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(ra min, max), (dec min, max) of a unit, or ``None`` when unknown.

    From the Parquet footer statistics when the file has them; else, with
    ``read_data``, from one read of the two columns. Files are immutable, so the
    answer is kept for the life of the process.
    """
    token = (unit.file_id, ra_column, dec_column)
    with _STATS_LOCK:
        if token in _STATS_CACHE:
            return _STATS_CACHE[token]
    columns = (ra_column, dec_column)
    try:
        ranges = _footer_ranges(unit, columns)
        if ranges is None and not read_data:
            return None
        if ranges is None:
            ranges = _data_ranges(unit, columns)
    except (pa.ArrowException, OSError, ValueError):
        ranges = None
    with _STATS_LOCK:
        _STATS_CACHE[token] = ranges
    return ranges
