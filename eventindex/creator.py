"""The Creator: new filesets from generated records, registered in the catalog.

Re-running with the same spec resumes: a dataset whose committed rows already
equal what the generator produces is skipped, and a dataset that an
interruption left with only some of its TagFiles gets the rows it lacks (its
stored files must hold exactly the generated rows of their key ranges), so an
interrupted ``generate`` can simply be started again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from catalog.base import Catalog
from catalog.fileset import FilesetWriter
from catalog.model import Collection, Dataset, FileKind, TagFile
from eventindex.errors import AlreadyExistsError, CatalogError
from eventindex.generator import GeneratorSpec, dataset_specs, generate_menus, iter_runs
from eventindex.records.schema import RecordKind, key_columns
from eventindex.storage import MapFileReader, sort_by_key
from eventindex.storage.keys import EncodedKeys, encode_key_columns


@dataclass
class CreateSummary:
    collection: str
    datasets_written: list[str] = field(default_factory=list)
    datasets_skipped: list[str] = field(default_factory=list)
    files: int = 0
    rows: int = 0
    bytes: int = 0


def ensure_collection(catalog: Catalog, name: str, kind: RecordKind) -> None:
    try:
        catalog.create_collection(Collection(name=name, kind=kind))
    except AlreadyExistsError:
        existing = catalog.get_collection(name)
        if existing.kind is not kind:
            raise CatalogError(
                f"collection {name!r} holds {existing.kind.value}, not {kind.value}"
            ) from None


def ensure_dataset(catalog: Catalog, dataset: Dataset) -> None:
    with contextlib.suppress(AlreadyExistsError):
        catalog.create_dataset(dataset)


def _encoded_keys(table: pa.Table, key: Sequence[str]) -> EncodedKeys:
    return encode_key_columns([table.column(k).to_numpy() for k in key])


def missing_rows(
    table: pa.Table, existing: Sequence[TagFile], key: Sequence[str]
) -> list[pa.Table]:
    """The contiguous pieces of ``table`` (sorted by ``key``) that no stored file holds.

    Every stored file must hold exactly the rows of ``table`` in its key range,
    else ``CatalogError``: the store was filled from another spec or seed.
    """
    keys = _encoded_keys(table, key)
    covered: list[tuple[int, int]] = []
    for entry in sorted(existing, key=lambda e: e.key_min):
        with MapFileReader(entry.uri) as reader:
            stored = _encoded_keys(reader.read(list(key)), key)
        start = int(np.searchsorted(keys, stored[0], side="left")) if len(stored) else 0
        stop = start + len(stored)
        if stop > len(keys) or not np.array_equal(keys[start:stop], stored):
            raise CatalogError(
                f"dataset {entry.dataset} already holds rows (file {entry.file_id}, keys "
                f"{entry.key_min}..{entry.key_max}) that this spec does not generate: "
                "use another store or seed"
            )
        if covered and start < covered[-1][1]:
            raise CatalogError(f"dataset {entry.dataset} holds overlapping files")
        covered.append((start, stop))
    pieces = []
    position = 0
    for start, stop in [*covered, (len(keys), len(keys))]:
        if start > position:
            pieces.append(table.slice(position, start - position))
        position = stop
    return pieces


def _same_range(table: pa.Table, existing: Sequence[TagFile], key: Sequence[str]) -> bool:
    first = tuple(table.column(k)[0].as_py() for k in key)
    last = tuple(table.column(k)[-1].as_py() for k in key)
    return (first, last) == (min(e.key_min for e in existing), max(e.key_max for e in existing))


def create_generated(
    spec: GeneratorSpec,
    catalog: Catalog,
    writer: FilesetWriter,
    *,
    file_rows: int = 2_000_000,
    progress: Callable[[int], None] | None = None,
) -> CreateSummary:
    """Generate every run of ``spec`` into the store, one or more TagFiles per dataset.

    ``file_rows`` caps the rows of one TagFile (a dataset is cut into
    contiguous key ranges); ``progress`` is called with each finished run.
    """
    if file_rows < 1:
        raise ValueError("file_rows must be at least 1")
    summary = CreateSummary(collection=spec.collection)
    ensure_collection(catalog, spec.collection, RecordKind.EVENTS)
    for menu in generate_menus(spec):
        catalog.put_trigger_menu(menu)
    datasets = {d.name: d for d in dataset_specs(spec)}
    for dataset in datasets.values():
        ensure_dataset(catalog, dataset)
    key = key_columns(RecordKind.EVENTS)
    for run_number, tables in iter_runs(spec):
        for name, generated in tables.items():
            existing = catalog.list_tagfiles(dataset=name, kinds=[FileKind.MASTER])
            stored = sum(f.rows for f in existing)
            table = sort_by_key(generated, key)
            if stored > table.num_rows:
                raise CatalogError(
                    f"dataset {name} already holds {stored} rows, more than the "
                    f"{table.num_rows} this spec generates: use another store or seed"
                )
            if existing and stored == table.num_rows and _same_range(table, existing, key):
                summary.datasets_skipped.append(name)
                continue
            # A resumed dataset gets only the rows that its stored files lack.
            for piece in missing_rows(table, existing, key) if existing else [table]:
                for start in range(0, piece.num_rows, file_rows):
                    entry = writer.write(piece.slice(start, file_rows), datasets[name])
                    summary.files += 1
                    summary.rows += entry.rows
                    summary.bytes += entry.bytes
            summary.datasets_written.append(name)
        if progress:
            progress(run_number)
    return summary
