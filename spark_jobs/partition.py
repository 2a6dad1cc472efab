"""The spatial partitioning job: a catalog table → chunk, overlap and director map-files.

Plan (driver): read the input (Parquet, CSV, or a dataset's master files),
refuse an existing dataset, bad positions and duplicate object ids before
anything is written. Transform (executors, no Spark
API): ``eventindex.spatial.partition`` assigns cells, overlap copies and file
groups per Arrow batch; each (file group, kind) is sorted in one sort and
written as one map-file holding a run of whole chunks;
the director rows, range-partitioned and sorted by object id, are written as
one director file per partition. A child table (rows keyed by their own id,
pointing at an object) is joined with its director's index instead: rows
whose object the director lacks are refused before anything is written, the
others go to their object's chunk and sub-chunk, one chunk file per file group
keyed (chunk, sub-chunk, object id, child id), no overlap and no director, as
``partition_children`` writes them, in the director's file groups. Main: the
driver registers the dataset (with the grid parameters) and every written file,
and commits each. A job that fails after writing removes what it wrote and
registered: the file ids of a run share a prefix, so even the files of a task
that failed after writing some are found; a driver that dies in between leaves
files that ``eventindex catalog verify`` reports as orphans.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog.base import Catalog
from catalog.model import FileKind, FileState, TagFile, new_file_id
from eventindex.config import Settings, SpatialSettings
from eventindex.errors import EventIndexError, NotFoundError, ValidationError
from eventindex.spatial.chunker import Chunker
from eventindex.spatial.partition import (
    CHUNK_ID,
    CHUNK_KEY,
    DEFAULT_COLUMNS,
    DIRECTOR_KEY,
    OBJECT_ID,
    SUB_CHUNK_ID,
    Columns,
    FileGroups,
    PartitionedWriter,
    PartitionSummary,
    assign_cells,
    chunk_write_options,
    director_write_options,
    file_pieces,
    input_tables,
    normalize,
    partition_children,
    partition_local,
    write_sorted,
)
from eventindex.storage import MapFileInfo, MapFileWriter, WriteOptions
from eventindex.storage.filesystem import delete_file, join, list_files

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

IS_OVERLAP = "_is_overlap"
FILE_GROUP = "_file_group"
WRITTEN_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("part", pa.string()),
        ("file_id", pa.string()),
        ("uri", pa.string()),
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
        ("checksum", pa.string()),
        ("key_min", pa.list_(pa.int64())),
        ("key_max", pa.list_(pa.int64())),
        ("chunks", pa.list_(pa.int64())),  # chunk ids with rows in a chunk file
    ]
)


# Hex digits of a file id that name the run which wrote the file.
RUN_PREFIX = 8


@dataclass(frozen=True)
class FileTarget:
    """Where executors write: the store folder of one dataset, and how; the file ids
    of one run begin with its ``run`` prefix."""

    folder: str  # <root>/<collection>/<dataset>
    dataset: str
    options: WriteOptions
    run: str = field(default_factory=lambda: new_file_id()[:RUN_PREFIX])

    def new_file_id(self) -> str:
        return self.run + new_file_id()[RUN_PREFIX:]

    def uri(self, kind: FileKind, file_id: str, part: str) -> str:
        name = f"{part}.{file_id}.parquet" if part else f"{file_id}.parquet"
        return join(self.folder, kind.value, name)

    def run_files(self) -> list[str]:
        """Every file of this run in place under the folder (committed or not)."""
        return [
            uri
            for uri in list_files(self.folder, ".parquet")
            if posixpath.basename(uri).split(".")[-2].startswith(self.run)
        ]


def _written(
    kind: FileKind, part: str, file_id: str, info: MapFileInfo, chunks: list[int] | None = None
) -> dict[str, Any]:
    return {
        "chunks": chunks or [],
        "kind": kind.value,
        "part": part,
        "file_id": file_id,
        "uri": info.uri,
        "rows": info.rows,
        "bytes": info.bytes,
        "checksum": info.checksum,
        "key_min": list(info.key_min),
        "key_max": list(info.key_max),
    }


# -- transforms (run on executors, tested on small tables) ----------------------


def assign_batch(table: pa.Table, groups: FileGroups, columns: Columns) -> pa.Table:
    """Home rows and overlap copies of one input batch, flagged by ``_is_overlap``,
    with the file group (``_file_group``) each goes to."""
    primary, overlap = assign_cells(normalize(table, columns), groups.chunker)
    both = pa.concat_tables(
        [
            primary.append_column(IS_OVERLAP, pa.array(np.zeros(primary.num_rows, bool))),
            overlap.append_column(IS_OVERLAP, pa.array(np.ones(overlap.num_rows, bool))),
        ]
    )
    index = groups.index_of(both.column(CHUNK_ID).to_numpy())
    return both.append_column(FILE_GROUP, pa.array(index.astype(np.int32)))


def child_batch(table: pa.Table, groups: FileGroups) -> pa.Table:
    """Child rows that carry their object's cells, with the file group each goes to
    (and ``_is_overlap`` false: children have no overlap copies)."""
    index = groups.index_of(table.column(CHUNK_ID).to_numpy())
    return table.append_column(IS_OVERLAP, pa.array(np.zeros(table.num_rows, bool))).append_column(
        FILE_GROUP, pa.array(index.astype(np.int32))
    )


def write_chunk_group(
    table: pa.Table,
    target: FileTarget,
    groups: FileGroups,
    key: tuple[str, ...] = CHUNK_KEY,
) -> pa.Table:
    """Write the rows of one (file group, kind) as a map-file sorted by ``key`` (the
    chunk key, with the child id after it for a child table)."""
    kind = FileKind.OVERLAP if table.column(IS_OVERLAP)[0].as_py() else FileKind.CHUNK
    rows = []
    for index, piece in file_pieces(table.drop_columns([IS_OVERLAP, FILE_GROUP]), groups):
        file_id = target.new_file_id()
        part = groups.part(index)
        meta = {"dataset": target.dataset, "kind": kind.value, "chunks": part}
        uri = target.uri(kind, file_id, part)
        options = chunk_write_options(target.options, piece.schema)
        info = write_sorted(piece, uri, key, options, meta)
        chunks = np.unique(piece.column(CHUNK_ID).to_numpy()).tolist()
        rows.append(_written(kind, part, file_id, info, chunks))
    return pa.Table.from_pylist(rows, WRITTEN_SCHEMA)


def write_director_part(batches: Iterator[pa.RecordBatch], target: FileTarget) -> pa.Table:
    """Write one partition of director rows (sorted by object id) as a director file."""
    file_id = target.new_file_id()
    uri = target.uri(FileKind.DIRECTOR, file_id, "")
    meta = {"dataset": target.dataset, "kind": FileKind.DIRECTOR.value}
    writer: MapFileWriter | None = None
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            table = pa.Table.from_batches([batch])
            if writer is None:
                options = director_write_options(target.options)
                writer = MapFileWriter(uri, table.schema, DIRECTOR_KEY, options, meta)
            writer.write(table)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        return WRITTEN_SCHEMA.empty_table()
    return pa.Table.from_pylist(
        [_written(FileKind.DIRECTOR, "", file_id, writer.close())], WRITTEN_SCHEMA
    )


# -- plan and main -----------------------------------------------------------------


def read_input(spark: SparkSession, source: str, uris: list[str] | None = None) -> DataFrame:
    """The input as a DataFrame: a dataset's files (``uris``), a CSV file, or Parquet."""
    if uris:
        return spark.read.parquet(*uris)
    if source.endswith((".csv", ".csv.gz")):
        return spark.read.csv(source, header=True, inferSchema=True)
    return spark.read.parquet(source)


