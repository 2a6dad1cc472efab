"""`eventindex lookup` and `eventindex pick`, on the local store and against a server.

Commands run in-process through the console-script entry point (``main``), so
exit codes and one-line errors are what a shell sees, without paying an
interpreter start per case. The server is a stdlib HTTP server on loopback that
answers with canned responses shaped as the web service's, and records what it
was asked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from eventindex.cli import main
from eventindex.cli.pick_cmd import CSV_HEADER, _RemoteSource
from eventindex.generator import GeneratorSpec
from eventindex.query import PickedEvent, Reader
from tests.generated_store import GeneratedStore

SPEC = GeneratorSpec(runs=2, events_per_run=1000)
EVENTINDEX = Path(sys.executable).parent / "eventindex"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error(self) -> str:
        """stderr as one line of words (usage errors come in a wrapped box)."""
        return " ".join(self.stderr.replace("│", " ").split())


class Cli:
    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], store: Path
    ) -> None:
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        self.options = ["--store", str(store / "store"), "--catalog", str(store / "catalog.sqlite")]
        for name in list(os.environ):
            if name.startswith("EVENTINDEX_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("NO_COLOR", "1")
        monkeypatch.setenv("COLUMNS", "300")

    def __call__(self, *args: str, stdin: str | None = None) -> Result:
        self.monkeypatch.setattr(sys, "argv", ["eventindex", *self.options, *args])
        self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        code: int = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        out, err = self.capsys.readouterr()
        return Result(code, _ANSI.sub("", out), _ANSI.sub("", err))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("lookup"), SPEC)
    try:
        yield generated
    finally:
        generated.close()


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], store: GeneratedStore
) -> Cli:
    return Cli(monkeypatch, capsys, store.root.parent)


@pytest.fixture(scope="module")
def events(store: GeneratedStore) -> list[tuple[int, int]]:
    """Existing events of both runs: some the derivation kept, some it dropped."""
    keys = []
    for run_number in SPEC.run_numbers:
        numbers = store.tables[store.dataset(run_number, "RAW")]["event_number"].to_pylist()
        keys += [(run_number, numbers[i]) for i in (3, 400, len(numbers) - 1)]
    return keys


@pytest.fixture(scope="module")
def missing(events: list[tuple[int, int]]) -> tuple[int, int]:
    return (events[0][0], events[0][1] - 1)


def local(store: GeneratedStore, keys: list[tuple[int, int]], **filters: Any) -> list[Any]:
    with Reader(store.catalog) as reader:
        return [
            None if p is None else p.to_dict()
            for p in reader.lookup(SPEC.collection, keys, **filters)
        ]


def csv_rows(results: list[Any]) -> list[list[str]]:
    return [
        [str(p["run_number"]), str(p["event_number"])]
        + [str(loc[k]) for k in ("dataset", "format", "processing_tag", "guid", "position")]
        for p in results
        if p is not None
        for loc in p["locations"]
    ]


# -- lookup on the local store ---------------------------------------------------------
def test_lookup_file_json(
    cli: Cli,
    store: GeneratedStore,
    tmp_path: Path,
    events: list[tuple[int, int]],
    missing: tuple[int, int],
) -> None:
    (r0, e0), (r1, e1), (r2, e2), *rest = events
    keys = [(r0, e0), missing, (r1, e1), (r2, e2), (r0, e0), *rest]
    lines = [
        "run_number,event_number",
        "# picked by hand",
        f"{r0} {e0}",
        f"{missing[0]},{missing[1]}",
        "",
        f"  {r1}\t{e1}   # trailing comment",
        f"{r2}, {e2}",
        f"{r0} {e0}",
        *(f"{r} {e}" for r, e in rest),
    ]
    path = tmp_path / "events.txt"
    path.write_text("\n".join(lines) + "\n")
    result = cli("lookup", "--file", str(path), "-o", "json")
    assert result.code == 1, result.stderr
    answer = result.json()
    assert answer["results"] == local(store, keys)
    assert answer["found"] == len(keys) - 1
    assert answer["missing"] == [list(missing)]
    assert answer["collection"] == SPEC.collection

    path.write_text("\n".join(f"{r} {e}" for r, e in events))
    every = cli("lookup", "--file", str(path), "-o", "json", "--format", "RAW")
    assert every.code == 0, every.stderr
    assert every.json()["missing"] == []
    assert every.json()["results"] == local(store, events, formats=["RAW"])


def test_lookup_stdin_csv(
    cli: Cli, store: GeneratedStore, events: list[tuple[int, int]], missing: tuple[int, int]
) -> None:
    keys = [*events, missing]
    text = "".join(f"{r},{e}\n" for r, e in keys)
    result = cli("lookup", "--file", "-", "--output", "csv", stdin=text)
    assert result.code == 1
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == list(CSV_HEADER)
    assert rows[1:] == csv_rows(local(store, keys))
    assert len(rows) > 2 * len(events), "one row per location"
    assert "found 6 of 7 events" in result.stderr

    aod = cli("lookup", "-f", "-", "-o", "csv", "--dataset", "*.r7562_p2521", stdin=text)
    assert {row[4] for row in list(csv.reader(io.StringIO(aod.stdout)))[1:]} == {"r7562_p2521"}


def test_lookup_text(
    cli: Cli, store: GeneratedStore, events: list[tuple[int, int]], missing: tuple[int, int]
) -> None:
    keys = [events[0], missing]
    result = cli("lookup", "-f", "-", stdin="\n".join(f"{r} {e}" for r, e in keys))
    assert result.code == 1
    (found, absent) = local(store, keys)
    assert absent is None
    assert f"run {events[0][0]} event {events[0][1]} in {SPEC.collection}" in result.stdout
    assert all(loc["guid"] in result.stdout for loc in found["locations"])
    assert f"run {missing[0]} event {missing[1]}: not found" in result.stdout
    assert "found 1 of 2 events" in result.stderr


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("284484", "expected 'RUN EVENT', got 1 fields"),
        ("284484 1 2", "got 3 fields"),
        ("abc 1", "run number 'abc'"),
        ("-1 5", "run number '-1'"),
        ("284484 1.5", "event number '1.5'"),
        (f"{2**32} 1", f"run number {2**32} is above"),
        (f"284484 {2**64}", f"event number {2**64} is above"),
        ("run_number,event_number", "run number 'run_number'"),
    ],
    ids=["one field", "three fields", "word", "negative", "decimal", "run", "event", "header"],
)
def test_lookup_bad_lines(cli: Cli, events: list[tuple[int, int]], bad: str, reason: str) -> None:
    (r0, e0), (r1, e1) = events[:2]
    text = f"{r0} {e0}\n# a comment\n{r1},{e1}\n{bad}\n{r0} {e0}\n"
    result = cli("lookup", "--file", "-", stdin=text)
    assert result.code == 2
    assert "line 4:" in result.error and reason in result.error, result.error
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("text", ["", "# nothing here\n\n", "run_number,event_number\n"])
def test_lookup_without_events(cli: Cli, text: str) -> None:
    result = cli("lookup", "-f", "-", stdin=text)
    assert result.code == 2
    assert "no events" in result.error


def test_lookup_errors(cli: Cli, tmp_path: Path, events: list[tuple[int, int]]) -> None:
    gone = cli("lookup", "--file", str(tmp_path / "absent.txt"))
    assert gone.code == 2 and "cannot read" in gone.error
    text = f"{events[0][0]} {events[0][1]}\n"
    unknown = cli("lookup", "-f", "-", "--collection", "mc16_13TeV.nothing", stdin=text)
    assert unknown.code == 2
    assert unknown.stderr.strip() == "error: collection 'mc16_13TeV.nothing' not found"


def test_pick_csv(cli: Cli, store: GeneratedStore, events: list[tuple[int, int]]) -> None:
    run_number, event_number = events[1]
    result = cli("pick", str(run_number), str(event_number), "-o", "csv")
    assert result.code == 0
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows == [list(CSV_HEADER), *csv_rows(local(store, [events[1]]))]
    absent = cli("pick", str(run_number), "1", "-o", "csv")
    assert absent.code == 1 and absent.stdout.strip() == ",".join(CSV_HEADER)


# -- against a server ------------------------------------------------------------------
@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Canned:
    status: int
    body: Any
    content_type: str = "application/json"


def problem(status: int, title: str, detail: str) -> Canned:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return Canned(status, body, "application/problem+json")


@dataclass
class FakeService:
    """Canned answers by (method, path), or computed from the request; every request kept."""

    url: str = ""
    routes: dict[tuple[str, str], Canned | Callable[[Request], Canned]] = field(
        default_factory=dict
    )
    requests: list[Request] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        service: FakeService = self.server.service  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            self.command,
            parts.path,
            parse_qs(parts.query),
            {k.lower(): v for k, v in self.headers.items()},
            self.rfile.read(length),
        )
        service.requests.append(request)
        route = service.routes.get((self.command, parts.path))
        if route is None:
            answer = problem(404, "Not Found", f"no route {parts.path}")
        else:
            answer = route(request) if callable(route) else route
        data = json.dumps(answer.body).encode()
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads ``requests`` instead."""


