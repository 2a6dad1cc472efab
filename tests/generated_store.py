"""A store and SQLite catalog filled by the Creator from a small generator spec.

Tests of the Creator, the Reader, verify and the CLI build one with
``GeneratedStore.create`` and compare what they read back with
``tables``: what the generator produced, dataset by dataset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from catalog import Dataset, SQLiteCatalog
from catalog.fileset import FilesetWriter
from eventindex.creator import CreateSummary, create_generated
from eventindex.generator import GeneratorSpec, dataset_specs, generate_run
from eventindex.storage import WriteOptions

SMALL_SPEC = GeneratorSpec(runs=2, events_per_run=3000)
# Small row groups, so a lookup has several to choose from even in small files.
SMALL_ROW_GROUPS = WriteOptions(row_group_rows=1024)


@dataclass
class GeneratedStore:
    spec: GeneratorSpec
    root: Path
    catalog_path: Path
    catalog: SQLiteCatalog
    writer: FilesetWriter
    summary: CreateSummary

    @classmethod
    def create(
        cls, directory: Path, spec: GeneratorSpec = SMALL_SPEC, file_rows: int = 2_000_000
    ) -> GeneratedStore:
        root = directory / "store"
        catalog_path = directory / "catalog.sqlite"
        catalog = SQLiteCatalog(str(catalog_path))
        writer = FilesetWriter(catalog, str(root), SMALL_ROW_GROUPS)
        summary = create_generated(spec, catalog, writer, file_rows=file_rows)
        return cls(spec, root, catalog_path, catalog, writer, summary)

    @functools.cached_property
    def tables(self) -> dict[str, pa.Table]:
        """Dataset name -> the table the generator produced for it."""
        tables: dict[str, pa.Table] = {}
        for run_number in self.spec.run_numbers:
            tables.update(generate_run(self.spec, run_number))
        return tables

    @functools.cached_property
    def datasets(self) -> dict[str, Dataset]:
        return {d.name: d for d in dataset_specs(self.spec)}

    def dataset(self, run_number: int, fmt: str, tag: str = "") -> str:
        """The name of the run's dataset of one format (and processing tag)."""
        for processing in self.spec.processings:
            if processing.format == fmt and processing.tag.startswith(tag):
                return self.spec.dataset_name(run_number, processing)
        raise KeyError((run_number, fmt, tag))

    def close(self) -> None:
        self.catalog.close()
