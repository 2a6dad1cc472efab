"""``eventindex spark <job>``: the Spark jobs, one command per job.

Each command plans from the catalog, runs the job on the session that the
``[spark]`` settings describe (``local[*]`` by default, any master URL), shows
progress on stderr and prints a summary. pyspark is imported only inside the
commands, so ``eventindex --help`` starts no JVM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress

from eventindex.cli.context import (
    OutputFormat,
    OutputOption,
    catalog_of,
    print_json,
    state,
    stderr,
    stdout,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from eventindex.config import Settings
    from eventindex.storage import WriteOptions
    from spark_jobs.sidecars import SidecarSummary

app = typer.Typer(help="Run the Spark jobs, one command per job.", no_args_is_help=True)

DatasetOption = Annotated[
    str, typer.Option("--dataset", "-d", help="Dataset name or glob pattern ('*.daq.RAW').")
]
CollectionOption = Annotated[
    str | None, typer.Option("--collection", help="Only datasets of this collection.")
]
LocalOption = Annotated[
    bool, typer.Option("--local", help="Run the transform in this process, without Spark.")
]


@contextmanager
def spark_of(settings: Settings, local: bool) -> Iterator[SparkSession | None]:
    """The configured Spark session for the length of a command (``None`` with --local)."""
    if local:
        yield None
        return
    from spark_jobs.session import python_for_workers, spark_session

    python_for_workers()
    session = spark_session(settings.spark)
    try:
        yield session
    finally:
        session.stop()


@contextmanager
def job_session(
    settings: Settings, local: bool, output: OutputFormat, label: str, tasks: Sized
) -> Iterator[tuple[SparkSession | None, Callable[[object], None]]]:
    """The session a planned job runs on (none with --local or with no tasks), and a
    progress callback that advances a bar on stderr (hidden with JSON output) per task."""
    with (
        spark_of(settings, local or not len(tasks)) as spark,
        Progress(console=stderr, transient=True, disable=output is OutputFormat.JSON) as bar,
    ):
        task = bar.add_task(label, total=len(tasks))
        yield spark, lambda _result: bar.advance(task)


def print_summary(summary: dict[str, Any], output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        print_json(summary)
        return
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        stdout.print(f"{key:30} {shown}")


def run_sidecar_job(
    ctx: typer.Context,
    plan: Callable[..., tuple[Sequence[object], int]],
    run: Callable[..., SidecarSummary],
    label: str,
    *,
    dataset: str,
    collection: str | None,
    rebuild: bool,
    local: bool,
    output: OutputFormat,
) -> None:
    """A job that writes a sidecar file per master file (``spark_jobs.sidecars``): plan,
    run, and print the summary with the masters skipped as having one already."""
    settings = state(ctx).settings
    with catalog_of(settings) as catalog:
        tasks, skipped = plan(
            catalog, settings.store.root, dataset, collection=collection, rebuild=rebuild
        )
        with job_session(settings, local, output, label, tasks) as (spark, progress):
            summary = run(catalog, tasks, spark=spark, progress=progress)
        summary.skipped = skipped
        print_summary(summary.to_dict(), output)


@app.command("index")
def index(
    ctx: typer.Context,
    dataset: DatasetOption,
    collection: CollectionOption = None,
    rebuild: Annotated[
        bool, typer.Option(help="Index files that have an index already (replacing it).")
    ] = False,
    local: LocalOption = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Build the inverted trigger index (a roaring bitmap per trigger bit) of every master
    file of the matching datasets, and register it in the catalog."""
    from spark_jobs.indexer import plan_index, run_index

    run_sidecar_job(
        ctx,
        plan_index,
        run_index,
        "indexing files",
        dataset=dataset,
        collection=collection,
        rebuild=rebuild,
        local=local,
        output=output,
    )


