"""``eventindex serve``: the HTTP service under uvicorn."""

from __future__ import annotations

import enum
import json
import os
import signal
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from eventindex.cli.context import CliState, state, stderr
from eventindex.config import ENV_CONFIG_FILE, ENV_PREFIX

APP_FACTORY = "webservice.app:app_from_environment"


class LogLevel(enum.StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


def register(app: typer.Typer) -> None:
    app.command()(serve)


def _toml_literal(value: Any) -> str:
    """``value`` as the text of an environment variable that ``load_config`` reads back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value  # strings are taken as they are unless they parse as TOML
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_item(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_item(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise typer.BadParameter(f"cannot pass {value!r} to the server processes")


def _toml_item(value: Any) -> str:
    # Inside arrays and tables strings need quotes; JSON's escapes are TOML's too.
    return json.dumps(value) if isinstance(value, str) else _toml_literal(value)


def export_settings(cli: CliState, environ: MutableMapping[str, str]) -> list[str]:
    """Put the global ``--config``/``--store``/``--catalog``/``--set`` options into
    ``environ`` as the variables ``load_config`` reads, so that every uvicorn worker
    builds the same settings. Returns the keys that cannot travel that way."""
    skipped = []
    if cli.config_file is not None:
        environ[ENV_CONFIG_FILE] = str(Path(cli.config_file).resolve())
    for key, value in cli.overrides.items():
        if value is None:
            continue
        if key != key.lower():  # variable names are read back lower-cased
            skipped.append(key)
            continue
        environ[ENV_PREFIX + key.upper().replace(".", "__")] = _toml_literal(value)
    return skipped


def log_config(level: LogLevel) -> dict[str, Any]:
    """uvicorn's logging, plus the service's JSON access log (stdout) and its errors."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = json.loads(json.dumps(LOGGING_CONFIG))
    config["formatters"]["plain"] = {"format": "%(message)s"}
    config["handlers"]["eventindex.access"] = {
        "class": "logging.StreamHandler",
        "formatter": "plain",
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["eventindex.access"] = {
        "handlers": ["eventindex.access"],
        "level": level.value.upper(),
        "propagate": False,
    }
    config["loggers"]["eventindex"] = {
        "handlers": ["default"],
        "level": level.value.upper(),
        "propagate": False,
    }
    return config


def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on (default: the webservice.host setting)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="Port to listen on (default: the webservice.port setting)."
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes: one per core under load (picks are CPU-bound; each "
            "worker holds its own file handles and key cache).",
        ),
    ] = 1,
    log_level: Annotated[
        LogLevel, typer.Option(help="Log level; access logs are at info.")
    ] = LogLevel.INFO,
) -> None:
    """Run the HTTP service (OpenAPI at /docs, routes under /v1) until interrupted.

    Access logs are JSON lines on stdout. SIGTERM or Ctrl-C stops it gracefully.
    """
    import uvicorn

    cli = state(ctx)
    settings = cli.settings  # refuse a bad configuration here, before any worker starts
    for key in export_settings(cli, os.environ):
        stderr.print(f"warning: --set {key} is not passed to the server (upper-case key)")
    # uvicorn stops gracefully on SIGTERM, then raises the signal again so the process dies
    # of it; a stop that was asked for and went cleanly exits with status 0 instead.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=host or settings.webservice.host,
            port=settings.webservice.port if port is None else port,
            workers=workers,
            log_level=log_level.value,
            log_config=log_config(log_level),
            access_log=False,  # the app writes its own, as JSON
            proxy_headers=False,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
