"""``GET /v1/datasets/{name}/consistency`` serves the report ``eventindex check`` stored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from spark_jobs.consistency import plan_check, store_reports
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import assert_problem, make_client, service_settings


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    store = GeneratedStore.create(tmp_path_factory.mktemp("consistency-route"))
    try:
        yield store
    finally:
        store.close()


def _report(store: GeneratedStore, duplicates: int) -> dict[str, object]:
    """A report shaped as run_check builds it (the Spark side is tested in tests/spark_jobs)."""
    plan = plan_check(store.catalog, store.spec.collection)
    datasets = {
        d.name: {
            "dataset": d.name,
            "format": d.format,
            "events": store.tables[d.name].num_rows,
            "runs": {d.attributes["run_number"]: store.tables[d.name].num_rows},
            "missing_files": [],
            "duplicates": {"events": duplicates, "listed": []},
        }
        for d in plan.datasets
    }
    report = {"collection": store.spec.collection, "run_min": 0, "run_max": 9, "problems": 0}
    store_reports(store.catalog, str(store.root), {**report, "datasets": datasets}, plan)
    return report


def test_the_latest_report_is_served(checked: GeneratedStore) -> None:
    name = checked.dataset(checked.spec.first_run, "RAW")
    with make_client(service_settings(checked), catalog=checked.catalog) as client:
        missing = client.get(f"/v1/datasets/{name}/consistency")
        assert "has no consistency report" in assert_problem(missing, 404)["detail"]
        _report(checked, duplicates=1)
        _report(checked, duplicates=0)  # supersedes the first
        response = client.get(f"/v1/datasets/{name}/consistency")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["dataset"] == name and body["duplicates"]["events"] == 0
        assert body["runs"] == {str(checked.spec.first_run): checked.tables[name].num_rows}
        assert_problem(client.get("/v1/datasets/no.such.dataset/consistency"), 404)
