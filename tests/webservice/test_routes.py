"""Every route in-process: what it answers matches what the Reader and the catalog say,
and what the generator wrote."""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fastapi.testclient import TestClient

from catalog import FileKind
from eventindex import __version__
from eventindex.query import Reader
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import LIMITS, assert_problem


def row_of(table: pa.Table, run_number: int, event_number: int) -> dict[str, Any] | None:
    mask = pc.and_(
        pc.equal(table["run_number"], run_number), pc.equal(table["event_number"], event_number)
    )
    rows = table.filter(mask).to_pylist()
    return rows[0] if rows else None


@pytest.fixture(scope="module")
def reader(store: GeneratedStore) -> Reader:
    return Reader(store.catalog)


def test_health(client: TestClient) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "version": __version__, "collections": 1}


def test_pick_answers_what_the_reader_answers(
    client: TestClient,
    reader: Reader,
    store: GeneratedStore,
    raw_table: pa.Table,
    known_event: tuple[int, int],
) -> None:
    run, event = known_event
    response = client.get(f"/v1/events/{run}/{event}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    picked = response.json()
    expected = reader.pick(store.spec.collection, run, event)
    assert expected is not None
    assert picked == expected.to_dict()
    # And it is the generator's event: same lumiblock, same RAW file and entry.
    raw = row_of(raw_table, run, event)
    assert raw is not None
    assert picked["attributes"]["lumi_block"] == raw["lumi_block"]
    (raw_ref,) = [r for r in raw["references"] if r["format"] == "RAW"]
    (raw_loc,) = [loc for loc in picked["locations"] if loc["format"] == "RAW"]
    assert (raw_loc["guid"], raw_loc["position"]) == (raw_ref["guid"], raw_ref["position"])
    assert sorted({loc["format"] for loc in picked["locations"]}) == ["AOD", "DAOD_PHYS", "RAW"]


def test_pick_with_filters(client: TestClient, known_event: tuple[int, int]) -> None:
    run, event = known_event
    aod = client.get(f"/v1/events/{run}/{event}", params={"format": "AOD"}).json()
    assert [loc["format"] for loc in aod["locations"]] == ["AOD", "AOD"]
    both = client.get(f"/v1/events/{run}/{event}", params=[("format", "RAW"), ("format", "AOD")])
    assert sorted(loc["format"] for loc in both.json()["locations"]) == ["AOD", "AOD", "RAW"]
    pattern = "*.merge.AOD.r7562*"
    one = client.get(f"/v1/events/{run}/{event}", params={"dataset": pattern}).json()
    assert [loc["processing_tag"] for loc in one["locations"]] == ["r7562_p2521"]
    assert all(fnmatch.fnmatchcase(loc["dataset"], pattern) for loc in one["locations"])


def test_pick_with_collection_named(
    client: TestClient, store: GeneratedStore, known_event: tuple[int, int]
) -> None:
    run, event = known_event
    response = client.get(f"/v1/events/{run}/{event}", params={"collection": store.spec.collection})
    assert response.status_code == 200
    assert response.json()["collection"] == store.spec.collection


def test_pick_absent_event_is_404(client: TestClient, absent_event: tuple[int, int]) -> None:
    run, event = absent_event
    problem = assert_problem(client.get(f"/v1/events/{run}/{event}"), 404)
    assert f"{run}/{event}" in problem["detail"]
    assert "errors" not in problem  # nothing was wrong with the input


def test_pick_dataset_pattern_matching_nothing_is_404(
    client: TestClient, known_event: tuple[int, int]
) -> None:
    run, event = known_event
    assert_problem(client.get(f"/v1/events/{run}/{event}", params={"dataset": "mc16_*"}), 404)


def test_lookup_keeps_order_and_reports_missing(
    client: TestClient,
    reader: Reader,
    store: GeneratedStore,
    known_event: tuple[int, int],
    absent_event: tuple[int, int],
    raw_table: pa.Table,
) -> None:
    runs, events = raw_table["run_number"].to_pylist(), raw_table["event_number"].to_pylist()
    others = list(zip(runs, events, strict=True))[:5]
    asked = [known_event, absent_event, *others, known_event]
    response = client.post("/v1/events/lookup", json={"events": [list(k) for k in asked]})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["found"] == len(asked) - 1
    assert answer["missing"] == [list(absent_event)]
    assert len(answer["results"]) == len(asked)
    assert answer["results"][1] is None
    for key, result in zip(asked, answer["results"], strict=True):
        if key == absent_event:
            continue
        expected = reader.pick(store.spec.collection, *key)
        assert expected is not None
        assert result == expected.to_dict()


def test_lookup_with_filters(
    client: TestClient, store: GeneratedStore, known_event: tuple[int, int]
) -> None:
    body = {
        "collection": store.spec.collection,
        "events": [list(known_event)],
        "formats": ["RAW"],
        "dataset": "*",
    }
    answer = client.post("/v1/events/lookup", json=body).json()
    assert [loc["format"] for loc in answer["results"][0]["locations"]] == ["RAW"]


def test_lookup_at_the_limit_is_accepted(client: TestClient, known_event: tuple[int, int]) -> None:
    limit = LIMITS["max_lookup_events"]
    response = client.post("/v1/events/lookup", json={"events": [list(known_event)] * limit})
    assert response.status_code == 200
    assert response.json()["found"] == limit


def ndjson(text: str) -> list[dict[str, Any]]:
    assert text.endswith("\n") or text == ""
    return [json.loads(line) for line in text.splitlines()]


def test_select_streams_a_dataset(client: TestClient, store: GeneratedStore) -> None:
    run = store.spec.first_run
    name = store.dataset(run, "RAW")
    body = {"run_min": run, "run_max": run, "dataset": name, "columns": ["lumi_block"]}
    with client.stream("POST", "/v1/events/select", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        rows = ndjson(response.read().decode())
    table = store.tables[name]
    assert len(rows) == table.num_rows
    assert {tuple(row) for row in rows} == {("dataset", "run_number", "event_number", "lumi_block")}
    assert {r["dataset"] for r in rows} == {name}
    got = [(r["run_number"], r["event_number"], r["lumi_block"]) for r in rows]
    expected = sorted(
        zip(
            table["run_number"].to_pylist(),
            table["event_number"].to_pylist(),
            table["lumi_block"].to_pylist(),
            strict=True,
        )
    )
    assert got == expected  # key order


def test_select_limit_and_run_range(client: TestClient, store: GeneratedStore) -> None:
    last = store.spec.run_numbers[-1]
    body = {"run_min": last, "run_max": last, "limit": 7}
    rows = ndjson(client.post("/v1/events/select", json=body).text)
    assert len(rows) == 7
    assert {r["run_number"] for r in rows} == {last}
    assert "references" in rows[0] and isinstance(rows[0]["l1_tbp"], str)  # masks as hex


def test_select_of_an_empty_range_is_an_empty_stream(client: TestClient) -> None:
    response = client.post("/v1/events/select", json={"run_min": 1, "run_max": 2})
    assert response.status_code == 200
    assert response.text == ""


def test_select_chunks_large_answers(client: TestClient, store: GeneratedStore) -> None:
    run = store.spec.first_run
    body = {"run_min": run, "run_max": run, "dataset": store.dataset(run, "RAW")}
    with client.stream("POST", "/v1/events/select", json=body) as response:
        chunks = list(response.iter_raw())
    # The store's rows make several 64 kB chunks, each ending on a whole line.
    assert len(chunks) > 1
    assert all(chunk.endswith(b"\n") for chunk in chunks)


def test_files_events_match_the_generator(
    client: TestClient, store: GeneratedStore, raw_table: pa.Table
) -> None:
    references = raw_table["references"].to_pylist()
    guid = next(r["guid"] for r in references[0] if r["format"] == "RAW")
    expected = sorted(
        (run, event, ref["position"])
        for run, event, refs in zip(
            raw_table["run_number"].to_pylist(),
            raw_table["event_number"].to_pylist(),
            references,
            strict=True,
        )
        for ref in refs
        if ref["guid"] == guid
    )
    response = client.get(f"/v1/files/{guid}/events")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["guid"], answer["format"]) == (guid, "RAW")
    assert answer["dataset"] == store.dataset(store.spec.first_run, "RAW")
    assert answer["count"] == len(expected)
    got = [(e["run_number"], e["event_number"], e["position"]) for e in answer["events"]]
    assert sorted(got) == expected
    assert [e[2] for e in got] == sorted(e[2] for e in got)  # by position


def test_files_unknown_guid_is_404(client: TestClient) -> None:
    problem = assert_problem(
        client.get("/v1/files/00000000-0000-0000-0000-000000000000/events"), 404
    )
    assert "00000000-0000-0000-0000-000000000000" in problem["detail"]


def test_datasets_list(client: TestClient, store: GeneratedStore) -> None:
    response = client.get("/v1/datasets")
    assert response.status_code == 200
    listed = {d["name"]: d for d in response.json()}
    assert set(listed) == set(store.datasets)
    for name, table in store.tables.items():
        entry = listed[name]
        files = store.catalog.list_tagfiles(dataset=name)
        assert entry["files"] == len(files)
        assert entry["bytes"] == sum(f.bytes for f in files)
        masters = [f for f in files if f.kind is FileKind.MASTER]
        assert sum(f.rows for f in masters) == table.num_rows
        assert entry["format"] == store.datasets[name].format
        assert entry["collection"] == store.spec.collection
    same = client.get("/v1/datasets", params={"collection": store.spec.collection}).json()
    assert [d["name"] for d in same] == sorted(listed)


def test_dataset_detail(client: TestClient, store: GeneratedStore) -> None:
    name = store.dataset(store.spec.first_run, "AOD", "r7562")
    response = client.get(f"/v1/datasets/{name}")
    assert response.status_code == 200
    detail = response.json()
    assert detail["dataset"]["name"] == name
    assert detail["dataset"]["processing_tag"] == "r7562_p2521"
    files = store.catalog.list_tagfiles(dataset=name, states=None)
    assert {f["file_id"] for f in detail["files"]} == {f.file_id for f in files}
    assert sum(f["rows"] for f in detail["files"]) == store.tables[name].num_rows
    assert all(f["state"] == "committed" for f in detail["files"])


def test_unknown_dataset_is_404(client: TestClient) -> None:
    problem = assert_problem(client.get("/v1/datasets/no.such.dataset"), 404)
    assert "no.such.dataset" in problem["detail"]


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample line."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics(client: TestClient, known_event: tuple[int, int]) -> None:
    run, event = known_event
    before = parse_metrics(client.get("/metrics").text)
    for _ in range(3):
        assert client.get(f"/v1/events/{run}/{event}").status_code == 200
    assert client.get("/v1/events/-1/1").status_code == 422
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    after = parse_metrics(response.text)
    ok = (
        'eventindex_http_requests_total{method="GET",route="/v1/events/{run}/{event}",status="200"}'
    )
    bad = ok.replace('"200"', '"422"')
    assert after[ok] - before.get(ok, 0) == 3
    assert after[bad] - before.get(bad, 0) == 1
    labels = 'method="GET",route="/v1/events/{run}/{event}"'
    count = after[f"eventindex_http_request_duration_seconds_count{{{labels}}}"]
    assert after[f'eventindex_http_request_duration_seconds_bucket{{{labels},le="+Inf"}}'] == count
    buckets = [
        v
        for k, v in after.items()
        if k.startswith(f"eventindex_http_request_duration_seconds_bucket{{{labels}")
    ]
    assert buckets == sorted(buckets), "buckets are cumulative"
    assert after["eventindex_reader_picks_served_total"] >= 3
    assert after["eventindex_reader_open_files"] >= 1
    assert "eventindex_reader_key_cache_hits_total" in after
    assert "eventindex_reader_key_cache_misses_total" in after
    # Raw paths never become label values: one series per route, not per event.
    assert not any(f"/{event}" in key for key in after)
    assert re.search(
        r"^# TYPE eventindex_http_request_duration_seconds histogram$", response.text, re.M
    )


def test_access_log_is_one_json_line_per_request(
    client: TestClient, known_event: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    run, event = known_event
    with caplog.at_level(logging.INFO, logger="eventindex.access"):
        client.get(f"/v1/events/{run}/{event}?format=RAW")
        client.get("/v1/events/x/1")
    lines = [r.getMessage() for r in caplog.records if r.name == "eventindex.access"]
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["method"] == "GET"
    assert first["path"] == f"/v1/events/{run}/{event}"
    assert first["status"] == 200
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] > 0
    assert first["client"].startswith("testclient")
    assert second["status"] == 422


def test_openapi_documents_routes_errors_and_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {
        "/v1/health",
        "/v1/events/{run}/{event}",
        "/v1/events/lookup",
        "/v1/events/select",
        "/v1/files/{guid}/events",
        "/v1/datasets",
        "/v1/datasets/{name}",
        "/v1/admin/refresh",
        "/metrics",
    } <= set(paths)
    pick = paths["/v1/events/{run}/{event}"]["get"]
    assert set(pick["responses"]["404"]["content"]) == {"application/problem+json"}
    lookup = paths["/v1/events/lookup"]["post"]
    assert {"413", "415", "422"} <= set(lookup["responses"])
    assert (
        "application/x-ndjson" in paths["/v1/events/select"]["post"]["responses"]["200"]["content"]
    )
    components = schema["components"]["schemas"]
    assert components["LookupRequest"]["examples"]
    assert components["PickedEvent"]["examples"]
    assert "HTTPValidationError" not in components
    assert paths["/v1/admin/refresh"]["post"]["security"] == [{"AdminToken": []}]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
