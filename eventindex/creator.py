"""The Creator: new filesets from generated records, registered in the catalog.

Re-running with the same spec resumes: a dataset whose committed rows already
equal what the generator produces is skipped, so an interrupted ``generate``
can simply be started again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from catalog.base import Catalog
from catalog.fileset import FilesetWriter
from catalog.model import Collection, Dataset, FileKind
from eventindex.errors import AlreadyExistsError, CatalogError
from eventindex.generator import GeneratorSpec, dataset_specs, generate_menus, iter_runs
from eventindex.records.schema import RecordKind


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
    for run_number, tables in iter_runs(spec):
        for name, table in tables.items():
            existing = catalog.list_tagfiles(dataset=name, kinds=[FileKind.MASTER])
            stored = sum(f.rows for f in existing)
            if existing and stored == table.num_rows:
                summary.datasets_skipped.append(name)
                continue
            if existing:
                raise CatalogError(
                    f"dataset {name} already holds {stored} rows, not the {table.num_rows} "
                    "this spec generates: use another store or seed"
                )
            for start in range(0, table.num_rows, file_rows):
                entry = writer.write(table.slice(start, file_rows), datasets[name])
                summary.files += 1
                summary.rows += entry.rows
                summary.bytes += entry.bytes
            summary.datasets_written.append(name)
        if progress:
            progress(run_number)
    return summary
