"""The service's limits are ``[webservice]`` settings: a config file or variable sets them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eventindex.config import Settings, load_config
from eventindex.errors import ConfigError
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import assert_problem, make_client


def _settings_from_file(store: GeneratedStore, tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "eventindex.toml"
    config.write_text(
        f'[store]\nroot = "{store.root}"\n[catalog]\npath = "{store.catalog_path}"\n'
        f"[webservice]\n{text}"
    )
    return load_config(config, environ={})


def test_lookup_and_body_limits_come_from_the_config_file(
    store: GeneratedStore, tmp_path: Path
) -> None:
    settings = _settings_from_file(
        store, tmp_path, "max_lookup_events = 3\nmax_body_bytes = 2048\n"
    )
    with make_client(settings, catalog=store.catalog) as client:
        four = {"events": [[1, n] for n in range(4)]}
        problem = assert_problem(client.post("/v1/events/lookup", json=four), 413, "events")
        assert "at most 3" in problem["detail"]
        three = {"events": [[1, n] for n in range(3)]}
        assert client.post("/v1/events/lookup", json=three).status_code == 200
        big = json.dumps({"events": [[1, 2]], "dataset": "*" + " " * 2048})
        response = client.post(
            "/v1/events/lookup", content=big, headers={"content-type": "application/json"}
        )
        assert "2048" in assert_problem(response, 413, "body")["detail"]


def test_select_rows_are_capped_by_the_setting(store: GeneratedStore, tmp_path: Path) -> None:
    run = store.spec.first_run
    body = {"run_min": run, "run_max": run, "columns": ["lumi_block"]}
    settings = _settings_from_file(store, tmp_path, "max_select_rows = 7\n")
    with make_client(settings, catalog=store.catalog) as client:
        capped = client.post("/v1/events/select", json=body).text.splitlines()
        assert len(capped) == 7
        smaller = client.post("/v1/events/select", json={**body, "limit": 2}).text
        assert len(smaller.splitlines()) == 2
    uncapped = _settings_from_file(store, tmp_path, "max_select_rows = 0\n")
    with make_client(uncapped, catalog=store.catalog) as client:
        rows = client.post("/v1/events/select", json=body).text.splitlines()
        assert len(rows) > 7


def test_a_limit_from_the_environment() -> None:
    settings = load_config(environ={"EVENTINDEX_WEBSERVICE__MAX_LOOKUP_EVENTS": "12"})
    assert settings.webservice.max_lookup_events == 12


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_lookup_events", 0),
        ("max_body_bytes", 10),
        ("max_select_rows", -1),
        ("reader_key_cache_bytes", -5),
        ("max_lookup_event", 5),
    ],
)
def test_a_bad_limit_is_refused_naming_the_setting(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"webservice\.{key}"):
        load_config(overrides={f"webservice.{key}": value}, environ={})
