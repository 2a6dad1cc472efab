"""``eventindex check``: the consistency of a collection's datasets (a Spark job)."""

from __future__ import annotations

from typing import Annotated

import typer

from eventindex.cli.context import (
    EXIT_NOT_FOUND,
    OutputFormat,
    OutputOption,
    catalog_of,
    print_json,
    state,
    stderr,
    stdout,
)


def register(app: typer.Typer) -> None:
    app.command()(check)


def check(
    ctx: typer.Context,
    collection: Annotated[str, typer.Option("--collection", help="The collection to check.")],
    runs: Annotated[
        str | None, typer.Option("--runs", help="Run or inclusive range: 284484 or 284484-284490.")
    ] = None,
    store_report: Annotated[
        bool, typer.Option("--store/--no-store", help="Store the report (served over HTTP).")
    ] = True,
    output: OutputFormat = OutputOption,
) -> None:
    """Check a collection: events per run and dataset, upstream events missing downstream,
    downstream events absent upstream, duplicated events (with the files holding each
    copy) and files missing from the store. Exit status 1 when a problem is found."""
    from eventindex.cli.spark_cmd import spark_of
    from eventindex.query.consistency import summary_lines
    from eventindex.query.triggers import parse_run_range
    from spark_jobs.consistency import plan_check, run_check, store_reports

    run_min = run_max = None
    if runs is not None:
        try:
            run_min, run_max = parse_run_range(runs)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--runs") from exc
    settings = state(ctx).settings
    with catalog_of(settings) as catalog:
        plan = plan_check(catalog, collection, run_min, run_max)
        if output is OutputFormat.TEXT:
            stderr.print(
                f"checking {len(plan.datasets)} datasets, {len(plan.files)} files "
                f"({len(plan.missing)} missing) on Spark ...",
                style="dim",
            )
        with spark_of(settings, local=False) as spark:
            assert spark is not None
            report = run_check(spark, plan)
        if store_report:
            store_reports(catalog, settings.store.root, report, plan)
    if output is OutputFormat.JSON:
        print_json(report)
    else:
        for line in summary_lines(report):
            stdout.print(line, markup=False)
    if report["problems"]:
        raise typer.Exit(EXIT_NOT_FOUND)
