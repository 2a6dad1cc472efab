"""``eventindex spark <job>``: the Spark jobs, one command per job.

Each command plans from the catalog, runs the job on the session that the
``[spark]`` settings describe (``local[*]`` by default, any master URL), shows
progress on stderr and prints a summary. pyspark is imported only inside the
commands, so ``eventindex --help`` starts no JVM.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def print_summary(summary: dict[str, Any], output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        print_json(summary)
        return
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        stdout.print(f"{key:30} {shown}")


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

    settings = state(ctx).settings
    with catalog_of(settings) as catalog:
        tasks, skipped = plan_index(
            catalog, settings.store.root, dataset, collection=collection, rebuild=rebuild
        )
        with (
            spark_of(settings, local or not tasks) as spark,
            Progress(console=stderr, transient=True, disable=output is OutputFormat.JSON) as bar,
        ):
            task = bar.add_task("indexing files", total=len(tasks))
            summary = run_index(
                catalog, tasks, spark=spark, progress=lambda _result: bar.advance(task)
            )
        summary.skipped = skipped
        print_summary(summary.to_dict(), output)


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
    with catalog_of(settings) as catalog, spark_of(settings, local or bool(director)) as spark:
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
