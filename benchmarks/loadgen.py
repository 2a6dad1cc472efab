"""An open-loop HTTP/1.1 load generator for loopback benchmarks (asyncio, keep-alive).

Requests are scheduled at a fixed rate whatever the server does, and each
latency is measured from the request's *scheduled* time, so a server that
falls behind shows it in the percentiles instead of slowing the generator
down (no coordinated omission). A pool of persistent connections takes the
scheduled requests in order. The run is bounded in time and in count, and
only targets loopback addresses.

Used by ``benchmarks/pick.py --load-seconds N``; also runnable on its own::

    python -m benchmarks.loadgen http://127.0.0.1:8080 --paths-file PATHS --rate 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from benchmarks.common import emit, percentiles_ms

# How long a request may take before it counts as an error, and how long the
# generator waits for answers still in flight once the schedule is over.
REQUEST_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 15.0


@dataclass
class LoadResult:
    """What one load run saw."""

    seconds: float
    rate_target: float
    connections: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    unsent: int = 0

    def summary(self) -> dict[str, Any]:
        answered = len(self.latencies)
        figures: dict[str, Any] = {
            "seconds": round(self.seconds, 2),
            "rate_target_per_s": self.rate_target,
            "connections": self.connections,
            "requests_ok": answered,
            "errors": self.errors,
            "unsent": self.unsent,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "throughput_per_s": round(answered / self.seconds, 1) if self.seconds else 0.0,
        }
        if answered:
            latency = percentiles_ms(self.latencies)
            figures.update({f"{name}_ms": value for name, value in latency.items()})
            figures["max_ms"] = round(max(self.latencies) * 1000, 3)
        return figures


def _loopback_address(host: str) -> str:
    """The host's address, refused unless it is a loopback address."""
    address = socket.gethostbyname(host)
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"load generation only targets loopback; {host} is {address}")
    return address


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads whole responses."""

    def __init__(self, address: str, port: int, host_header: str) -> None:
        self.address = address
        self.port = port
        self.host_header = host_header
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.address, self.port)
        assert self.reader is not None
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\nAccept: */*\r\n\r\n"
        self.writer.write(request.encode("ascii"))
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                raise ValueError("chunked responses are not expected from this route")
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if length:
            await self.reader.readexactly(length)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):  # the server may have gone first
                await self.writer.wait_closed()
            self.writer = None


async def _generate(
    url: str, paths: Sequence[str], rate: float, seconds: float, connections: int
) -> LoadResult:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"need an http:// URL, not {url!r}")
    address = _loopback_address(parts.hostname)
    port = parts.port or 80
    prefix = parts.path.rstrip("/")
    total = int(rate * seconds)
    result = LoadResult(seconds=seconds, rate_target=rate, connections=connections)
    queue: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        connection = _Connection(address, port, parts.netloc)
        try:
            while (item := await queue.get()) is not None:
                scheduled, path = item
                try:
                    status = await asyncio.wait_for(connection.get(path), REQUEST_TIMEOUT_S)
                except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
                    result.errors += 1
                    await connection.close()
                    continue
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200:
                    result.latencies.append(loop.time() - scheduled)
                else:
                    result.errors += 1
        finally:
            await connection.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    start = loop.time()
    for index in range(total):
        due = start + index / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((due, prefix + paths[index % len(paths)]))
    for _ in workers:
        queue.put_nowait(None)
    done, pending = await asyncio.wait(workers, timeout=DRAIN_TIMEOUT_S)
    for task in pending:
        task.cancel()
    # Requests never taken from the queue when the drain timed out count as errors.
    while not queue.empty():
        if queue.get_nowait() is not None:
            result.unsent += 1
    result.errors += result.unsent
    result.seconds = max(seconds, loop.time() - start)
    for task in done:
        failure = task.exception()
        if failure is not None:
            raise failure
    return result


def run_load(
    url: str, paths: Sequence[str], *, rate: float, seconds: float, connections: int = 32
) -> LoadResult:
    """GET ``paths`` (cycled) from ``url`` at ``rate`` requests/s for ``seconds``."""
    if not paths:
        raise ValueError("no paths to request")
    if rate <= 0 or seconds <= 0 or connections < 1:
        raise ValueError("rate, seconds and connections must be positive")
    return asyncio.run(_generate(url, paths, rate, seconds, connections))


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.loadgen", description=__doc__)
    parser.add_argument("url", help="base URL on loopback, e.g. http://127.0.0.1:8080")
    parser.add_argument("--paths-file", required=True, help="one request path per line")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the run")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    args = parser.parse_args(argv)
    with open(args.paths_file) as handle:  # noqa: PTH123 - a plain text list
        paths = [line.strip() for line in handle if line.strip()]
    started = time.time()
    result = run_load(
        args.url, paths, rate=args.rate, seconds=args.seconds, connections=args.connections
    )
    return {"started": started, **result.summary()}


if __name__ == "__main__":
    import sys

    emit(run(sys.argv[1:]))
