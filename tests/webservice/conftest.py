"""A generated store, and the web service over it in-process (TestClient, lifespan run)."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pyarrow as pa
import pytest

from catalog.base import Catalog
from eventindex.config import Settings, load_config
from spark_jobs.indexer import plan_index, run_index
from tests.generated_store import GeneratedStore
from webservice.app import create_app
from webservice.problems import PROBLEM_MEDIA_TYPE

with warnings.catch_warnings():
    # Starlette suggests httpx2 for its TestClient; httpx is what we have and it works.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "s3cret-admin-token"
# Small limits, so the tests can cross them cheaply.
LIMITS: dict[str, Any] = {"max_body_bytes": 64 * 1024, "max_lookup_events": 50}


def service_settings(
    store: GeneratedStore, tokens: list[str] | None = None, **webservice: Any
) -> Settings:
    """Settings for ``store`` with the small test ``LIMITS`` (``webservice`` overrides
    any ``[webservice]`` setting), ignoring the environment of whoever runs the tests."""
    limits = {f"webservice.{name}": value for name, value in {**LIMITS, **webservice}.items()}
    return load_config(
        overrides={
            "store.root": str(store.root),
            "catalog.path": str(store.catalog_path),
            "webservice.tokens": [TOKEN] if tokens is None else tokens,
            # Submitted queries live beside the store, never in the working tree.
            "queries.registry": str(store.root.parent / "queries.sqlite"),
            "queries.results_dir": str(store.root.parent / "query-results"),
            **limits,
        },
        environ={},
    )


def make_client(settings: Settings, catalog: Catalog | None = None) -> TestClient:
    """A client of a new app; use it as a context manager, so the lifespan runs."""
    app = create_app(settings, catalog=catalog)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("webservice"))
    try:
        yield generated
    finally:
        generated.close()


@pytest.fixture(scope="session")
def client(store: GeneratedStore) -> Iterator[TestClient]:
    with make_client(service_settings(store), catalog=store.catalog) as opened:
        yield opened


@pytest.fixture(scope="session")
def raw_table(store: GeneratedStore) -> pa.Table:
    """The RAW dataset of the first run, as the generator made it."""
    return store.tables[store.dataset(store.spec.first_run, "RAW")]


@pytest.fixture(scope="session")
def known_event(store: GeneratedStore) -> tuple[int, int]:
    """An event the derivation kept, so every format holds it."""
    run_number = store.spec.first_run
    daod = store.tables[store.dataset(run_number, "DAOD_PHYS")]
    events = sorted(daod["event_number"].to_pylist())
    return run_number, events[len(events) // 2]


@pytest.fixture(scope="session")
def absent_event(raw_table: pa.Table, store: GeneratedStore) -> tuple[int, int]:
    """An event number of the first run that no dataset holds (a gap in RAW)."""
    events = sorted(raw_table["event_number"].to_pylist())
    gap = next(a + 1 for a, b in itertools.pairwise(events) if b > a + 1)
    return store.spec.first_run, gap


def assert_problem(
    response: httpx.Response,
    status: int,
    field: str | None = None,
    location: str | None = None,
) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem with ``status``, naming ``field`` if given."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE, response.headers
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["title"] and problem["detail"] and problem["type"]
    assert problem["instance"] == response.request.url.path
    if field is not None:
        fields = [(e["field"], e["location"]) for e in problem.get("errors", [])]
        assert any(f == field and location in (None, loc) for f, loc in fields), (field, fields)
        assert field in problem["detail"], problem["detail"]
    return problem


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    """A generated store whose RAW datasets carry trigger indexes (one per module)."""
    store = GeneratedStore.create(tmp_path_factory.mktemp("trigger-indexed"))
    tasks, _ = plan_index(store.catalog, str(store.root), "*.daq.RAW")
    run_index(store.catalog, tasks)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(scope="module")
def indexed_client(indexed: GeneratedStore) -> Iterator[TestClient]:
    with make_client(service_settings(indexed), catalog=indexed.catalog) as opened:
        yield opened
