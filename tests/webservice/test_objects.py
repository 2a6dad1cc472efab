"""``/v1/objects``: pick and cone search over HTTP, and bad input as problem+json."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventindex.config import load_config
from eventindex.spatial.regions import angular_separation
from tests.spatial.partition_data import Partitioned, object_table, partition
from webservice.app import create_app
from webservice.problems import PROBLEM_MEDIA_TYPE

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Partitioned]:
    done = partition(tmp_path_factory.mktemp("objects-http"), object_table(3000))
    yield done
    done.catalog.close()


@pytest.fixture(scope="module")
def client(partitioned: Partitioned) -> Iterator[TestClient]:
    root = Path(partitioned.store)
    settings = load_config(
        overrides={"store.root": str(root), "catalog.path": str(root.parent / "catalog.sqlite")},
        environ={},
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
    body: dict[str, Any] = response.json()
    if field is not None:
        assert field in {e["field"] for e in body["errors"]}, body
    return body


def test_get_object(client: TestClient, partitioned: Partitioned) -> None:
    row = partitioned.table.slice(10, 1).to_pylist()[0]
    response = client.get(f"/v1/objects/{row['object_id']}", params={"catalog": "sky"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["catalog"] == "sky.Object"
    assert {k: body["object"][k] for k in row} == pytest.approx(row)
    assert client.get(f"/v1/objects/{row['object_id']}").status_code == 200  # only catalog
    missing = client.get("/v1/objects/1")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)


def test_cone(client: TestClient, partitioned: Partitioned) -> None:
    params = {"ra": 10.0, "dec": 5.0, "radius_arcsec": 1800.0, "catalog": "sky.Object"}
    response = client.get("/v1/objects/cone", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    source = partitioned.table
    distance = angular_separation(10.0, 5.0, source["ra"], source["dec"])
    expected = set(source["object_id"].to_numpy()[distance <= 0.5].tolist())
    assert {o["object_id"] for o in body["objects"]} == expected
    assert body["count"] == len(expected) > 0 and body["truncated"] is False
    assert all(o["distance_arcsec"] <= 1800.0 for o in body["objects"])
    limited = client.get("/v1/objects/cone", params={**params, "limit": 2}).json()
    assert limited["count"] == 2 and limited["truncated"] is True


@pytest.mark.parametrize(
    "params,field",
    [
        ({"ra": 360.0, "dec": 0.0, "radius_arcsec": 1.0}, "ra"),
        ({"ra": -1.0, "dec": 0.0, "radius_arcsec": 1.0}, "ra"),
        ({"ra": 1.0, "dec": 91.0, "radius_arcsec": 1.0}, "dec"),
        ({"ra": 1.0, "dec": 0.0, "radius_arcsec": 0.0}, "radius_arcsec"),
        ({"ra": 1.0, "dec": 0.0, "radius_arcsec": -3.0}, "radius_arcsec"),
        ({"ra": "nan", "dec": 0.0, "radius_arcsec": 1.0}, "ra"),
        ({"ra": 1.0, "dec": "x", "radius_arcsec": 1.0}, "dec"),
        ({"dec": 0.0, "radius_arcsec": 1.0}, "ra"),
    ],
)
def test_bad_cones_are_422(client: TestClient, params: dict[str, Any], field: str) -> None:
    _problem(client.get("/v1/objects/cone", params=params), 422, field)


def test_bad_ids_and_catalogs(client: TestClient) -> None:
    _problem(client.get("/v1/objects/abc"), 422, "object_id")
    _problem(client.get(f"/v1/objects/{2**63}"), 422, "object_id")
    _problem(client.get("/v1/objects/3", params={"catalog": "nope"}), 404, "catalog")
    _problem(
        client.get(
            "/v1/objects/cone", params={"ra": 1, "dec": 1, "radius_arcsec": 1, "catalog": "nope"}
        ),
        404,
        "catalog",
    )


def test_shutdown_closes_the_object_tables(
    partitioned: Partitioned, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventindex.query.objects import ObjectTable

    closed: list[str] = []
    original = ObjectTable.close

    def close(table: ObjectTable) -> None:
        closed.append(table.name)
        original(table)

    monkeypatch.setattr(ObjectTable, "close", close)
    root = Path(partitioned.store)
    settings = load_config(
        overrides={"store.root": str(root), "catalog.path": str(root.parent / "catalog.sqlite")},
        environ={},
    )
    app = create_app(settings)
    with TestClient(app) as test_client:
        assert test_client.get("/v1/objects/cone?ra=10&dec=0&radius_arcsec=60").status_code == 200
        assert not closed
    assert closed == ["sky.Object"]
    assert app.state.object_catalogs is None
