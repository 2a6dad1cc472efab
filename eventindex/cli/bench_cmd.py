"""``eventindex bench NAME [ARGS...]``: run a benchmark from ``benchmarks/``."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated

import typer

from eventindex.cli.context import OutputFormat, OutputOption, print_json, stdout
from eventindex.errors import NotFoundError


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)


def available() -> list[str]:
    import benchmarks

    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "common")


def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Benchmark name (see --help for the list).")],
    output: OutputFormat = OutputOption,
) -> None:
    """Run one benchmark and print its figures (one JSON object with --output json).

    Arguments after NAME go to the benchmark, e.g. `eventindex bench mapfile --events 1000000`.
    """
    if name not in available():
        raise NotFoundError(f"no benchmark {name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"benchmarks.{name}")
    result = module.run(list(ctx.args))
    if output is OutputFormat.JSON:
        from benchmarks.common import machine_info

        result.setdefault("machine", machine_info())
        print_json(result)
        return
    for key, value in result.items():
        stdout.print(f"{key:32} {value}")
