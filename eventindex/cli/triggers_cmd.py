"""``eventindex triggers count|overlap``: trigger counts from the inverted trigger index."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from eventindex.cli.context import (
    OutputFormat,
    OutputOption,
    catalog_of,
    print_json,
    print_wide,
    state,
    stdout,
)

if TYPE_CHECKING:
    from eventindex.query.triggers import TriggerCount, TriggerOverlap

app = typer.Typer(
    help="Count events passing trigger expressions, and trigger overlaps.", no_args_is_help=True
)

DatasetOption = Annotated[
    str, typer.Option("--dataset", "-d", help="Dataset name or glob pattern ('*.daq.RAW').")
]
CollectionOption = Annotated[
    str | None, typer.Option("--collection", help="Only datasets of this collection.")
]
RunsOption = Annotated[
    str | None, typer.Option("--runs", help="Run or inclusive run range: 284484 or 284484-284490.")
]


def _runs(runs: str | None) -> tuple[int | None, int | None]:
    from eventindex.query.triggers import parse_run_range

    if runs is None:
        return None, None
    try:
        return parse_run_range(runs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--runs") from exc


def _print_count(answer: TriggerCount, by_run: bool) -> None:
    stdout.print(
        f"{answer.passed:,} of {answer.events:,} events pass {answer.expression} "
        f"({answer.datasets} datasets, {answer.files} files, {answer.seconds * 1000:.1f} ms)"
    )
    if by_run:
        table = Table("run", "SMK", "events", "passed", "fraction")
        for run in sorted(answer.runs.values(), key=lambda r: (r.run_number, r.smk)):
            fraction = run.passed / run.events if run.events else 0.0
            table.add_row(
                str(run.run_number),
                str(run.smk),
                f"{run.events:,}",
                f"{run.passed:,}",
                f"{fraction:.4%}",
            )
        print_wide(table)


def _print_overlap(answer: TriggerOverlap) -> None:
    labels = [f"[{i}]" for i in range(len(answer.expressions))]
    for label, expression in zip(labels, answer.expressions, strict=True):
        stdout.print(f"{label} {expression}")
    table = Table("", *labels)
    for label, row in zip(labels, answer.matrix, strict=True):
        table.add_row(label, *(f"{value:,}" for value in row))
    print_wide(table)
    stdout.print(f"{answer.events:,} events, {answer.files} files, {answer.seconds * 1000:.1f} ms")


@app.command("count")
def count(
    ctx: typer.Context,
    expression: Annotated[
        str, typer.Argument(help="Trigger names with AND, OR, NOT and parentheses.")
    ],
    dataset: DatasetOption,
    collection: CollectionOption = None,
    runs: RunsOption = None,
    by_run: Annotated[bool, typer.Option("--by-run", help="Show the count of every run.")] = False,
    output: OutputFormat = OutputOption,
) -> None:
    """Count the events passing EXPRESSION, e.g.
    'HLT_e26_lhtight_nod0_ivarloose OR (HLT_mu26_ivarmedium AND NOT L1_XE50)'.
    L1 items mean their after-veto bit; add :TBP or :TAP for the other masks."""
    from eventindex.query.triggers import TriggerIndex

    run_min, run_max = _runs(runs)
    with catalog_of(state(ctx).settings) as catalog:
        try:
            answer = TriggerIndex(catalog).count(
                expression,
                dataset=dataset,
                collection=collection,
                run_min=run_min,
                run_max=run_max,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="EXPRESSION") from exc
    if output is OutputFormat.JSON:
        print_json(answer.to_dict())
    else:
        _print_count(answer, by_run)


@app.command("overlap")
def overlap(
    ctx: typer.Context,
    triggers: Annotated[
        list[str], typer.Argument(help="Trigger names (or expressions), two or more.")
    ],
    dataset: DatasetOption,
    collection: CollectionOption = None,
    runs: RunsOption = None,
    output: OutputFormat = OutputOption,
) -> None:
    """The overlap matrix: events passing both trigger i and trigger j (the diagonal is
    each trigger's own count)."""
    from eventindex.query.triggers import TriggerIndex

    run_min, run_max = _runs(runs)
    with catalog_of(state(ctx).settings) as catalog:
        try:
            answer = TriggerIndex(catalog).overlap(
                triggers,
                dataset=dataset,
                collection=collection,
                run_min=run_min,
                run_max=run_max,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="TRIGGERS") from exc
    if output is OutputFormat.JSON:
        print_json(answer.to_dict())
    else:
        _print_overlap(answer)