def check_input(frame: DataFrame, columns: Columns) -> None:
    """Refuse bad positions and duplicate ids before any file is written."""
    from pyspark.sql import functions as sf

    missing = [c for c in (columns.object_id, columns.ra, columns.dec) if c not in frame.columns]
    if missing:
        raise ValidationError(f"input has no column(s) {missing} (columns: {frame.columns})")
    ra, dec, oid = sf.col(columns.ra), sf.col(columns.dec), sf.col(columns.object_id)
    good = (
        ra.isNotNull()
        & dec.isNotNull()
        & oid.isNotNull()
        & ~sf.isnan(ra)
        & ~sf.isnan(dec)
        & (ra >= 0.0)
        & (ra < 360.0)
        & (dec >= -90.0)
        & (dec <= 90.0)
    )
    bad = frame.filter(~good).select(oid, ra, dec).limit(1).collect()
    if bad:
        row = bad[0]
        raise ValidationError(
            f"object {row[0]}: ra must be in [0, 360) and dec in [-90, 90] degrees, "
            f"none NaN or null; got ra={row[1]}, dec={row[2]}"
        )
    twice = frame.groupBy(oid).count().filter(sf.col("count") > 1).limit(1).collect()
    if twice:
        raise ValidationError(
            f"object_id {twice[0][0]} occurs more than once: a director table needs unique ids"
        )


