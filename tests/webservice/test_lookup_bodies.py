"""``POST /v1/events/lookup`` bodies: every well-formed one is answered with the Reader's
answer, every bad one with a 4xx problem (never a 500), and the route is counted."""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from eventindex.query import Reader
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import LIMITS
from tests.webservice.test_routes import parse_metrics

LOOKUP = "/v1/events/lookup"
JSON = "application/json"
Request = tuple[bytes, str]


def _reader(client: TestClient) -> Reader:
    reader: Reader = client.app.state.service.reader  # type: ignore[attr-defined]
    return reader


def _body(data: Any) -> bytes:
    return json.dumps(data).encode()


def _requests(
    store: GeneratedStore, known: tuple[int, int], absent: tuple[int, int]
) -> tuple[list[Request], list[Request]]:
    """Well-formed requests, and requests with something wrong (or unusual) in them."""
    run, event = known
    collection = store.spec.collection
    limit: int = LIMITS["max_lookup_events"]
    pairs = [[run, event], list(absent), [run, event]]
    good = [
        (_body({"events": pairs}), JSON),
        (_body({"collection": collection, "events": pairs}), JSON),
        (_body({"events": pairs, "formats": ["AOD", "RAW"]}), JSON),
        (_body({"events": pairs, "dataset": "*.merge.AOD.r7562*"}), JSON),
        (_body({"events": pairs, "dataset": "mc16_*"}), JSON),
        (_body({"collection": None, "events": pairs, "formats": None, "dataset": None}), JSON),
        (_body({"events": [[run, event + n] for n in range(limit)]}), JSON),
        (_body({"events": [[2**32 - 1, 2**64 - 1], [0, 0]], "formats": []}), JSON),
        (_body({"events": pairs}), "application/json; charset=utf-8"),
        (_body({"events": pairs}), "application/vnd.eventindex+json"),
        (b'{"events": [[1, 2]], "events": [' + f"[{run}, {event}]".encode() + b"]}", JSON),
    ]
    bad = [
        (_body({"events": []}), JSON),
        (_body({"events": [[run, n] for n in range(limit + 1)]}), JSON),
        (_body({"events": [[run, 2**64]]}), JSON),
        (_body({"events": [[2**32, event]]}), JSON),
        (_body({"events": [[-1, event]]}), JSON),
        (_body({"events": [[float(run), float(event)]]}), JSON),  # the route converts 7.0
        (_body({"events": [[run, 1e300]]}), JSON),
        (_body({"events": [[True, event]]}), JSON),
        (_body({"events": [[str(run), event]]}), JSON),
        (_body({"events": [[run]]}), JSON),
        (_body({"events": [[run, event, 1]]}), JSON),
        (_body({"events": [{"run": run, "event": event}]}), JSON),
        (_body({"events": pairs, "extra": 1}), JSON),
        (_body({"collection": "", "events": pairs}), JSON),
        (_body({"collection": "nope", "events": pairs}), JSON),
        (_body({"collection": "x" * 257, "events": pairs}), JSON),
        (_body({"collection": 7, "events": pairs}), JSON),
        (_body({"events": pairs, "formats": ["AOD\n"]}), JSON),
        (_body({"events": pairs, "formats": ["AOD"] * 65}), JSON),
        (_body({"events": pairs, "formats": "AOD"}), JSON),
        (_body({"events": pairs, "dataset": ""}), JSON),
        (_body({"events": pairs, "dataset": "d" * 513}), JSON),
        (_body({"formats": ["AOD"]}), JSON),
        (_body([pairs]), JSON),
        (b"null", JSON),
        (b"", JSON),
        (b'{"events": [[1, 2]', JSON),
        (b'{"events": [[1, NaN]]}', JSON),
        (b'{"events": [[1, 2]], "dataset": "\xff*"}', JSON),
        (b'{"events": [[1, 2]], "dataset": "\\ud800"}', JSON),
        (_body({"events": pairs}), "text/plain"),
        (_body({"events": pairs}), ""),
    ]
    return good, bad


def _answer(client: TestClient, request: Request) -> tuple[int, str, bytes]:
    content, content_type = request
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(LOOKUP, content=content, headers=headers)
    return response.status_code, response.headers.get("content-type", ""), response.content


def test_good_bodies_are_answered_and_bad_ones_are_problems(
    client: TestClient,
    store: GeneratedStore,
    known_event: tuple[int, int],
    absent_event: tuple[int, int],
) -> None:
    good, bad = _requests(store, known_event, absent_event)
    for request in good:
        status, content_type, content = _answer(client, request)
        assert status == 200, (request, content)
        assert content_type == JSON
        answer = orjson.loads(content)
        assert answer["found"] + len(answer["missing"]) == len(answer["results"])
    statuses = []
    for request in bad:
        status, content_type, content = _answer(client, request)
        statuses.append(status)
        if status != 200:
            assert 400 <= status < 500, (request, content)
            assert content_type == "application/problem+json", request
    assert {413, 415, 404, 422} <= set(statuses)
    assert statuses[5] == 200  # floats holding integers are converted


def test_results_are_the_readers_answers(
    client: TestClient,
    store: GeneratedStore,
    known_event: tuple[int, int],
    absent_event: tuple[int, int],
) -> None:
    keys = [known_event, absent_event]
    answer = client.post(LOOKUP, json={"events": keys, "formats": ["AOD"]}).json()
    expected = _reader(client).lookup(store.spec.collection, keys, formats=["AOD"])
    assert answer["results"] == [
        orjson.loads(orjson.dumps(e.to_dict())) if e else None for e in expected
    ]
    assert answer["results"][0]["locations"] and answer["results"][1] is None
    assert answer["found"] == 1 and answer["missing"] == [list(absent_event)]


def test_metrics_and_access_log_count_lookups(
    client: TestClient, known_event: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    body = {"events": [list(known_event)]}
    before = parse_metrics(client.get("/metrics").text)
    with caplog.at_level(logging.INFO, logger="eventindex.access"):
        for _ in range(3):
            assert client.post(LOOKUP, json=body).status_code == 200
    after = parse_metrics(client.get("/metrics").text)
    ok = 'eventindex_http_requests_total{method="POST",route="/v1/events/lookup",status="200"}'
    assert after[ok] - before.get(ok, 0) == 3
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "eventindex.access"]
    assert [(line["route"], line["status"]) for line in lines] == [(LOOKUP, 200)] * 3
