"""``eventindex query ...`` and ``eventindex scan-worker`` on a local registry, and the
HTTP client of ``/v1/queries`` against the service in-process."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from eventindex.cli.app import app
from eventindex.config import QuerySettings, load_config
from eventindex.errors import EventIndexError
from eventindex.query.client import ServiceError
from eventindex.query.remote import QueryServiceClient
from tests.generated_store import GeneratedStore
from webservice.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

COLLECTION = "data15_13TeV.physics_Main"
COUNT_SQL = f"SELECT run_number, COUNT(*) AS n FROM {COLLECTION} GROUP BY run_number"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("cli-query"))
    try:
        yield generated
    finally:
        generated.close()


def invoke(store: GeneratedStore, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    flags = [
        "--store", str(store.root), "--catalog", str(store.catalog_path),
        "--set", f"queries.registry={tmp_path / 'queries.sqlite'}",
        "--set", f"queries.results_dir={tmp_path / 'results'}",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [*flags, *args], env={"EVENTINDEX_CONFIG": ""})
    if isinstance(result.exception, EventIndexError):
        # What ``eventindex.cli.main`` turns a project error into: status 2, one line.
        return 2, result.stdout, str(result.exception)
    return result.exit_code, result.stdout, result.stderr


def expected_counts(store: GeneratedStore) -> dict[int, int]:
    counts: dict[int, int] = {}
    for name, table in store.tables.items():
        run = int(name.split(".")[1])
        counts[run] = counts.get(run, 0) + table.num_rows
    return counts


def test_submit_run_and_fetch(store: GeneratedStore, tmp_path: Path) -> None:
    code, out, err = invoke(
        store, tmp_path, "query", "submit", COUNT_SQL, "--user", "ann", "-o", "json"
    )
    assert code == 0, err
    submitted = json.loads(out)
    assert submitted["state"] == "queued" and submitted["submitter"] == "ann"
    query_id = submitted["id"]
    code, out, err = invoke(store, tmp_path, "query", "result", query_id)
    assert code == 2 and "queued" in err
    # In this process: no niceness added to the test run (the real worker adds some).
    code, _, err = invoke(
        store, tmp_path, "--set", "queries.worker_nice=0", "scan-worker", "--once", "--name", "t"
    )
    assert code == 0, err
    code, out, _ = invoke(store, tmp_path, "query", "status", query_id)
    assert code == 0 and "done" in out and "rows" in out
    code, out, _ = invoke(store, tmp_path, "query", "result", query_id, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {int(r["run_number"]): int(r["n"]) for r in rows} == expected_counts(store)
    target = tmp_path / "answer.parquet"
    code, _, err = invoke(
        store, tmp_path, "query", "result", query_id, "-f", "parquet", "--out", str(target)
    )
    assert code == 0, err
    assert pq.read_table(target).num_rows == len(rows)


def test_bad_input_and_cancel(store: GeneratedStore, tmp_path: Path) -> None:
    code, _, err = invoke(store, tmp_path, "query", "submit", "SELECT nope FROM " + COLLECTION)
    assert code == 2 and "no column 'nope'" in err
    code, _, err = invoke(store, tmp_path, "query", "status", "missing")
    assert code == 2 and "no query 'missing'" in err
    code, out, _ = invoke(store, tmp_path, "query", "submit", COUNT_SQL, "-o", "json")
    query_id = json.loads(out)["id"]
    code, out, _ = invoke(store, tmp_path, "query", "cancel", query_id)
    assert code == 0 and "cancelled" in out
    code, _, err = invoke(store, tmp_path, "query", "cancel", query_id)
    assert code == 2 and "already finished" in err
    code, _, err = invoke(store, tmp_path, "query", "result", query_id, "-f", "parquet")
    assert code == 2 and "--out" in err


def test_the_http_client(store: GeneratedStore, tmp_path: Path) -> None:
    settings = load_config(
        overrides={
            "store.root": str(store.root),
            "catalog.path": str(store.catalog_path),
            "webservice.tokens": ["bob:secret"],
        },
        environ={},
    ).model_copy(
        update={
            "queries": QuerySettings(
                registry=str(tmp_path / "q.sqlite"), results_dir=str(tmp_path / "r")
            )
        }
    )
    with TestClient(create_app(settings, catalog=store.catalog)) as http:
        client = QueryServiceClient("", token="bob:secret", http=http)
        submitted = client.submit(COUNT_SQL)
        assert submitted["submitter"] == "bob" and submitted["state"] == "queued"
        assert client.status(submitted["id"])["id"] == submitted["id"]
        with pytest.raises(ServiceError) as not_done:
            client.result(submitted["id"], "json")
        assert not_done.value.status == 409
        assert client.cancel(submitted["id"])["state"] == "cancelled"
        with pytest.raises(ServiceError) as bad:
            client.submit("SELECT 1 FROM nowhere")
        assert bad.value.status == 422 and "no table 'nowhere'" in str(bad.value)
