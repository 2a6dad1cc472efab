"""Admin routes: bearer tokens from the settings, compared in constant time."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from catalog import Collection, SQLiteCatalog
from eventindex.creator import create_generated
from eventindex.generator import GeneratorSpec, generate_run
from eventindex.records.schema import RecordKind
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import TOKEN, assert_problem, make_client, service_settings


def test_refresh_without_a_token_is_401(client: TestClient) -> None:
    response = client.post("/v1/admin/refresh")
    problem = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in problem["detail"]


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer h\u00e9llo"],
)
def test_refresh_with_a_wrong_token_is_403(client: TestClient, authorization: str) -> None:
    response = client.post("/v1/admin/refresh", headers={"authorization": authorization.encode()})
    assert_problem(response, 403)


@pytest.mark.parametrize("authorization", [f"Basic {TOKEN}", TOKEN, "Bearer"])
def test_refresh_with_no_bearer_token_is_401(client: TestClient, authorization: str) -> None:
    assert_problem(client.post("/v1/admin/refresh", headers={"authorization": authorization}), 401)


def test_refresh_with_the_token(client: TestClient) -> None:
    response = client.post("/v1/admin/refresh", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["refreshed"] is True
    assert answer["reader"]["catalog_refreshes"] >= 0


def test_admin_routes_are_refused_when_no_tokens_are_configured(store: GeneratedStore) -> None:
    with make_client(service_settings(store, tokens=[]), catalog=store.catalog) as closed:
        for headers in ({}, {"authorization": f"Bearer {TOKEN}"}, {"authorization": "Bearer "}):
            problem = assert_problem(closed.post("/v1/admin/refresh", headers=headers), 403)
            assert "no tokens are configured" in problem["detail"]


def test_any_configured_token_is_accepted(store: GeneratedStore) -> None:
    settings = service_settings(store, tokens=["first-token", "second-token"])
    with make_client(settings, catalog=store.catalog) as opened:
        for token in ("first-token", "second-token"):
            headers = {"authorization": f"Bearer {token}"}
            assert opened.post("/v1/admin/refresh", headers=headers).status_code == 200
        assert_problem(opened.post("/v1/admin/refresh", headers={"authorization": "Bearer x"}), 403)


def test_refresh_makes_new_data_visible_at_once(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=400)
    store = GeneratedStore.create(tmp_path, spec)
    later = GeneratorSpec(runs=2, events_per_run=400)
    later_run = later.run_numbers[-1]
    tables = generate_run(later, later_run)
    table: pa.Table = next(t for name, t in tables.items() if name.endswith(".daq.RAW"))
    event = table["event_number"][0].as_py()
    # The Reader would wait an hour before it looked at the catalog again by itself.
    slow = service_settings(store, reader_refresh_seconds=3600)
    try:
        with make_client(slow, catalog=store.catalog) as opened:
            assert_problem(opened.get(f"/v1/events/{later_run}/{event}"), 404)
            create_generated(later, store.catalog, store.writer)
            assert_problem(opened.get(f"/v1/events/{later_run}/{event}"), 404)
            headers = {"authorization": f"Bearer {TOKEN}"}
            assert opened.post("/v1/admin/refresh", headers=headers).status_code == 200
            picked = opened.get(f"/v1/events/{later_run}/{event}")
            assert picked.status_code == 200, picked.text
            assert picked.json()["run_number"] == later_run
    finally:
        store.close()


def test_refresh_makes_a_new_collection_known_at_once(store: GeneratedStore) -> None:
    catalog = SQLiteCatalog(":memory:")
    slow = service_settings(store, reader_refresh_seconds=3600)
    try:
        with make_client(slow, catalog=catalog) as opened:
            params = {"collection": "data17_13TeV.physics_Main"}
            assert_problem(opened.get("/v1/events/1/2", params=params), 404, "collection")
            catalog.create_collection(Collection(params["collection"], RecordKind.EVENTS))
            assert_problem(opened.get("/v1/events/1/2", params=params), 404, "collection")
            headers = {"authorization": f"Bearer {TOKEN}"}
            assert opened.post("/v1/admin/refresh", headers=headers).status_code == 200
            absent = assert_problem(opened.get("/v1/events/1/2", params=params), 404)
            assert "errors" not in absent  # a known collection now; the event is absent
            assert absent["detail"] == f"event 1/2 is not in {params['collection']}"
    finally:
        catalog.close()