def _arrow_to_spark(schema: pa.Schema) -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def run_partition(
    spark: SparkSession,
    frame: DataFrame,
    writer: PartitionedWriter,
    *,
    columns: Columns = DEFAULT_COLUMNS,
    director_partitions: int | None = None,
) -> PartitionSummary:
    """Partition ``frame`` on Spark and register every file through ``writer``."""
    from pyspark.sql import functions as sf

    started = time.perf_counter()
    check_input(frame, columns)
    groups = writer.groups
    sample = pa.Schema.from_pandas(frame.limit(0).toPandas(), preserve_index=False)
    assigned_schema = assign_batch(sample.empty_table(), groups, columns).schema
    target = _target(writer)

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield from assign_batch(pa.Table.from_batches([batch]), groups, columns).to_batches()

    assigned = frame.mapInArrow(assign, _arrow_to_spark(assigned_schema))
    written_type = _arrow_to_spark(WRITTEN_SCHEMA)
    chunk_files = assigned.groupBy(FILE_GROUP, IS_OVERLAP).applyInArrow(
        lambda table: write_chunk_group(table, target, groups), written_type
    )
    parts = director_partitions or max(1, spark.sparkContext.defaultParallelism)
    director_files = (
        assigned.filter(~sf.col(IS_OVERLAP))
        .select(OBJECT_ID, CHUNK_ID, SUB_CHUNK_ID)
        .repartitionByRange(parts, OBJECT_ID)
        .sortWithinPartitions(OBJECT_ID)
        .mapInArrow(
            lambda batches: (b for b in write_director_part(batches, target).to_batches()),
            written_type,
        )
    )
    _collect_and_register(writer, target, [chunk_files, director_files])
    writer.summary.seconds = time.perf_counter() - started
    return writer.summary


def check_children(frame: DataFrame, child_key: str) -> None:
    """Refuse child rows without an integer, non-null object id and child id, and
    columns the partitioner adds."""
    from pyspark.sql import functions as sf
    from pyspark.sql.types import ByteType, IntegerType, LongType, ShortType

    types = dict(frame.dtypes)
    reserved = sorted({CHUNK_ID, SUB_CHUNK_ID} & set(frame.columns))
    if reserved:
        raise ValidationError(f"input columns {reserved} are reserved for the partitioner")
    for name, role in ((OBJECT_ID, "object_id"), (child_key, "child key")):
        if name not in types:
            raise ValidationError(f"input has no {role} column {name!r} (columns: {frame.columns})")
        if not isinstance(
            frame.schema[name].dataType, ByteType | ShortType | IntegerType | LongType
        ):
            raise ValidationError(f"{role} column {name!r} has type {types[name]}")
    nulls = frame.select(
        *(sf.count(sf.when(sf.col(n).isNull(), 1)).alias(n) for n in (OBJECT_ID, child_key))
    ).collect()[0]
    for name in (OBJECT_ID, child_key):
        if nulls[name]:
            raise ValidationError(f"column {name!r} is null in {nulls[name]} rows")


