"""Bad input is a 4xx ``application/problem+json`` that names the field, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from catalog import Collection, SQLiteCatalog
from eventindex.errors import CatalogError, StorageError
from eventindex.records.schema import RecordKind
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import LIMITS, assert_problem, make_client, service_settings

MAX_RUN = 2**32 - 1
MAX_EVENT = 2**64 - 1


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/events/-1/5", "run"),
        ("/v1/events/abc/5", "run"),
        ("/v1/events/1.5/5", "run"),
        (f"/v1/events/{MAX_RUN + 1}/5", "run"),
        (f"/v1/events/{'9' * 5000}/5", "run"),
        ("/v1/events/284484/-1", "event"),
        ("/v1/events/284484/xyz", "event"),
        (f"/v1/events/284484/{MAX_EVENT + 1}", "event"),
        (f"/v1/events/284484/{2**70}", "event"),
        ("/v1/files/not-a-guid/events", "guid"),
        ("/v1/files/0000000-0000-0000-0000-0000000000000/events", "guid"),
    ],
)
def test_bad_path_parameters(client: TestClient, path: str, field: str) -> None:
    assert_problem(client.get(path), 422, field, "path")


def test_both_bad_path_parameters_are_named(client: TestClient) -> None:
    problem = assert_problem(client.get("/v1/events/-1/x"), 422, "run", "path")
    assert {e["field"] for e in problem["errors"]} == {"run", "event"}


@pytest.mark.parametrize(
    "path", [f"/v1/events/{MAX_RUN}/{MAX_EVENT}", "/v1/events/0/0", f"/v1/events/1/{2**32}"]
)
def test_largest_and_smallest_keys_are_valid_and_absent(client: TestClient, path: str) -> None:
    assert_problem(client.get(path), 404)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"format": "not a format!"}, "format.0"),
        ({"format": ""}, "format.0"),
        ({"dataset": ""}, "dataset"),
        ({"collection": ""}, "collection"),
    ],
)
def test_bad_query_parameters(client: TestClient, params: dict[str, str], field: str) -> None:
    assert_problem(client.get("/v1/events/284484/1", params=params), 422, field, "query")


@pytest.mark.parametrize(
    "path", ["/v1/events/284484/1", "/v1/datasets", "/v1/events/284484/1?format=RAW"]
)
def test_unknown_collection_in_query_is_404(client: TestClient, path: str) -> None:
    sep = "&" if "?" in path else "?"
    problem = assert_problem(
        client.get(f"{path}{sep}collection=nope.physics_Main"), 404, "collection", "query"
    )
    assert "nope.physics_Main" in problem["detail"]


def post(client: TestClient, path: str, body: Any) -> Any:
    """POST ``body`` as JSON, whatever it is (``json=`` would refuse some of ours)."""
    headers = {"content-type": "application/json"}
    return client.post(path, content=json.dumps(body), headers=headers)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"events": []}, "events"),
        ({}, "events"),
        ({"events": [[-1, 5]]}, "events.0.0"),
        ({"events": [[1, -5]]}, "events.0.1"),
        ({"events": [[MAX_RUN + 1, 5]]}, "events.0.0"),
        ({"events": [[1, MAX_EVENT + 1]]}, "events.0.1"),
        ({"events": [[1, 2], [1, 2**65]]}, "events.1.1"),
        ({"events": [["1", 2]]}, "events.0.0"),
        ({"events": [[1.5, 2]]}, "events.0.0"),
        ({"events": [[1, 2.0**60]]}, "events.0.1"),
        ({"events": [[True, 2]]}, "events.0.0"),
        ({"events": [[1, 2, 3]]}, "events.0"),
        ({"events": [[1]]}, "events.0.1"),
        ({"events": "1 2"}, "events"),
        ({"events": [[1, 2]], "formats": ["bad format"]}, "formats.0"),
        ({"events": [[1, 2]], "formats": []}, None),
        ({"events": [[1, 2]], "dataset": ""}, "dataset"),
        ({"events": [[1, 2]], "collection": ""}, "collection"),
        ({"events": [[1, 2]], "event": [[1, 2]]}, "event"),
        ([[1, 2]], "body"),
        ("events", "body"),
    ],
)
def test_bad_lookup_bodies(client: TestClient, body: Any, field: str | None) -> None:
    response = post(client, "/v1/events/lookup", body)
    if field is None:  # an empty filter list is allowed: no location passes it
        assert response.status_code == 200
        return
    assert_problem(response, 422, field, "body")


def test_many_bad_pairs_are_reported_briefly(client: TestClient) -> None:
    body = {"events": [[-1, -1]] * LIMITS["max_lookup_events"]}
    problem = assert_problem(post(client, "/v1/events/lookup", body), 422, "events.0.0")
    assert len(problem["errors"]) == 50
    assert "more" in problem["detail"]


def test_oversize_lookup_is_413(client: TestClient) -> None:
    body = {"events": [[1, n] for n in range(LIMITS["max_lookup_events"] + 1)]}
    problem = assert_problem(post(client, "/v1/events/lookup", body), 413, "events", "body")
    assert str(LIMITS["max_lookup_events"]) in problem["detail"]


def test_unknown_collection_in_body_is_404(client: TestClient) -> None:
    body = {"collection": "nope.physics_Main", "events": [[1, 2]]}
    assert_problem(post(client, "/v1/events/lookup", body), 404, "collection", "body")
    select = {"collection": "nope.physics_Main", "run_min": 1, "run_max": 2}
    assert_problem(post(client, "/v1/events/select", select), 404, "collection", "body")


@pytest.mark.parametrize("path", ["/v1/events/lookup", "/v1/events/select"])
@pytest.mark.parametrize(
    "text", ['{"events": [[1, 2]', "{'events': []}", "[1, 2,]", "nan", '{"a": 1} {"b": 2}']
)
def test_malformed_json_is_400(client: TestClient, path: str, text: str) -> None:
    response = client.post(path, content=text, headers={"content-type": "application/json"})
    problem = assert_problem(response, 400, "body", "body")
    assert "JSON" in problem["title"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"events": [[1, 2]], "dataset": "\xff"}', "UTF-8"),
        (b'{"events": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "deeply"),
    ],
)
def test_unparsable_body_is_400(client: TestClient, content: bytes, reason: str) -> None:
    response = client.post(
        "/v1/events/lookup", content=content, headers={"content-type": "application/json"}
    )
    problem = assert_problem(response, 400, "body", "body")
    assert reason in problem["detail"]


@pytest.mark.parametrize("path", ["/v1/events/lookup", "/v1/events/select"])
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_wrong_content_type_is_415(client: TestClient, path: str, content_type: str) -> None:
    body = json.dumps({"events": [[1, 2]], "run_min": 1, "run_max": 1})
    response = client.post(path, content=body, headers={"content-type": content_type})
    assert_problem(response, 415, "content-type", "header")


def test_json_suffix_content_types_are_accepted(
    client: TestClient, known_event: tuple[int, int]
) -> None:
    body = json.dumps({"events": [list(known_event)]})
    for content_type in ("application/json; charset=utf-8", "application/vnd.eventindex+json"):
        response = client.post(
            "/v1/events/lookup", content=body, headers={"content-type": content_type}
        )
        assert response.status_code == 200, (content_type, response.text)


def test_missing_content_type_with_a_body_is_415(client: TestClient) -> None:
    response = client.post("/v1/events/lookup", content=b'{"events": [[1, 2]]}')
    assert "content-type" not in response.request.headers
    assert_problem(response, 415, "content-type", "header")


def test_missing_body_is_422(client: TestClient) -> None:
    assert_problem(client.post("/v1/events/lookup"), 422, "body", "body")


def test_body_over_the_limit_is_413_before_parsing(client: TestClient) -> None:
    # Not even JSON: the size alone decides, from Content-Length.
    body = b"x" * (LIMITS["max_body_bytes"] + 1)
    response = client.post(
        "/v1/events/lookup", content=body, headers={"content-type": "application/json"}
    )
    problem = assert_problem(response, 413, "body", "body")
    assert str(LIMITS["max_body_bytes"]) in problem["detail"]


def test_streamed_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"events": ['
        for _ in range(LIMITS["max_body_bytes"] // 1000 + 1):
            yield b"[1, 2], " * 125
        yield b"[1, 2]]}"

    response = client.post(
        "/v1/events/lookup", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "body", "body")


def test_body_just_under_the_limit_is_parsed(client: TestClient) -> None:
    padding = LIMITS["max_body_bytes"] - 200
    body = json.dumps({"events": [[1, 2]], "dataset": "*" + " " * padding})[:-1] + "}"
    response = post(client, "/v1/events/lookup", json.loads(body))
    assert len(response.request.content) < LIMITS["max_body_bytes"]
    assert_problem(response, 422, "dataset", "body")  # too long a pattern, but it was read


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"run_min": -1, "run_max": 5}, "run_min"),
        ({"run_min": 1, "run_max": MAX_RUN + 1}, "run_max"),
        ({"run_min": 5, "run_max": 4}, "run_max"),
        ({"run_max": 4}, "run_min"),
        ({"run_min": 1, "run_max": 2, "limit": 0}, "limit"),
        ({"run_min": 1, "run_max": 2, "limit": "10"}, "limit"),
        ({"run_min": 1, "run_max": 2, "limit": 2**53}, "limit"),
        ({"run_min": 1, "run_max": 2, "columns": []}, "columns"),
        ({"run_min": 1, "run_max": 2, "columns": ["bogus"]}, "columns.0"),
        ({"run_min": 1, "run_max": 2, "columns": "lumi_block"}, "columns"),
        ({"run_min": 1, "run_max": 2, "dataset": ""}, "dataset"),
        ({"run_min": 1, "run_max": 2, "colums": ["lumi_block"]}, "colums"),
    ],
)
def test_bad_select_bodies(client: TestClient, body: dict[str, Any], field: str) -> None:
    assert_problem(post(client, "/v1/events/select", body), 422, field, "body")


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    assert_problem(client.get("/v1/nothing/here"), 404)
    problem = assert_problem(client.get("/v1/events/lookup"), 405)
    assert "GET" in problem["detail"]
    assert client.get("/v1/events/lookup").headers["allow"] == "POST"
    assert_problem(client.delete("/v1/events/1/2"), 405)


@pytest.fixture(scope="module")
def several(store: GeneratedStore) -> Iterator[TestClient]:
    """A service over a catalog with two event collections and an object catalog."""
    catalog = SQLiteCatalog(":memory:")
    catalog.create_collection(Collection("data15_13TeV.physics_Main", RecordKind.EVENTS))
    catalog.create_collection(Collection("data16_13TeV.physics_Main", RecordKind.EVENTS))
    catalog.create_collection(Collection("gaia_dr3", RecordKind.OBJECTS))
    with make_client(service_settings(store), catalog=catalog) as opened:
        yield opened
    catalog.close()


def test_collection_is_required_when_there_are_several(several: TestClient) -> None:
    problem = assert_problem(several.get("/v1/events/1/2"), 422, "collection", "query")
    assert "2 event collections" in problem["detail"]
    body = {"events": [[1, 2]]}
    assert_problem(post(several, "/v1/events/lookup", body), 422, "collection", "body")
    named = several.get("/v1/events/1/2", params={"collection": "data16_13TeV.physics_Main"})
    assert_problem(named, 404)  # a valid request; the event is absent


def test_object_catalog_is_not_an_event_collection(several: TestClient) -> None:
    response = several.get("/v1/events/1/2", params={"collection": "gaia_dr3"})
    problem = assert_problem(response, 404, "collection", "query")
    assert "objects" in problem["detail"]


def test_empty_catalog(store: GeneratedStore) -> None:
    catalog = SQLiteCatalog(":memory:")
    with make_client(service_settings(store), catalog=catalog) as empty:
        assert empty.get("/v1/health").json()["collections"] == 0
        assert_problem(empty.get("/v1/events/1/2"), 404, "collection", "query")
        assert empty.get("/v1/datasets").json() == []
    catalog.close()


def test_unexpected_errors_are_500_problems_without_internals(
    store: GeneratedStore, known_event: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    with make_client(service_settings(store), catalog=store.catalog) as failing:
        service = failing.app.state.service  # type: ignore[attr-defined]

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("secret internal detail")

        service.reader.pick = broken
        response = failing.get("/v1/events/{}/{}".format(*known_event))
        problem = assert_problem(response, 500)
        assert "secret" not in response.text
        assert problem["type"].endswith("internal-error")
    assert any("secret internal detail" in r.getMessage() or r.exc_info for r in caplog.records)


def test_catalog_failure_is_503(store: GeneratedStore) -> None:
    catalog = SQLiteCatalog(":memory:")
    with make_client(service_settings(store), catalog=catalog) as failing:

        def down() -> None:
            raise CatalogError("database is locked")

        catalog.list_collections = down  # type: ignore[method-assign,assignment]
        response = failing.get("/v1/health")
        assert_problem(response, 503)
        assert response.headers["retry-after"]
    catalog.close()


def test_select_failing_before_its_first_row_is_a_problem(store: GeneratedStore) -> None:
    def failing(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        raise StorageError("map-file /secret/path is damaged")
        yield {}

    with make_client(service_settings(store), catalog=store.catalog) as opened:
        opened.app.state.service.reader.select = failing  # type: ignore[attr-defined]
        response = post(opened, "/v1/events/select", {"run_min": 1, "run_max": 2})
        assert_problem(response, 500)
        assert "secret" not in response.text


def test_select_failing_mid_stream_cuts_the_stream_short(store: GeneratedStore) -> None:
    row = {"dataset": "d", "run_number": 1, "event_number": 2, "padding": "x" * 1000}

    def failing(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield from [row] * 200  # a few chunks go out first
        raise StorageError("map-file is damaged")

    with make_client(service_settings(store), catalog=store.catalog) as opened:
        opened.app.state.service.reader.select = failing  # type: ignore[attr-defined]
        response = post(opened, "/v1/events/select", {"run_min": 1, "run_max": 2})
    # The status went out with the first chunk; what follows the failure never does (over
    # HTTP the connection is dropped mid-body, so a client sees an incomplete response).
    assert response.status_code == 200
    lines = response.content.split(b"\n")
    assert 0 < len(lines) - 1 < 200
