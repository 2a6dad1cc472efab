"""The query registry: states, progress, cancellation, leases and expiry, across handles."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from eventindex.errors import NotFoundError
from eventindex.query.registry import QueryRegistry, QueryState


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "nested" / "queries.sqlite")


def test_a_query_goes_from_queued_to_done(path: str) -> None:
    with QueryRegistry(path) as registry:
        record = registry.submit("SELECT 1 FROM t", "t", "ann")
        assert record.state is QueryState.QUEUED and record.submitter == "ann"
        assert registry.claim(record.id, "w", 10, "scan")
        assert not registry.claim(record.id, "w2", 10, "scan")  # claimed once
        registry.progress("w", {record.id: (4, 3)})
        running = registry.get(record.id)
        assert (running.state, running.units_done, running.units_shared) == (
            QueryState.RUNNING,
            4,
            3,
        )
        assert registry.finish(
            record.id, "/r.parquet", 7, units_done=10, units_shared=9, expiry_seconds=60
        )
        done = registry.get(record.id)
        assert done.state is QueryState.DONE and done.result_rows == 7
        assert done.expires_at is not None and done.expires_at > time.time()
        public = done.to_dict()
        assert public["progress"] == {"units_done": 10, "units_total": 10}
        assert "worker" not in public and "result_path" not in public


def test_a_second_handle_sees_the_same_queries(path: str) -> None:
    with QueryRegistry(path) as first, QueryRegistry(path) as second:
        record = first.submit("SELECT 1 FROM t", "t", "ann")
        assert second.get(record.id).sql == "SELECT 1 FROM t"
        assert [r.id for r in second.find(states=[QueryState.QUEUED])] == [record.id]
        assert second.find(submitter="bob") == []


def test_cancel_and_fail(path: str) -> None:
    with QueryRegistry(path) as registry:
        queued = registry.submit("q1", "t", "ann")
        running = registry.submit("q2", "t", "ann")
        registry.claim(running.id, "w", 3, "scan")
        assert registry.cancel(queued.id).state is QueryState.CANCELLED
        assert registry.cancel(running.id).state is QueryState.CANCELLED
        # A result arriving after the cancel is not recorded.
        assert not registry.finish(
            running.id, "/x", 1, units_done=3, units_shared=0, expiry_seconds=1
        )
        failing = registry.submit("q3", "t", "ann")
        registry.fail(failing.id, "boom", "failed")
        assert registry.get(failing.id).error == "boom"
        assert registry.cancel(failing.id).state is QueryState.FAILED  # finished: unchanged
        with pytest.raises(NotFoundError):
            registry.cancel("nope")
        assert registry.states_of([queued.id, "nope"]) == {queued.id: QueryState.CANCELLED}


def test_stale_and_restarted_workers_give_their_queries_back(path: str) -> None:
    with QueryRegistry(path) as registry:
        mine = registry.submit("q1", "t", "ann")
        other = registry.submit("q2", "t", "ann")
        registry.claim(mine.id, "w1", 5, "scan")
        registry.claim(other.id, "w2", 5, "scan")
        registry.progress("w1", {mine.id: (2, 0)})
        assert registry.requeue_stale(3600, worker="w1") == 1
        again = registry.get(mine.id)
        assert again.state is QueryState.QUEUED and again.units_done == 0
        assert registry.get(other.id).state is QueryState.RUNNING
        assert registry.requeue_stale(0.0) == 1  # w2 went quiet
        assert registry.get(other.id).state is QueryState.QUEUED


def test_results_expire(path: str) -> None:
    with QueryRegistry(path) as registry:
        record = registry.submit("q", "t", "ann")
        registry.claim(record.id, "w", 1, "scan")
        registry.finish(record.id, "/r.parquet", 1, units_done=1, units_shared=0, expiry_seconds=5)
        assert registry.expire() == []
        assert registry.expire(now=time.time() + 10) == ["/r.parquet"]
        expired = registry.get(record.id)
        assert expired.state is QueryState.EXPIRED and expired.result_path is None
