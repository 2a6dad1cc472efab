"""Batch lookups over HTTP (``POST /v1/events/lookup``): the service against a baseline
``webservice`` package, in the same run, on the same keys.

Each server is a real uvicorn process on loopback (one worker, the service's own
logging: JSON access log on), over the same store:

* ``current``: the service as ``eventindex serve`` runs it;
* ``before`` (with ``--before DIR``): the ``webservice`` package found in ``DIR``
  (e.g. ``git archive HEAD webservice | tar -x -C DIR``), everything else as here.

Keys are random existing events of the store (``benchmarks.pick.sample_keys``); each
request is a random ``--keys`` of them (``--large-keys`` for the few large ones).
All servers run at once and take turns on each body (so a change in the machine's
load falls on all alike); every body is sent once to warm them (files opened, pages
cached), then again to measure: ``*_p50_ms`` is the client's wall time per request,
and ``*_server_cpu_ms`` the server's CPU time per request (all threads, from
``/proc``), steadier than wall time on a shared machine. The servers' answers are
checked to be the same. The store defaults to the shared 100 M-event one of ``bench
pick`` (with its locations files), which must exist: this benchmark never builds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from benchmarks.common import emit, event_store_paths, percentiles_ms
from benchmarks.pick import (
    LOG_DIR,
    Key,
    _free_port,
    process_cpu_seconds,
    sample_keys,
    serving,
)
from catalog.model import FileKind
from catalog.sqlite import SQLiteCatalog
from eventindex.config import ENV_PREFIX
from eventindex.query import Reader

LOOKUP = "/v1/events/lookup"
FACTORY = "webservice.app:app_from_environment"


def _serve(factory: str, port: int) -> None:
    """Run one server as ``eventindex serve`` does (its logging), in this process."""
    import uvicorn

    from eventindex.cli.serve_cmd import LogLevel, log_config

    uvicorn.run(
        factory,
        factory=True,
        host="127.0.0.1",
        port=port,
        log_config=log_config(LogLevel.INFO),
        access_log=False,
        proxy_headers=False,
    )


@contextlib.contextmanager
def running_server(
    name: str, store: str, catalog: str, before: str | None
) -> Iterator[tuple[str, int]]:
    """A server of the service on loopback for the block: its URL and process id.
    ``before`` servers run in that directory, so its ``webservice`` package is imported."""
    port = _free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"lookup-server-{name}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    environ[f"{ENV_PREFIX}STORE__ROOT"] = str(Path(store).resolve())
    environ[f"{ENV_PREFIX}CATALOG__PATH"] = str(Path(catalog).resolve())
    code = f"from benchmarks.lookup import _serve; _serve({FACTORY!r}, {port})"
    workdir = before if name == "before" else None
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=workdir,
        )
    with serving(process, url, log, f"{name} server"):
        yield url, process.pid


def _bodies(
    collection: str, pool: Sequence[Key], size: int, count: int, rng: np.random.Generator
) -> list[bytes]:
    """``count`` lookup bodies of ``size`` distinct random keys of ``pool`` each."""
    bodies = []
    for _ in range(count):
        chosen = rng.choice(len(pool), size=min(size, len(pool)), replace=False)
        events = [list(pool[int(i)]) for i in chosen]
        bodies.append(orjson.dumps({"collection": collection, "events": events}))
    return bodies


def measure(
    servers: dict[str, tuple[str, int]], batches: dict[str, list[bytes]]
) -> tuple[dict[str, dict[str, Any]], dict[str, bytes]]:
    """Latency and server CPU per request of each server and batch size, warm; and each
    server's answer to the first body.

    The servers take turns on each body (in a rotating order), so a change in the
    machine's load between measurements falls on all of them alike.
    """
    headers = {"content-type": "application/json"}
    names = list(servers)
    clients = {name: httpx.Client(base_url=url, timeout=120) for name, (url, _) in servers.items()}
    try:

        def post(name: str, body: bytes) -> bytes:
            response = clients[name].post(LOOKUP, content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{name}: {response.status_code} {response.text[:200]}")
            return response.content

        first = {name: post(name, batches[next(iter(batches))][0]) for name in names}
        for bodies in batches.values():
            for body in bodies:
                for name in names:
                    post(name, body)  # warm: files opened, pages cached
        figures: dict[str, dict[str, Any]] = {name: {} for name in names}
        for label, bodies in batches.items():
            durations: dict[str, list[float]] = {name: [] for name in names}
            cpu = dict.fromkeys(names, 0.0)
            for turn, body in enumerate(bodies):
                for name in names[turn % len(names) :] + names[: turn % len(names)]:
                    pid = servers[name][1]
                    cpu_before = process_cpu_seconds(pid)
                    started = time.perf_counter()
                    post(name, body)
                    durations[name].append(time.perf_counter() - started)
                    cpu[name] += process_cpu_seconds(pid) - cpu_before
            for name in names:
                latency = percentiles_ms(durations[name])
                figures[name][f"{label}_p50_ms"] = round(latency["p50"], 2)
                figures[name][f"{label}_p90_ms"] = round(latency["p90"], 2)
                figures[name][f"{label}_server_cpu_ms"] = round(cpu[name] / len(bodies) * 1000, 2)
                figures[name][f"{label}_requests"] = len(bodies)
    finally:
        for client in clients.values():
            client.close()
    return figures, first


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.lookup", description=__doc__)
    default_store, default_catalog = event_store_paths(100_000_000)
    parser.add_argument("--catalog", default=default_catalog, help="SQLite catalog to serve")
    parser.add_argument("--store", default=default_store, help="store root of --catalog")
    parser.add_argument("--keys", type=int, default=1000, help="events per request")
    parser.add_argument("--requests", type=int, default=60, help="requests of --keys events")
    parser.add_argument("--large-keys", type=int, default=10_000, help="events per large request")
    parser.add_argument("--large-requests", type=int, default=3, help="large requests (0: none)")
    parser.add_argument("--pool", type=int, default=10_000, help="distinct events drawn from")
    parser.add_argument("--before", help="directory whose webservice package is the baseline")
    parser.add_argument("--seed", type=int, default=20150604)
    args = parser.parse_args(argv)
    if not Path(args.catalog).is_file():
        parser.error(f"no catalog {args.catalog}: build the store first (eventindex bench pick)")
    if args.before and not (Path(args.before) / "webservice" / "app.py").is_file():
        parser.error(f"--before {args.before} holds no webservice package")

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    with SQLiteCatalog(args.catalog) as catalog, Reader(catalog) as reader:
        collection = reader.default_collection()
        located = reader.located(collection)
        files = catalog.list_tagfiles(collection=collection, kinds=[FileKind.MASTER])
        formats = {d.name: d.format for d in catalog.list_datasets(collection)}
    raw = [f for f in files if formats.get(f.dataset) == "RAW"]
    pool = sample_keys(raw, max(args.pool, args.keys, args.large_keys), rng)
    small = "lookup_1k" if args.keys == 1000 else f"lookup_{args.keys}"
    batches = {small: _bodies(collection, pool, args.keys, args.requests, rng)}
    if args.large_requests:
        large = "lookup_10k" if args.large_keys == 10_000 else f"lookup_{args.large_keys}"
        batches[large] = _bodies(collection, pool, args.large_keys, args.large_requests, rng)

    result: dict[str, Any] = {
        "store": {"catalog": args.catalog, "files": len(files), "locations_cover": located},
        "collection": collection,
    }
    names = ["before", "current"] if args.before else ["current"]
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(running_server(name, args.store, args.catalog, args.before))
            for name in names
        }
        figures, answers = measure(servers, batches)
    result.update(figures)
    if len(set(answers.values())) != 1:
        raise RuntimeError(f"the servers answered differently: {sorted(answers)}")
    result["answers_equal"] = True
    for label in batches:
        if args.before:
            before, current = result["before"], result["current"]
            result[f"ratio_before_to_current_{label}_cpu"] = round(
                before[f"{label}_server_cpu_ms"] / current[f"{label}_server_cpu_ms"], 2
            )
            result[f"ratio_before_to_current_{label}_p50"] = round(
                before[f"{label}_p50_ms"] / current[f"{label}_p50_ms"], 2
            )
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