@app.command("locations")
def locations(
    ctx: typer.Context,
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help="Dataset name or glob pattern.")
    ] = "*",
    collection: CollectionOption = None,
    rebuild: Annotated[
        bool, typer.Option(help="Describe files that have a locations file already (replacing it).")
    ] = False,
    local: LocalOption = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Write the locations file (keys, attributes and references as memory-mapped arrays)
    of every master file of the matching event datasets, so picks and batch lookups read
    no Parquet, and register it in the catalog. Files added later answer through their
    map-files until this runs again."""
    from spark_jobs.locations import plan_locations, run_locations

    run_sidecar_job(
        ctx,
        plan_locations,
        run_locations,
        "describing files",
        dataset=dataset,
        collection=collection,
        rebuild=rebuild,
        local=local,
        output=output,
    )


@app.command("partition")
def partition(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(help="Parquet file or folder, CSV file, or a catalog dataset name.")
    ],
    catalog_name: Annotated[
        str, typer.Option("--catalog-name", "-n", help="Object catalog (collection) to fill.")
    ],
    table: Annotated[str, typer.Option(help="Table name (dataset CATALOG.TABLE).")] = "Object",
    id_column: Annotated[str, typer.Option(help="Column of the object id.")] = "object_id",
    ra_column: Annotated[str, typer.Option(help="Column of the right ascension.")] = "ra",
    dec_column: Annotated[str, typer.Option(help="Column of the declination.")] = "dec",
    director: Annotated[
        str | None,
        typer.Option(help="A child table: partition rows by this table's director index."),
    ] = None,
    child_key: Annotated[
        str | None, typer.Option(help="The child table's own id column (with --director).")
    ] = None,
    local: LocalOption = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Partition a sky catalog on the Qserv grid ([spatial] settings): chunk and overlap
    files sorted by sub-chunk then id, and the director index, registered in the catalog."""
    from eventindex.spatial.partition import Columns
    from spark_jobs.partition import partition_catalog

    settings = state(ctx).settings
    columns = Columns(id_column, ra_column, dec_column)
    with catalog_of(settings) as catalog, spark_of(settings, local) as spark:
        summary = partition_catalog(
            settings,
            catalog,
            source,
            catalog_name,
            table,
            columns=columns,
            spark=spark,
            director=director,
            child_key=child_key,
        )
    print_summary(summary.to_dict(), output)