def run_partition_children(
    frame: DataFrame, writer: PartitionedWriter, director_uris: list[str]
) -> PartitionSummary:
    """Partition the child table ``frame`` on Spark by its objects' cells in the
    director files ``director_uris``, and register every file through ``writer``
    (a child writer: it names the director and the child key)."""
    from pyspark.sql import functions as sf
    from pyspark.sql.types import BooleanType, IntegerType, StructField, StructType

    started = time.perf_counter()
    child_key = writer.chunk_key[-1]
    if writer.chunk_key == CHUNK_KEY:
        raise ValueError("run_partition_children needs a child table's writer")
    check_children(frame, child_key)
    spark = frame.sparkSession
    director = spark.read.parquet(*director_uris).select(OBJECT_ID, CHUNK_ID, SUB_CHUNK_ID)
    children = frame.withColumn(OBJECT_ID, sf.col(OBJECT_ID).cast("long"))
    orphans = (
        children.join(director, OBJECT_ID, "left_anti")
        .agg(sf.count(sf.lit(1)).alias("rows"), sf.min(OBJECT_ID).alias("first"))
        .collect()[0]
    )
    if orphans["rows"]:
        raise ValidationError(
            f"object_id {orphans['first']} of a child row is not in the director table "
            f"({orphans['rows']} rows point at unknown objects)"
        )
    placed = children.join(director, OBJECT_ID, "inner").select(
        *children.columns, CHUNK_ID, SUB_CHUNK_ID
    )
    groups = writer.groups
    grouped_type = StructType(
        [
            *placed.schema.fields,
            StructField(IS_OVERLAP, BooleanType(), False),
            StructField(FILE_GROUP, IntegerType(), False),
        ]
    )
    target = _target(writer)
    key = writer.chunk_key

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield from child_batch(pa.Table.from_batches([batch]), groups).to_batches()

    chunk_files = (
        placed.mapInArrow(assign, grouped_type)
        .groupBy(FILE_GROUP)
        .applyInArrow(
            lambda table: write_chunk_group(table, target, groups, key),
            _arrow_to_spark(WRITTEN_SCHEMA),
        )
    )
    _collect_and_register(writer, target, [chunk_files])
    writer.summary.seconds = time.perf_counter() - started
    return writer.summary


def _target(writer: PartitionedWriter) -> FileTarget:
    return FileTarget(
        folder=join(writer.files.root, writer.dataset.collection, writer.dataset.name),
        dataset=writer.dataset.name,
        options=writer.files.options,
    )


def _collect_and_register(
    writer: PartitionedWriter, target: FileTarget, jobs: list[DataFrame]
) -> None:
    """Run the writing jobs, then register what they wrote; on any failure remove
    every entry registered and every file of the run, reported or not (a task that
    fails after writing some files reports none)."""
    written: list[dict[str, Any]] = []
    try:
        for files in jobs:
            written.extend(r.asDict() for r in files.toLocalIterator())
        register_written(writer, written)
    except BaseException:
        writer.discard()
        for row in written:  # entries registered but not committed
            with contextlib.suppress(EventIndexError):
                writer.catalog.remove_tagfile(row["file_id"])
        for uri in target.run_files():
            with contextlib.suppress(EventIndexError, OSError):
                delete_file(uri)
        raise


def register_written(writer: PartitionedWriter, written: list[dict[str, Any]]) -> None:
    """Register files written by executors (``writing``), then commit each one."""
    entries = [
        TagFile(
            file_id=row["file_id"],
            dataset=writer.dataset.name,
            collection=writer.dataset.collection,
            kind=FileKind(row["kind"]),
            uri=row["uri"],
            part=row["part"],
            state=FileState.WRITING,
        )
        for row in written
    ]
    if not entries:
        raise ValidationError("the input holds no rows")
    writer.ensure_dataset()
    writer.catalog.add_tagfiles(entries)
    chunks: set[int] = set()
    for entry, row in zip(entries, written, strict=True):
        info = MapFileInfo(
            uri=row["uri"],
            rows=row["rows"],
            bytes=row["bytes"],
            checksum=row["checksum"],
            key_min=tuple(row["key_min"]),
            key_max=tuple(row["key_max"]),
            row_groups=0,
        )
        writer.commit(entry, info)
        if entry.kind is FileKind.CHUNK:
            writer.summary.rows += info.rows
            chunks.update(row["chunks"])
        elif entry.kind is FileKind.OVERLAP:
            writer.summary.overlap_rows += info.rows
    writer.summary.chunks = len(chunks)


