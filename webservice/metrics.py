"""Request counters and latency histograms in the Prometheus text exposition format (0.0.4).

A few dozen lines instead of a dependency: the service needs one counter, one
histogram and some gauges, all per process. With ``--workers N`` each worker
counts its own requests, as ``prometheus_client`` would without multiprocess mode.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Picks take about a millisecond; lookups and selects take up to seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_INF = 'le="+Inf"'
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def metric_name(text: str) -> str:
    """``text`` made into a valid metric name part."""
    return _NAME_UNSAFE.sub("_", text).strip("_").lower() or "value"


@dataclass
class _Series:
    buckets: list[int]
    total: float = 0.0
    count: int = 0


@dataclass
class HttpMetrics:
    """Requests by (method, route, status) and latency by (method, route)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    _requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _latency: dict[tuple[str, str], _Series] = field(default_factory=dict)
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        with self._lock:
            self._in_flight -= 1
            key = (method, route, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            series = self._latency.get((method, route))
            if series is None:
                series = self._latency[(method, route)] = _Series([0] * len(self.buckets))
            index = bisect.bisect_left(self.buckets, seconds)
            if index < len(self.buckets):
                series.buckets[index] += 1
            series.total += seconds
            series.count += 1

    def requests(self, method: str, route: str, status: int) -> int:
        """How many requests ended with this status (for tests and health checks)."""
        with self._lock:
            return self._requests.get((method, route, str(status)), 0)

    def render(self, gauges: Mapping[str, tuple[str, str, float]] | None = None) -> str:
        """The exposition text; ``gauges`` maps name -> (type, help, value) of extra series."""
        with self._lock:
            requests = sorted(self._requests.items())
            latency = sorted(
                (k, _Series(list(s.buckets), s.total, s.count)) for k, s in self._latency.items()
            )
            in_flight = self._in_flight
        lines = [
            "# HELP eventindex_http_requests_total HTTP requests answered, by route and status.",
            "# TYPE eventindex_http_requests_total counter",
        ]
        names = ("method", "route", "status")
        lines += [
            f"eventindex_http_requests_total{_labels(names, key)} {count}"
            for key, count in requests
        ]
        name = "eventindex_http_request_duration_seconds"
        lines += [
            f"# HELP {name} Time from request start to the last response byte, by route.",
            f"# TYPE {name} histogram",
        ]
        for key, series in latency:
            cumulative = 0
            for bound, count in zip(self.buckets, series.buckets, strict=True):
                cumulative += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{name}_bucket{_labels(names[:2], key, le)} {cumulative}")
            lines.append(f"{name}_bucket{_labels(names[:2], key, _INF)} {series.count}")
            lines.append(f"{name}_sum{_labels(names[:2], key)} {series.total!r}")
            lines.append(f"{name}_count{_labels(names[:2], key)} {series.count}")
        lines += [
            "# HELP eventindex_http_requests_in_flight Requests being answered now.",
            "# TYPE eventindex_http_requests_in_flight gauge",
            f"eventindex_http_requests_in_flight {in_flight}",
        ]
        for gauge, (kind, help_text, value) in sorted((gauges or {}).items()):
            lines += [
                f"# HELP {gauge} {help_text}",
                f"# TYPE {gauge} {kind}",
                f"{gauge} {_number(value)}",
            ]
        return "\n".join(lines) + "\n"


# Reader statistics that go up and down; every other one only counts up.
READER_GAUGES = frozenset(
    {
        "open_files",
        "retired_files_open",
        "collections_cached",
        "key_cache_entries",
        "key_cache_bytes",
    }
)


def reader_series(stats: Mapping[str, int]) -> dict[str, tuple[str, str, float]]:
    """The Reader's statistics as metric series: counters get the ``_total`` suffix."""
    series: dict[str, tuple[str, str, float]] = {}
    for key, value in stats.items():
        base = f"eventindex_reader_{metric_name(key)}"
        if key in READER_GAUGES:
            series[base] = ("gauge", f"Reader: {key.replace('_', ' ')}.", float(value))
        else:
            name = base if base.endswith("_total") else f"{base}_total"
            series[name] = ("counter", f"Reader: {key.replace('_', ' ')}.", float(value))
    return series
