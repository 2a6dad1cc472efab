"""``eventindex serve``: a real uvicorn server in a subprocess, on loopback, over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.loadgen import run_load
from eventindex.config import WebServiceSettings
from eventindex.query import Reader
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import TOKEN, assert_problem

pytestmark = pytest.mark.integration

EVENTINDEX = Path(sys.executable).parent / "eventindex"
STARTUP_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path

    def logs(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()


def start_server(store: GeneratedStore, directory: Path) -> Server:
    port = free_port()
    stdout, stderr = directory / "stdout.log", directory / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTINDEX_")}
    command = [
        str(EVENTINDEX),
        "--store",
        str(store.root),
        "--catalog",
        str(store.catalog_path),
        "--set",
        f'webservice.tokens=["{TOKEN}"]',  # travels to the worker as an environment variable
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=directory, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", stdout, stderr)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.logs()}")
        try:
            if httpx.get(f"{server.url}/v1/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"server did not answer within {STARTUP_TIMEOUT_S} s:\n{server.logs()}")


@pytest.fixture(scope="module")
def server(store: GeneratedStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start_server(store, tmp_path_factory.mktemp("server"))
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.process.kill()
            started.process.wait()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_health(http: httpx.Client) -> None:
    answer = http.get("/v1/health").json()
    assert answer["status"] == "ok" and answer["collections"] == 1


def test_pick_over_http(
    http: httpx.Client, store: GeneratedStore, known_event: tuple[int, int]
) -> None:
    run, event = known_event
    response = http.get(f"/v1/events/{run}/{event}")
    assert response.status_code == 200
    with Reader(store.catalog) as reader:
        expected = reader.pick(store.spec.collection, run, event)
    assert expected is not None
    assert response.json() == expected.to_dict()


def test_lookup_over_http(
    http: httpx.Client, known_event: tuple[int, int], absent_event: tuple[int, int]
) -> None:
    response = http.post("/v1/events/lookup", json={"events": [known_event, absent_event]})
    assert response.status_code == 200
    answer = response.json()
    assert answer["found"] == 1 and answer["missing"] == [list(absent_event)]


def test_select_streams_over_http(http: httpx.Client, store: GeneratedStore) -> None:
    run = store.spec.first_run
    name = store.dataset(run, "RAW")
    body = {"run_min": run, "run_max": run, "dataset": name, "columns": ["lumi_block"]}
    with http.stream("POST", "/v1/events/select", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers.get("transfer-encoding") == "chunked"
        rows = [json.loads(line) for line in response.iter_lines() if line]
    assert len(rows) == store.tables[name].num_rows


def test_bad_input_over_http(http: httpx.Client) -> None:
    assert_problem(http.get("/v1/events/-1/5"), 422, "run", "path")
    assert_problem(http.get(f"/v1/events/1/{2**64}"), 422, "event", "path")
    bad_json = http.post(
        "/v1/events/lookup", content=b"{", headers={"content-type": "application/json"}
    )
    assert_problem(bad_json, 400, "body")
    text = http.post("/v1/events/lookup", content=b"{}", headers={"content-type": "text/plain"})
    assert_problem(text, 415, "content-type", "header")


def test_body_over_the_default_limit_is_413_over_http(http: httpx.Client) -> None:
    limit = WebServiceSettings().max_body_bytes
    body = b"[" + b" " * limit + b"]"
    response = http.post(
        "/v1/events/lookup", content=body, headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "body", "body")


def test_admin_token_from_the_command_line(http: httpx.Client) -> None:
    assert_problem(http.post("/v1/admin/refresh"), 401)
    refreshed = http.post("/v1/admin/refresh", headers={"authorization": f"Bearer {TOKEN}"})
    assert refreshed.status_code == 200, refreshed.text


def test_metrics_over_http(http: httpx.Client, known_event: tuple[int, int]) -> None:
    http.get("/v1/events/{}/{}".format(*known_event))
    text = http.get("/metrics").text
    assert 'route="/v1/events/{run}/{event}",status="200"' in text
    assert "eventindex_reader_open_files" in text


def test_load_generator_against_the_real_server(
    server: Server, known_event: tuple[int, int], absent_event: tuple[int, int]
) -> None:
    run, event = known_event
    paths = [f"/v1/events/{run}/{event}", "/v1/health"]
    result = run_load(server.url, paths, rate=40, seconds=1.0, connections=4)
    assert result.errors == 0 and len(result.latencies) == 40
    assert result.statuses == {200: 40}
    summary = result.summary()
    assert summary["requests_ok"] == 40 and summary["p99_ms"] > 0
    # An absent event is a 404: counted as an error, with its status.
    missing = run_load(server.url, ["/v1/events/{}/{}".format(*absent_event)], rate=10, seconds=0.5)
    assert missing.errors == 5 and missing.statuses == {404: 5} and not missing.latencies


def test_load_generator_targets_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        run_load("http://192.0.2.1:8080", ["/v1/health"], rate=1, seconds=1)


def test_access_log_lines_and_clean_stop(server: Server, http: httpx.Client) -> None:
    http.get("/v1/health")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=STOP_TIMEOUT_S) == 0, server.logs()
    access = [json.loads(line) for line in server.stdout.read_text().splitlines()]
    assert access, server.logs()
    assert {"method", "path", "status", "duration_ms", "client"} <= set(access[-1])
    assert access[-1]["path"] == "/v1/health" and access[-1]["status"] == 200
    assert access[-1]["client"].startswith("127.0.0.1:")
    errors = server.stderr.read_text()
    assert "Traceback" not in errors
    assert "Application shutdown complete" in errors
