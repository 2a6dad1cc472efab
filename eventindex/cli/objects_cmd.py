"""``eventindex objects get|cone``: pick an object of a sky catalog, or search a cone."""

from __future__ import annotations

import csv
import enum
import sys
from typing import Annotated, Any

import typer

from eventindex.cli.context import EXIT_NOT_FOUND, catalog_of, print_json, print_wide, state

app = typer.Typer(help="Sky catalogs: pick an object by id, search a cone.", no_args_is_help=True)


class ObjectOutput(enum.StrEnum):
    TEXT = "text"
    JSON = "json"
    CSV = "csv"


OutputOption = typer.Option(ObjectOutput.TEXT, "--output", "-o", help="Output format.")
CatalogOption = Annotated[
    str | None,
    typer.Option(
        "--catalog-name",
        "-n",
        help="Object catalog (collection) or partitioned table (dataset); "
        "needed when there are several.",
    ),
]


def _show(rows: list[dict[str, Any]], output: ObjectOutput, title: str) -> None:
    if output is ObjectOutput.JSON:
        print_json({"catalog": title, "count": len(rows), "objects": rows})
        return
    if output is ObjectOutput.CSV:
        names = list(rows[0]) if rows else ["object_id", "ra", "dec"]
        writer = csv.DictWriter(sys.stdout, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
        return
    from rich.table import Table

    table = Table(title=f"{title}: {len(rows)} object{'s' if len(rows) != 1 else ''}")
    for name in rows[0] if rows else ["object_id", "ra", "dec"]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.9g}" if isinstance(v, float) else str(v) for v in row.values()))
    print_wide(table)


@app.command("get")
def get(
    ctx: typer.Context,
    object_id: Annotated[int, typer.Argument(help="Object id (int64).")],
    catalog_name: CatalogOption = None,
    output: ObjectOutput = OutputOption,
) -> None:
    """One object by id, through the director index (exit 1 if it is not there)."""
    from eventindex.query.objects import ObjectCatalogs

    settings = state(ctx).settings
    with catalog_of(settings) as catalog:
        table = ObjectCatalogs(catalog).table(catalog_name)
        try:
            found = table.get(object_id)
        finally:
            table.close()
    if found is None:
        typer.echo(f"object {object_id} is not in {table.name}", err=True)
        raise typer.Exit(EXIT_NOT_FOUND)
    _show([found], output, table.name)


@app.command("cone")
def cone_search(
    ctx: typer.Context,
    ra: Annotated[float, typer.Argument(help="Centre right ascension, degrees [0, 360).")],
    dec: Annotated[float, typer.Argument(help="Centre declination, degrees [-90, 90].")],
    radius_arcsec: Annotated[float, typer.Argument(help="Radius in arcseconds (> 0).")],
    catalog_name: CatalogOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many objects.")] = None,
    output: ObjectOutput = OutputOption,
) -> None:
    """Every object within the radius (exact angular distance), reading only the chunks
    the cone touches; exit 1 if there is none."""
    from eventindex.query.objects import ObjectCatalogs, cone

    region = cone(ra, dec, radius_arcsec)  # validated before the catalog is opened
    settings = state(ctx).settings
    with catalog_of(settings) as catalog:
        table = ObjectCatalogs(catalog).table(catalog_name)
        try:
            rows = table.search(region, limit=limit).to_pylist()
        finally:
            table.close()
    _show(rows, output, table.name)
    if not rows:
        raise typer.Exit(EXIT_NOT_FOUND)
