"""``POST /v1/events/select`` with a trigger expression: only the passing events stream."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.generated_store import GeneratedStore
from tests.query.test_trigger_select import brute_force
from tests.webservice.conftest import assert_problem


@pytest.fixture(scope="module")
def expression(indexed: GeneratedStore) -> str:
    menus = indexed.catalog.list_trigger_menus()
    hlt = list(next(m for m in menus if m.level == "HLT").bits.values())
    l1 = list(next(m for m in menus if m.level == "L1").bits.values())
    return f"({hlt[0]} OR {l1[0]}) AND NOT {l1[1]}"


@pytest.mark.parametrize("pattern", ["*.daq.RAW", "*.merge.AOD.r7562_p2521"])
def test_the_stream_holds_the_passing_events_only(
    indexed_client: TestClient, indexed: GeneratedStore, expression: str, pattern: str
) -> None:
    runs = indexed.spec.run_numbers
    body = {
        "run_min": runs[0],
        "run_max": runs[-1],
        "dataset": pattern,
        "trigger": expression,
        "columns": ["smk"],
    }
    response = indexed_client.post("/v1/events/select", json=body)
    assert response.status_code == 200, response.text
    rows = [json.loads(line) for line in response.text.splitlines()]
    fmt, _, tag = pattern.split(".", 2)[-1].partition(".")
    expected = []
    for run in runs:
        name = indexed.dataset(run, "RAW" if fmt == "RAW" else "AOD", tag[:5])
        table = indexed.tables[name].sort_by("event_number")
        keep = brute_force(indexed, table, expression)
        expected += [
            (name, run, event)
            for event, k in zip(table["event_number"].to_pylist(), keep, strict=True)
            if k
        ]
    assert 0 < len(expected) < sum(t.num_rows for t in indexed.tables.values())
    assert [(r["dataset"], r["run_number"], r["event_number"]) for r in rows] == expected
    assert set(rows[0]) == {"dataset", "run_number", "event_number", "smk"}


@pytest.mark.parametrize(
    ("trigger", "status", "words"),
    [
        ("L1_XE50 AND", 422, "position 12"),
        ("(L1_XE50", 422, "missing ')'"),
        ("L1_XE50 $", 422, "'$'"),
        ("HLT_nope OR L1_XE50", 404, "unknown trigger 'HLT_nope'"),
        ("", 422, None),
    ],
)
def test_bad_expressions_are_problems_naming_the_field(
    indexed_client: TestClient,
    indexed: GeneratedStore,
    trigger: str,
    status: int,
    words: str | None,
) -> None:
    run = indexed.spec.first_run
    response = indexed_client.post(
        "/v1/events/select", json={"run_min": run, "run_max": run, "trigger": trigger}
    )
    problem = assert_problem(response, status, "trigger", "body")
    if words is not None:
        assert words in problem["detail"]