@app.command("crossmatch")
def crossmatch(
    ctx: typer.Context,
    left: Annotated[str, typer.Argument(help="Left object catalog or table.")],
    right: Annotated[str, typer.Argument(help="Right object catalog or table (same grid).")],
    output_dir: Annotated[str, typer.Option("--output-dir", help="New folder for the pairs.")],
    radius_arcsec: Annotated[
        float, typer.Option(help="Match radius, at most the right table's overlap.")
    ] = 1.0,
    all_pairs: Annotated[
        bool, typer.Option("--all", help="Every pair within the radius, not the nearest.")
    ] = False,
    local: LocalOption = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Crossmatch two catalogs partitioned alike, chunk by chunk (nearest right object of
    each left object, or all pairs); LEFT = RIGHT is a near-neighbour self-join."""
    from eventindex.query.crossmatch import MatchMode, MatchSpec
    from spark_jobs.crossmatch import run_crossmatch

    settings = state(ctx).settings
    spec = MatchSpec(
        radius_arcsec, MatchMode.ALL if all_pairs else MatchMode.NEAREST, self_join=left == right
    )
    with catalog_of(settings) as catalog, spark_of(settings, local) as spark:
        summary = run_crossmatch(catalog, left, right, spec, output_dir, spark=spark)
    print_summary(summary.to_dict(), output)


def write_options(settings: Settings) -> WriteOptions:
    """Map-file layout from the ``[mapfile]`` settings."""
    from eventindex.storage import WriteOptions

    return WriteOptions(
        row_group_rows=settings.mapfile.row_group_rows,
        compression=settings.mapfile.compression,
        compression_level=settings.mapfile.compression_level,
    )


@app.command("compact")
def compact(
    ctx: typer.Context,
    dataset: DatasetOption,
    collection: CollectionOption = None,
    runs: Annotated[
        str | None,
        typer.Option(help="Only files whose runs lie inside FIRST-LAST (finished runs)."),
    ] = None,
    index: Annotated[
        bool, typer.Option(help="Build the trigger index of new files whose inputs had one.")
    ] = True,
    local: LocalOption = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Merge the small TagFiles of the matching datasets into large sorted map-files
    ([compaction] settings), retiring the inputs in the same catalog step."""
    from eventindex.errors import ValidationError
    from spark_jobs.compact import plan_compaction, run_compaction

    settings = state(ctx).settings
    run_range = None
    if runs is not None:
        first, _, last = runs.partition("-")
        try:
            run_range = (int(first), int(last or first))
        except ValueError:
            raise ValidationError(
                f"--runs {runs!r}: expected FIRST-LAST, e.g. 284484-284500"
            ) from None
    with catalog_of(settings) as catalog:
        tasks = plan_compaction(
            catalog,
            settings.store.root,
            dataset,
            settings.compaction,
            write_options(settings),
            collection=collection,
            run_range=run_range,
        )
        with job_session(settings, local, output, "compacting groups", tasks) as (spark, progress):
            summary = run_compaction(catalog, tasks, spark=spark, index=index, progress=progress)
    print_summary(summary.to_dict(), output)


@app.command("convert")
def convert(
    ctx: typer.Context,
    inputs: Annotated[
        list[str], typer.Argument(help="CSV or JSON-lines record files, or folders of them.")
    ],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to fill.")],
    collection: Annotated[
        str | None,
        typer.Option(help="Create the dataset (and event collection) if missing, in this one."),
    ] = None,
    data_format: Annotated[
        str, typer.Option("--data-format", help="Data format of a new dataset (AOD, RAW...).")
    ] = "",
    local: LocalOption = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Convert record files (the layouts `produce extract` reads) into sorted map-files
    of a dataset; files converted before are skipped (their content checksum is known)."""
    from catalog.model import Dataset
    from eventindex.creator import ensure_collection, ensure_dataset
    from eventindex.records.schema import RecordKind
    from producers.readers import read_events
    from spark_jobs.convert import plan_conversion, run_conversion

    settings = state(ctx).settings
    with catalog_of(settings) as catalog:
        if collection is not None:
            ensure_collection(catalog, collection, RecordKind.EVENTS)
            ensure_dataset(catalog, Dataset(dataset, collection, format=data_format))
        tasks, skipped = plan_conversion(
            catalog,
            settings.store.root,
            inputs,
            dataset,
            read_events,
            write_options(settings),
            target_bytes=settings.compaction.target_bytes,
        )
        with job_session(settings, local, output, "converting files", tasks) as (spark, progress):
            summary = run_conversion(catalog, tasks, spark=spark, progress=progress)
        summary.skipped_already_converted = skipped
    print_summary(summary.to_dict(), output)


@app.command("export")
def export(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to export.")],
    output_dir: Annotated[str, typer.Option("--output-dir", help="New folder for the files.")],
    local: LocalOption = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Write a dataset as plain Parquet partitioned by run (run_number=N/), for tools
    that read folders."""
    from spark_jobs.convert import export_dataset

    settings = state(ctx).settings
    with catalog_of(settings) as catalog, spark_of(settings, local) as spark:
        summary = export_dataset(catalog, dataset, output_dir, spark=spark)
    print_summary(summary, output)


@app.command("extend")
def extend(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(help="Parquet file or folder, or CSV file, keyed like the records.")
    ],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to extend.")],
    name: Annotated[
        str, typer.Option("--name", "-n", help="Extension (part) name; again to replace it.")
    ],
    columns: Annotated[
        list[str] | None, typer.Option("--column", "-c", help="Columns to add (default: all).")
    ] = None,
    source_format: Annotated[
        str | None, typer.Option("--format", help="parquet or csv (default: from the name).")
    ] = None,
    local: LocalOption = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Add columns computed elsewhere to a dataset as a vertical part: one extension file
    per master file, all registered in one catalog step; picks then return them."""
    from spark_jobs.extend import open_source, plan_extension, run_extension

    settings = state(ctx).settings
    with catalog_of(settings) as catalog:
        key = catalog.get_collection(catalog.get_dataset(dataset).collection).key
        opened = open_source(source, key, fmt=source_format, columns=columns)
        tasks = plan_extension(
            catalog, settings.store.root, dataset, name, opened, write_options(settings)
        )
        with job_session(settings, local, output, "extending files", tasks) as (spark, progress):
            summary = run_extension(catalog, tasks, spark=spark, progress=progress)
    print_summary(summary.to_dict(), output)
