"""``/v1/queries``: submit, follow, fetch and cancel, with a scan worker on the same registry."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from eventindex.config import QuerySettings, Settings
from eventindex.query.registry import QueryRegistry
from eventindex.query.scan import ScanWorker
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import TOKEN, assert_problem, make_client, service_settings

COLLECTION = "data15_13TeV.physics_Main"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def settings(store: GeneratedStore, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    folder = tmp_path_factory.mktemp("queries")
    base = service_settings(store, tokens=[TOKEN, "alice:wonderland"])
    queries = QuerySettings(
        registry=str(folder / "queries.sqlite"),
        results_dir=str(folder / "results"),
        max_result_rows=5000,
    )
    return base.model_copy(update={"queries": queries})


@pytest.fixture(scope="module")
def api(settings: Settings, store: GeneratedStore) -> Iterator[TestClient]:
    with make_client(settings, catalog=store.catalog) as opened:
        yield opened


def drain(settings: Settings, store: GeneratedStore) -> None:
    """What ``eventindex scan-worker`` does, until nothing is left."""
    with QueryRegistry(settings.queries.registry) as registry:
        worker = ScanWorker(store.catalog, registry, settings.queries, name="test-worker")
        worker.run(threading.Event(), until_idle=True)


def submit(api: TestClient, sql: str, headers: dict[str, str] = AUTH) -> dict[str, object]:
    response = api.post("/v1/queries", json={"sql": sql}, headers=headers)
    assert response.status_code == 202, response.text
    answer: dict[str, object] = response.json()
    assert response.headers["location"] == f"/v1/queries/{answer['id']}"
    return answer


def test_submit_follow_and_fetch(
    api: TestClient, settings: Settings, store: GeneratedStore
) -> None:
    sql = (
        f"SELECT dataset, COUNT(*) AS n, MAX(lumi_block) AS top FROM {COLLECTION} "
        "GROUP BY dataset ORDER BY dataset"
    )
    started = time.monotonic()
    queued = submit(api, sql)
    assert time.monotonic() - started < 5  # the id comes back at once
    assert queued["state"] == "queued"
    assert str(queued["submitter"]).startswith("token-")
    status = api.get(f"/v1/queries/{queued['id']}", headers=AUTH).json()
    assert status["progress"] == {"units_done": 0, "units_total": 0}
    not_yet = assert_problem(api.get(f"/v1/queries/{queued['id']}/results", headers=AUTH), 409)
    assert "queued" in not_yet["detail"]

    drain(settings, store)
    status = api.get(f"/v1/queries/{queued['id']}", headers=AUTH).json()
    assert status["state"] == "done", status
    assert status["progress"]["units_done"] == status["progress"]["units_total"] > 1
    assert status["route"] == "scan" and status["result_rows"] == len(store.tables)

    expected = {name: table.num_rows for name, table in store.tables.items()}
    as_json = api.get(f"/v1/queries/{queued['id']}/results", headers=AUTH).json()
    assert [c["name"] for c in as_json["columns"]] == ["dataset", "n", "top"]
    assert {row["dataset"]: row["n"] for row in as_json["rows"]} == expected
    as_csv = api.get(f"/v1/queries/{queued['id']}/results?format=csv", headers=AUTH)
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = pacsv.read_csv(io.BytesIO(as_csv.content))
    assert dict(zip(table["dataset"].to_pylist(), table["n"].to_pylist(), strict=True)) == expected
    as_parquet = api.get(f"/v1/queries/{queued['id']}/results?format=parquet", headers=AUTH)
    assert pq.read_table(io.BytesIO(as_parquet.content)).to_pylist() == as_json["rows"]


def test_a_pick_is_answered_at_once(api: TestClient, store: GeneratedStore) -> None:
    run = store.spec.first_run
    event = store.tables[store.dataset(run, "RAW")]["event_number"][10].as_py()
    answer = submit(
        api,
        f"SELECT dataset, l1_tbp, references FROM {COLLECTION} "
        f"WHERE run_number = {run} AND event_number = {event}",
    )
    assert answer["state"] == "done" and answer["route"] == "direct"
    rows = api.get(f"/v1/queries/{answer['id']}/results", headers=AUTH).json()["rows"]
    assert store.dataset(run, "RAW") in {r["dataset"] for r in rows}
    assert all(isinstance(r["l1_tbp"], str) for r in rows)  # binary masks as hex
    nested = api.get(f"/v1/queries/{answer['id']}/results?format=csv", headers=AUTH)
    assert "nested column 'references'" in assert_problem(nested, 422, "format")["detail"]


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("SELECT * FROM a JOIN b ON a.x = b.x", "unsupported"),
        ("SELECT nope FROM data15_13TeV.physics_Main", "unknown_column"),
        ("SELECT bcid FROM nowhere", "unknown_table"),
        ("SELECT bcid FROM data15_13TeV.physics_Main WHERE bcid = 'x'", "type_error"),
        ("SELECT bcid FROM data15_13TeV.physics_Main LIMIT 100000", "too_many_rows"),
        ("this is not SQL", "unsupported"),
        ("SELECT bcid FROM", "syntax"),
    ],
)
def test_bad_queries_are_422(api: TestClient, sql: str, code: str) -> None:
    response = api.post("/v1/queries", json={"sql": sql}, headers=AUTH)
    problem = assert_problem(response, 422, "sql", "body")
    assert problem["errors"][0]["code"] == code


def test_tokens_are_required_and_name_the_submitter(api: TestClient) -> None:
    assert_problem(api.post("/v1/queries", json={"sql": "SELECT 1"}), 401)
    assert_problem(api.get("/v1/queries/abc"), 401)
    bad = {"authorization": "Bearer wrong"}
    assert_problem(api.post("/v1/queries", json={"sql": "SELECT 1"}, headers=bad), 403)
    alice = {"authorization": "Bearer alice:wonderland"}
    mine = submit(api, f"SELECT COUNT(*) FROM {COLLECTION} WHERE bcid < 10", headers=alice)
    assert mine["submitter"] == "alice"
    listed = api.get("/v1/queries", headers=alice).json()["queries"]
    assert [q["id"] for q in listed] == [mine["id"]]
    assert all(
        q["submitter"] != "alice" for q in api.get("/v1/queries", headers=AUTH).json()["queries"]
    )


def test_cancel(api: TestClient, settings: Settings, store: GeneratedStore) -> None:
    assert_problem(api.delete("/v1/queries/0123456789abcdef", headers=AUTH), 404, "query_id")
    assert_problem(api.get("/v1/queries/nope", headers=AUTH), 404, "query_id")
    assert_problem(api.get("/v1/queries/nope/results", headers=AUTH), 404, "query_id")
    doomed = submit(api, f"SELECT MIN(timestamp) FROM {COLLECTION}")
    cancelled = api.delete(f"/v1/queries/{doomed['id']}", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    drain(settings, store)
    again = assert_problem(api.delete(f"/v1/queries/{doomed['id']}", headers=AUTH), 409)
    assert "cancelled" in again["detail"]
    gone = assert_problem(api.get(f"/v1/queries/{doomed['id']}/results", headers=AUTH), 409)
    assert "cancelled" in gone["detail"]


def test_results_expire(api: TestClient, settings: Settings, store: GeneratedStore) -> None:
    done = submit(api, f"SELECT COUNT(*) AS n FROM {COLLECTION} WHERE lumi_block = 1")
    drain(settings, store)
    assert api.get(f"/v1/queries/{done['id']}", headers=AUTH).json()["state"] == "done"
    with QueryRegistry(settings.queries.registry) as registry:
        paths = registry.expire(now=time.time() + 10 * settings.queries.result_expiry_seconds)
    assert paths and all(Path(p).exists() for p in paths)
    assert_problem(api.get(f"/v1/queries/{done['id']}/results", headers=AUTH), 410)