def chunker_of(settings: SpatialSettings) -> Chunker:
    """The grid that the ``[spatial]`` settings describe."""
    return Chunker(settings.num_stripes, settings.num_sub_stripes, settings.overlap_arcsec / 3600.0)


def partition_catalog(
    settings: Settings,
    catalog: Catalog,
    source: str,
    catalog_name: str,
    table: str = "Object",
    *,
    columns: Columns = DEFAULT_COLUMNS,
    spark: SparkSession | None = None,
    director: str | None = None,
    child_key: str | None = None,
) -> PartitionSummary:
    """Partition ``source`` (Parquet, CSV or a dataset) into ``<catalog_name>.<table>``,
    on Spark when a session is given, else in this process. With ``director`` (a
    partitioned table) and ``child_key``, ``source`` is a child table: its rows go to
    their object's chunk and sub-chunk, in the director's grid and file groups (the
    ``[spatial]`` grid and ``chunks_per_file`` settings are for object tables)."""
    spatial = settings.spatial
    options = WriteOptions(
        row_group_rows=spatial.row_group_rows,
        compression=spatial.compression,
        # The [mapfile] level is zstd's; other codecs take their own default.
        compression_level=(
            settings.mapfile.compression_level if spatial.compression == "zstd" else None
        ),
    )
    uris = dataset_uris(catalog, source)
    if director is not None:
        return _partition_children(
            settings,
            catalog,
            source,
            catalog_name,
            table,
            director,
            child_key,
            options,
            spark,
            uris,
        )
    # The writer first: it refuses an existing table before any work, and registers
    # nothing before its first file.
    writer = PartitionedWriter(
        catalog,
        settings.store.root,
        catalog_name,
        table,
        chunker_of(spatial),
        options,
        chunks_per_file=spatial.chunks_per_file,
    )
    if spark is not None:
        return run_partition(spark, read_input(spark, source, uris), writer, columns=columns)
    with writer.undo_on_failure():
        return partition_local(
            input_tables(source, catalog),
            writer,
            columns=columns,
            memory_bytes=spatial.partition_memory_bytes,
        )


def dataset_uris(catalog: Catalog, source: str) -> list[str] | None:
    """The master files of ``source`` when it names a dataset of the catalog."""
    try:
        catalog.get_dataset(source)
    except NotFoundError:
        return None
    uris = [e.uri for e in catalog.list_tagfiles(dataset=source, kinds=[FileKind.MASTER])]
    if not uris:
        raise ValidationError(f"dataset {source!r} has no committed master files")
    return uris


def _partition_children(
    settings: Settings,
    catalog: Catalog,
    source: str,
    catalog_name: str,
    table: str,
    director: str,
    child_key: str | None,
    options: WriteOptions,
    spark: SparkSession | None,
    uris: list[str] | None,
) -> PartitionSummary:
    from eventindex.query.objects import ObjectCatalogs

    if not child_key:
        raise ValidationError("a child table needs --child-key, the column of its own id")
    objects = ObjectCatalogs(catalog).table(director)
    try:
        writer = PartitionedWriter(
            catalog,
            settings.store.root,
            catalog_name,
            table,
            objects.chunker,
            options,
            director=objects.name,
            child_key=child_key,
        )
        if spark is None:
            return partition_children(input_tables(source, catalog), writer, objects.locate_many)
        directors = catalog.list_tagfiles(dataset=objects.name, kinds=[FileKind.DIRECTOR])
        frame = read_input(spark, source, uris)
        return run_partition_children(frame, writer, [e.uri for e in directors])
    finally:
        objects.close()
