"""Picks answered ahead of routing (``FastPicks``) answer exactly as the declared route does:
same bodies, same problems, same metrics and access log."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.responses import Response
from starlette.types import Scope

from eventindex.query import Reader
from tests.generated_store import GeneratedStore
from tests.query.test_reader_locations import describe
from tests.webservice.conftest import make_client, service_settings
from tests.webservice.test_routes import parse_metrics
from webservice.routes.events import FastPicks


@pytest.fixture(scope="module")
def located(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("fast-picks"))
    describe(generated)
    try:
        yield generated
    finally:
        generated.close()


@pytest.fixture(scope="module")
def client(located: GeneratedStore) -> Iterator[TestClient]:
    with make_client(service_settings(located), catalog=located.catalog) as opened:
        yield opened


def _reader(client: TestClient) -> Reader:
    reader: Reader = client.app.state.service.reader  # type: ignore[attr-defined]
    return reader


def _paths(store: GeneratedStore) -> list[str]:
    run = store.spec.first_run
    daod = store.tables[store.dataset(run, "DAOD_PHYS")]
    event = sorted(daod["event_number"].to_pylist())[5]
    collection = store.spec.collection
    return [
        f"/v1/events/{run}/{event}",
        f"/v1/events/{run}/{event}?collection={collection}",
        f"/v1/events/{run}/{event}?collection={collection}&format=AOD&format=RAW",
        f"/v1/events/{run}/{event}?dataset=*.merge.AOD.r7562*",
        f"/v1/events/{run}/{event}?dataset=mc16_*",
        f"/v1/events/{run}/{event + 1}",
        f"/v1/events/{run}/0{event}",
        f"/v1/events/{2**32 - 1}/{2**64 - 1}",
        f"/v1/events/{2**32}/{event}",
        f"/v1/events/{run}/{2**64}",
        f"/v1/events/-1/{event}",
        f"/v1/events/{run}/1e3",
        f"/v1/events/{run}/{event}?collection=nope",
        f"/v1/events/{run}/{event}?collection=",
        f"/v1/events/{run}/{event}?format=not%20a%20format",
        f"/v1/events/{run}/{event}?collection={collection}&collection={collection}",
        f"/v1/events/{run}/{event}?unknown=1",
        f"/v1/events/{run}/{event}?format=AOD%0A",
    ]


def _answer(client: TestClient, path: str) -> tuple[int, str, Any]:
    response = client.get(path)
    body = response.json() if response.content else None
    return response.status_code, response.headers.get("content-type", ""), body


def test_answers_equal_the_declared_route(
    client: TestClient, located: GeneratedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = _reader(client)
    paths = _paths(located)
    answered: list[str] = []
    original = FastPicks._answer

    def watched(self: FastPicks, scope: Scope) -> Response | None:
        response = original(self, scope)
        if response is not None:
            answered.append(scope["path"] + "?" + scope["query_string"].decode())
        return response

    monkeypatch.setattr(FastPicks, "_answer", watched)
    client.get(paths[1])  # the collection is known from now on
    answered.clear()
    fast = [_answer(client, path) for path in paths]
    # Well-formed picks were answered ahead of routing; bad input never was.
    assert [p.rstrip("?") for p in answered] == paths[:8]
    assert reader.located(located.spec.collection)
    assert reader.stats()["mapfile_reads"] == 0
    reader.use_locations = False  # now every pick goes through the declared route
    try:
        declared = [_answer(client, path) for path in paths]
    finally:
        reader.use_locations = True
    for path, one, other in zip(paths, fast, declared, strict=True):
        assert one == other, path
    statuses = [status for status, _, _ in fast]
    assert statuses[:5] == [200, 200, 200, 200, 404] and statuses[5] == 404
    assert {422, 404} <= set(statuses[8:])


def test_metrics_and_access_log_count_fast_picks(
    client: TestClient, located: GeneratedStore, caplog: pytest.LogCaptureFixture
) -> None:
    path = _paths(located)[1]
    client.get(path)  # the collection is known from now on
    before = parse_metrics(client.get("/metrics").text)
    with caplog.at_level(logging.INFO, logger="eventindex.access"):
        for _ in range(3):
            assert client.get(path).status_code == 200
    after = parse_metrics(client.get("/metrics").text)
    ok = (
        'eventindex_http_requests_total{method="GET",route="/v1/events/{run}/{event}",status="200"}'
    )
    assert after[ok] - before.get(ok, 0) == 3
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "eventindex.access"]
    assert [(line["route"], line["status"]) for line in lines] == [
        ("/v1/events/{run}/{event}", 200)
    ] * 3
    assert after["eventindex_reader_locations_reads_total"] > before.get(
        "eventindex_reader_locations_reads_total", 0
    )