@pytest.fixture
def service() -> Iterator[FakeService]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    fake = FakeService(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.service = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_pick_over_http(
    cli: Cli, store: GeneratedStore, service: FakeService, events: list[tuple[int, int]]
) -> None:
    run_number, event_number = events[4]
    (picked,) = local(store, [events[4]])
    path = f"/v1/events/{run_number}/{event_number}"
    service.routes[("GET", path)] = Canned(200, picked)
    arguments = ["pick", str(run_number), str(event_number), "--url", service.url + "/"]
    as_json = cli(
        *arguments,
        "--collection",
        SPEC.collection,
        "--format",
        "AOD",
        "--format",
        "RAW",
        "--dataset",
        "*merge*",
        "--token",
        "s3cret",
        "-o",
        "json",
    )
    assert as_json.code == 0, as_json.stderr
    assert as_json.json() == picked
    (request,) = service.requests
    assert (request.method, request.path) == ("GET", path)
    assert request.query == {
        "collection": [SPEC.collection],
        "format": ["AOD", "RAW"],
        "dataset": ["*merge*"],
    }
    assert request.headers["authorization"] == "Bearer s3cret"

    remote_text = cli(*arguments)
    local_text = cli("pick", str(run_number), str(event_number))
    assert remote_text.code == local_text.code == 0
    assert remote_text.stdout == local_text.stdout
    assert "authorization" not in service.requests[-1].headers
    assert "collection" not in service.requests[-1].query, "the server picks the default"

    cli.monkeypatch.setenv("EVENTINDEX_TOKEN", "from-env")
    as_csv = cli(*arguments, "-o", "csv")
    assert as_csv.stdout == cli("pick", str(run_number), str(event_number), "-o", "csv").stdout
    assert service.requests[-1].headers["authorization"] == "Bearer from-env"


def test_pick_over_http_not_found(cli: Cli, service: FakeService) -> None:
    service.routes[("GET", "/v1/events/284484/7")] = problem(
        404, "Not Found", f"event 284484/7 is not in {SPEC.collection}"
    )
    text = cli("pick", "284484", "7", "--url", service.url)
    assert text.code == 1
    assert text.stdout.strip() == "event 284484/7 not found"
    as_json = cli("pick", "284484", "7", "--url", service.url, "-o", "json")
    assert as_json.code == 1 and as_json.json() is None


@pytest.mark.parametrize(
    "answer",
    [
        problem(422, "Unprocessable Content", "collection: 'x' is not an event collection"),
        Canned(
            404,
            {
                **problem(404, "Not Found", "collection (query): no collection 'x'").body,
                "errors": [{"field": "collection", "location": "query", "code": "not_found"}],
            },
            "application/problem+json",
        ),
        problem(503, "Service Unavailable", "catalog is down"),
        Canned(500, "<html>oops</html>", "text/html"),
        Canned(200, {"no": "event"}),
    ],
    ids=["422", "404 for a field", "503", "500 html", "bad 200"],
)
def test_pick_over_http_errors(cli: Cli, service: FakeService, answer: Canned) -> None:
    service.routes[("GET", "/v1/events/284484/7")] = answer
    result = cli("pick", "284484", "7", "--url", service.url)
    assert result.code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {service.url}")
    if isinstance(answer.body, dict) and "detail" in answer.body:
        assert f"answered {answer.status}: {answer.body['title']}: {answer.body['detail']}" in line
    assert result.stdout == ""


def test_connection_refused_is_one_line(cli: Cli, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    for arguments, stdin in ((["pick", "284484", "7"], None), (["lookup", "-f", "-"], "1 2\n")):
        result = cli(*arguments, "--url", url, stdin=stdin)
        assert result.code == 2
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: cannot reach the service at {url}")
        assert "refused" in line.lower()
    bad = cli("pick", "1", "2", "--url", "127.0.0.1:8080")
    assert bad.code == 2 and "http://" in bad.stderr


def test_connection_refused_from_the_installed_command(closed_port: int, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTINDEX_")}
    done = subprocess.run(
        [str(EVENTINDEX), "pick", "284484", "7", "--url", f"http://127.0.0.1:{closed_port}"],
        capture_output=True,
        text=True,
        env={**env, "NO_COLOR": "1"},
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the service") and "Traceback" not in line


def lookup_answer(results: list[Any], keys: list[tuple[int, int]]) -> dict[str, Any]:
    return {
        "results": results,
        "found": sum(r is not None for r in results),
        "missing": [list(k) for k, r in zip(keys, results, strict=True) if r is None],
    }


def test_lookup_over_http(
    cli: Cli,
    store: GeneratedStore,
    service: FakeService,
    events: list[tuple[int, int]],
    missing: tuple[int, int],
) -> None:
    keys = [events[0], missing, events[5]]
    results = local(store, keys)
    service.routes[("POST", "/v1/events/lookup")] = Canned(200, lookup_answer(results, keys))
    text = "".join(f"{r} {e}\n" for r, e in keys)
    remote = cli("lookup", "-f", "-", "--url", service.url, "-o", "json", stdin=text)
    assert remote.code == 1, remote.stderr
    assert remote.json() == cli("lookup", "-f", "-", "-o", "json", stdin=text).json()
    (request,) = service.requests
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "collection": None,
        "events": [list(k) for k in keys],
        "formats": None,
        "dataset": None,
    }

    found = cli(
        "lookup",
        "-f",
        "-",
        "--url",
        service.url,
        "--collection",
        SPEC.collection,
        "--format",
        "RAW",
        "--dataset",
        "*",
        "-o",
        "csv",
        stdin=text,
    )
    assert found.code == 1
    assert list(csv.reader(io.StringIO(found.stdout)))[1:] == csv_rows(results)
    assert service.requests[-1].json() == {
        "collection": SPEC.collection,
        "events": [list(k) for k in keys],
        "formats": ["RAW"],
        "dataset": "*",
    }


def test_lookup_over_http_in_batches(
    cli: Cli, store: GeneratedStore, service: FakeService, events: list[tuple[int, int]]
) -> None:
    answers = {tuple(k): p for k, p in zip(events, local(store, events), strict=True)}

    def answer(request: Request) -> Canned:
        keys = [tuple(k) for k in request.json()["events"]]
        return Canned(200, lookup_answer([answers[k] for k in keys], keys))

    service.routes[("POST", "/v1/events/lookup")] = answer
    cli.monkeypatch.setattr(_RemoteSource, "batch_size", 4)
    text = "".join(f"{r} {e}\n" for r, e in events)
    result = cli("lookup", "-f", "-", "--url", service.url, "-o", "json", stdin=text)
    assert result.code == 0, result.stderr
    assert [len(r.json()["events"]) for r in service.requests] == [4, 2]
    assert result.json()["results"] == [answers[k] for k in events]


@pytest.mark.parametrize(
    "answer",
    [
        Canned(200, {"results": []}),
        Canned(200, {"results": [{"collection": "c"}]}),
        problem(413, "Too many events", "events: 200001 events; at most 100000"),
        problem(404, "Not Found", "collection 'x' not found"),
    ],
    ids=["short", "malformed event", "413", "404"],
)
def test_lookup_over_http_errors(cli: Cli, service: FakeService, answer: Canned) -> None:
    service.routes[("POST", "/v1/events/lookup")] = answer
    result = cli("lookup", "-f", "-", "--url", service.url, stdin="284484 7\n")
    assert result.code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:")
    if answer.status != 200:
        assert answer.body["detail"] in line


def test_remote_answers_round_trip(store: GeneratedStore, events: list[tuple[int, int]]) -> None:
    (as_dict,) = local(store, events[:1])
    assert PickedEvent.from_dict(json.loads(json.dumps(as_dict))).to_dict() == as_dict
