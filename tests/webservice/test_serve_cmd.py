"""``eventindex serve`` hands its settings to uvicorn workers through the environment."""

from __future__ import annotations

import logging.config
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from eventindex.cli.context import CliState
from eventindex.cli.serve_cmd import LogLevel, export_settings, log_config
from eventindex.config import load_config
from tests.generated_store import GeneratedStore
from webservice.app import app_from_environment


def test_global_options_travel_to_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "site.toml"
    config.write_text('[catalog]\npath = "from-file.sqlite"\n[webservice]\nport = 9000\n')
    monkeypatch.chdir(tmp_path.parent)
    relative = str(config.relative_to(tmp_path.parent))
    cli = CliState(
        config_file=relative,
        overrides={
            "store.root": "/data/store",
            "catalog.path": "/data/catalog.sqlite",
            "webservice.tokens": ["alpha", 'with "quotes"'],
            "webservice.host": "2024",  # text that looks like a number stays text
            "mapfile.row_group_rows": 4096,
            "mapfile.compression_level": None,
        },
    )
    environ: dict[str, str] = {}
    skipped = export_settings(cli, environ)
    assert skipped == []
    assert environ["EVENTINDEX_CONFIG"] == str(config)  # made absolute: workers may move
    worker_view = load_config(environ=environ)
    cli_view = load_config(relative, cli.overrides, environ={})
    assert worker_view == cli_view
    assert worker_view.webservice.tokens == ["alpha", 'with "quotes"']
    assert worker_view.webservice.port == 9000


def test_keys_that_cannot_travel_are_reported() -> None:
    environ: dict[str, str] = {}
    cli = CliState(overrides={"spark.conf.spark.executor.extraJavaOptions": "-Xss4m"})
    assert export_settings(cli, environ) == ["spark.conf.spark.executor.extraJavaOptions"]
    assert environ == {}


@pytest.mark.parametrize("level", list(LogLevel))
def test_log_config_is_valid(level: LogLevel) -> None:
    config = log_config(level)
    assert config["loggers"]["eventindex.access"]["level"] == level.value.upper()
    logging.config.dictConfig(config)  # raises if the dictionary is malformed
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})


def test_app_from_environment(store: GeneratedStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTINDEX_CATALOG__PATH", str(store.catalog_path))
    monkeypatch.setenv("EVENTINDEX_STORE__ROOT", str(store.root))
    monkeypatch.setenv("EVENTINDEX_WEBSERVICE__TOKENS", '["from-env"]')
    with TestClient(app_from_environment()) as client:
        assert client.get("/v1/health").json()["collections"] == 1
        refresh = client.post("/v1/admin/refresh", headers={"authorization": "Bearer from-env"})
        assert refresh.status_code == 200
