"""``/v1/triggers/count`` and ``/v1/triggers/overlap`` over an indexed generated store."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from eventindex.query.triggers import TriggerIndex
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import assert_problem


@pytest.fixture(scope="module")
def names(indexed: GeneratedStore) -> list[str]:
    menu = indexed.catalog.list_trigger_menus()
    l1 = next(m for m in menu if m.level == "L1")
    hlt = next(m for m in menu if m.level == "HLT")
    return [*list(hlt.bits.values())[:2], *list(l1.bits.values())[:2]]


def test_count_matches_the_query_module(
    indexed_client: TestClient, indexed: GeneratedStore, names: list[str]
) -> None:
    expression = f"({names[0]} OR {names[2]}) AND NOT {names[3]}"
    first = indexed.spec.first_run
    response = indexed_client.get(
        "/v1/triggers/count",
        params={"expr": expression, "dataset": "*.daq.RAW", "run_min": first, "run_max": first},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    expected = TriggerIndex(indexed.catalog).count(
        expression, dataset="*.daq.RAW", run_min=first, run_max=first
    )
    assert (body["passed"], body["events"]) == (expected.passed, expected.events)
    assert 0 < body["passed"] < body["events"]
    assert [r["run_number"] for r in body["runs"]] == [first]
    assert body["unindexed_files"] == 0


def test_overlap_matrix(
    indexed_client: TestClient, indexed: GeneratedStore, names: list[str]
) -> None:
    response = indexed_client.get(
        "/v1/triggers/overlap", params={"trigger": names, "dataset": "*.daq.RAW"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    matrix = body["matrix"]
    assert len(matrix) == len(names) and body["counts"] == [matrix[i][i] for i in range(4)]
    for i in range(4):
        assert matrix[i] == [row[i] for row in matrix]  # symmetric
        assert all(matrix[i][j] <= matrix[i][i] for j in range(4))
    single = indexed_client.get(
        "/v1/triggers/count", params={"expr": f"{names[0]} AND {names[2]}", "dataset": "*.daq.RAW"}
    )
    assert single.json()["passed"] == matrix[0][2]


@pytest.mark.parametrize(
    ("params", "status", "field", "words"),
    [
        ({"expr": "L1_X AND (", "dataset": "*"}, 422, "expr", "position 11"),
        ({"expr": "HLT_nope", "dataset": "*"}, 404, "expr", "unknown trigger 'HLT_nope'"),
        ({"expr": "", "dataset": "*"}, 422, "expr", ""),
        ({"dataset": "*"}, 422, "expr", ""),
        ({"expr": "L1_XE50", "dataset": "*", "run_min": 5, "run_max": 4}, 422, "run_max", "below"),
    ],
)
def test_bad_count_requests_are_problems(
    indexed_client: TestClient, params: dict[str, Any], status: int, field: str, words: str
) -> None:
    problem = assert_problem(
        indexed_client.get("/v1/triggers/count", params=params), status, field, "query"
    )
    assert words in problem["detail"]


def test_unknown_dataset_is_404(indexed_client: TestClient, names: list[str]) -> None:
    response = indexed_client.get(
        "/v1/triggers/count", params={"expr": names[0], "dataset": "nothing.*"}
    )
    problem = assert_problem(response, 404)
    assert "no dataset matches 'nothing.*'" in problem["detail"]
    bad = indexed_client.get(
        "/v1/triggers/overlap", params={"trigger": [names[0], "A_B OR"], "dataset": "*"}
    )
    assert_problem(bad, 422, "trigger", "query")
