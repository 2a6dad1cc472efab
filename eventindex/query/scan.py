"""Shared scans: many full-table queries for the price of one pass (convoy scheduling).

A ``SharedScan`` walks one table's units in order, round and round. Each step
reads and decodes one unit once, with only the union of the columns its riders
need, and feeds it to every rider. A query that joins mid-walk starts at the
current unit and is done when the walk wraps round to where it joined (or
earlier, when a LIMIT without ORDER BY is reached). A query whose key ranges or
cone rule a unit out rides past it without reading. A failing query is dropped
with its error; the walk goes on for the others.

Queries whose key or cone selects only a few units (an event pick, an object by
id, a small cone) never join a walk: ``run_direct`` answers them from those
units, through the map-file key index where a key bounds them.

``ScanWorker`` connects walks to the query registry: it claims queued queries,
answers the direct ones at once, seats the others on their table's walk (at
most ``max_queries_per_walk`` per walk; the rest wait in the queue), advances
every walk one unit per round, reports progress and writes results as Parquet.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.base import Catalog
from eventindex.config import QuerySettings
from eventindex.errors import EventIndexError
from eventindex.query.registry import QueryRecord, QueryRegistry, QueryState
from eventindex.query.sql import QueryAccumulator, QueryPlan, SqlError, compile_query
from eventindex.query.tables import Cone, ScanTable, TableUnit, position_ranges

log = logging.getLogger("eventindex.scan")


def selected_units(
    table: ScanTable, plan: QueryPlan, *, read_positions: bool = True
) -> list[int] | None:
    """Indices of the units that can hold rows of ``plan``, or ``None`` when its WHERE
    restricts neither the key nor the sky (every unit is needed).

    A cone rules out units by their position ranges: from footer statistics, or
    (``read_positions``) from one cached read of the two columns.
    """
    bounds = plan.key_bounds if table.key_ordered else None
    if bounds is None and plan.cone is None:
        return None
    grid_chunks = _grid_chunks(table, plan.cone) if plan.cone is not None else {}
    chosen = []
    for index, unit in enumerate(table.units):
        if bounds is not None and not any(unit.may_hold(low, high) for low, high in bounds):
            continue
        if unit.dataset in grid_chunks:
            # The partitioning grid says which chunks the cone touches: no file is read.
            if int(unit.part) not in grid_chunks[unit.dataset]:
                continue
        elif plan.cone is not None:
            ranges = position_ranges(
                unit, plan.cone.ra_column, plan.cone.dec_column, read_data=read_positions
            )
            if ranges is not None and not plan.cone.may_intersect(*ranges):
                continue
        chosen.append(index)
    return chosen


def _grid_chunks(table: ScanTable, cone: Cone) -> dict[str, set[int]]:
    """Chunk ids a cone touches in each spatially partitioned dataset of the table."""
    if not table.grids:
        return {}
    try:
        from eventindex.spatial.chunker import Chunker
        from eventindex.spatial.regions import Circle
    except ImportError:
        return {}
    touched: dict[str, set[int]] = {}
    for dataset, attributes in table.grids.items():
        try:
            chunker = Chunker.from_parameters(dict(attributes))
            chunks = Circle(cone.ra, cone.dec, cone.radius).sub_chunks(chunker)
        except (EventIndexError, ValueError):
            continue  # an unusable grid: fall back on position ranges
        touched[dataset] = {int(c) for c in chunks}
    return touched


def is_direct(
    table: ScanTable, plan: QueryPlan, max_units: int, *, read_positions: bool = True
) -> bool:
    """Whether ``plan`` skips the scan: an exact key lookup, or a key range or cone
    that leaves at most ``max_units`` units."""
    if plan.point_lookup and table.key_ordered:
        return True
    chosen = selected_units(table, plan, read_positions=read_positions)
    return chosen is not None and len(chosen) <= max_units


def _read_for(table: ScanTable, plan: QueryPlan, unit: TableUnit) -> pa.Table:
    if plan.key_bounds is not None and table.key_ordered:
        return table.read_key_ranges(unit, plan.key_bounds, plan.columns)
    return table.read_unit(unit, plan.columns)


def run_direct(
    table: ScanTable,
    plan: QueryPlan,
    max_rows: int,
    units: Sequence[int] | None = None,
) -> pa.Table:
    """Answer ``plan`` from the units it selects (``units``, else all it selects, else
    all), reading through the key index when its WHERE bounds the key."""
    chosen = selected_units(table, plan) if units is None else list(units)
    indices = range(len(table.units)) if chosen is None else chosen
    accumulator = plan.accumulator(max_rows)
    for index in indices:
        accumulator.add(_read_for(table, plan, table.units[index]))
        if accumulator.satisfied:
            break
    return accumulator.result()


@dataclass
class Rider:
    """A query on a walk: where it joined, what it has seen and shared."""

    query_id: str
    plan: QueryPlan
    accumulator: QueryAccumulator
    needed: frozenset[int] | None
    joined_at: int
    units_done: int = 0
    units_shared: int = 0


@dataclass
class Finished:
    """A query that left the walk: its result, or the error that stopped it."""

    query_id: str
    units_done: int
    units_shared: int
    result: pa.Table | None = None
    error: str | None = None
    error_code: str = "failed"


@dataclass
class StepReport:
    unit: int
    read: bool
    finished: list[Finished] = field(default_factory=list)


def _evaluate(rider: Rider, data: pa.Table) -> tuple[str, str] | None:
    """Feed one unit to a rider; the error and its code if the query failed on it."""
    try:
        rider.accumulator.add(data)
    except SqlError as exc:
        return str(exc), exc.code
    except (pa.ArrowException, ValueError, TypeError) as exc:
        return f"evaluation failed: {exc}", "failed"
    return None


@functools.cache
def _evaluation_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="eventindex-scan"
    )


class SharedScan:
    """One convoy: a walk round one table's units that queries join and leave."""

    def __init__(self, table: ScanTable, *, max_queries: int, max_rows: int) -> None:
        if not table.units:
            raise ValueError(f"table {table.name!r} has no units to walk")
        self.table = table
        self.max_queries = max_queries
        self.max_rows = max_rows
        self.position = 0
        self.riders: dict[str, Rider] = {}
        self.units_read = 0

    @property
    def full(self) -> bool:
        return len(self.riders) >= self.max_queries

    @property
    def idle(self) -> bool:
        return not self.riders

    def join(self, query_id: str, plan: QueryPlan) -> Rider:
        """Seat a query at the current unit; ``ValueError`` when the walk is full."""
        if self.full:
            raise ValueError(f"the walk of {self.table.name!r} is full ({self.max_queries})")
        chosen = selected_units(self.table, plan)
        rider = Rider(
            query_id=query_id,
            plan=plan,
            accumulator=plan.accumulator(self.max_rows),
            needed=None if chosen is None else frozenset(chosen),
            joined_at=self.position,
        )
        self.riders[query_id] = rider
        return rider

    def cancel(self, query_id: str) -> bool:
        return self.riders.pop(query_id, None) is not None

    def step(self) -> StepReport:
        """Read the current unit once for every rider that needs it, then move on."""
        index = self.position
        unit = self.table.units[index]
        readers = [r for r in self.riders.values() if r.needed is None or index in r.needed]
        report = StepReport(unit=index, read=bool(readers))
        if readers:
            columns = sorted({c for r in readers for c in r.plan.columns})
            try:
                data: pa.Table | None = self.table.read_unit(unit, columns)
                self.units_read += 1
            except EventIndexError as exc:
                data = None
                for rider in readers:
                    report.finished.append(self._drop(rider, f"unit {unit.uri}: {exc}"))
            if data is not None:
                shared = len(readers) > 1
                unit_data = data
                # Arrow kernels release the GIL: the riders' filters and aggregates run
                # side by side on the worker's cores.
                outcomes = (
                    list(_evaluation_pool().map(lambda r: _evaluate(r, unit_data), readers))
                    if len(readers) > 1
                    else [_evaluate(readers[0], unit_data)]
                )
                for rider, failure in zip(readers, outcomes, strict=True):
                    if failure is not None:
                        report.finished.append(self._drop(rider, *failure))
                    else:
                        rider.units_shared += shared
        for rider in list(self.riders.values()):
            rider.units_done += 1
            if rider.units_done >= len(self.table.units) or rider.accumulator.satisfied:
                report.finished.append(self._complete(rider))
        self.position = (index + 1) % len(self.table.units)
        return report

    def _drop(self, rider: Rider, error: str, code: str = "failed") -> Finished:
        self.riders.pop(rider.query_id, None)
        return Finished(
            rider.query_id, rider.units_done, rider.units_shared, error=error, error_code=code
        )

    def _complete(self, rider: Rider) -> Finished:
        self.riders.pop(rider.query_id, None)
        try:
            result = rider.accumulator.result()
        except SqlError as exc:
            return Finished(
                rider.query_id,
                rider.units_done,
                rider.units_shared,
                error=str(exc),
                error_code=exc.code,
            )
        return Finished(rider.query_id, rider.units_done, rider.units_shared, result=result)


def write_result(table: pa.Table, directory: str, query_id: str) -> str:
    """Write a result as Parquet, atomically (temporary name, then rename)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{query_id}.parquet"
    temporary = folder / f".{query_id}.parquet.tmp"
    pq.write_table(table, temporary)
    temporary.replace(final)
    return str(final.resolve())


class ScanWorker:
    """Runs the queued queries of a registry: direct answers and shared walks.

    ``run_once()`` does one round (admit, cancel, one unit of every walk) and
    says whether there was anything to do; ``run(stop)`` loops until ``stop`` is
    set, sleeping ``poll_seconds`` when idle (as rucio's daemons do).
    """

    def __init__(
        self,
        catalog: Catalog,
        registry: QueryRegistry,
        settings: QuerySettings,
        *,
        name: str | None = None,
    ) -> None:
        self.catalog = catalog
        self.registry = registry
        self.settings = settings
        # A stable default name, so a restarted worker resumes its own running queries
        # at once; give each worker of one registry its own name.
        self.name = name or socket.gethostname()
        self.walks: dict[str, SharedScan] = {}
        self._waiting: dict[str, tuple[ScanTable, QueryPlan]] = {}
        self._last_expiry = 0.0
        # A restart resumes what this worker (by name) was running before it stopped.
        self.registry.requeue_stale(settings.lease_seconds, worker=self.name)

    @property
    def active(self) -> int:
        return sum(len(w.riders) for w in self.walks.values())

    def _walk_for(self, table: ScanTable) -> SharedScan:
        walk = self.walks.get(table.name)
        if walk is None:
            walk = SharedScan(
                table,
                max_queries=self.settings.max_queries_per_walk,
                max_rows=self.settings.max_result_rows,
            )
            self.walks[table.name] = walk
        return walk

    def _store(self, query_id: str, result: pa.Table, done: int, shared: int) -> None:
        path = write_result(result, self.settings.results_dir, query_id)
        if not self.registry.finish(
            query_id,
            path,
            result.num_rows,
            units_done=done,
            units_shared=shared,
            expiry_seconds=self.settings.result_expiry_seconds,
        ):
            Path(path).unlink(missing_ok=True)  # cancelled while it ran

    def _admit(self, record: QueryRecord) -> bool:
        """Claim one queued query: answer it now, seat it on a walk, or fail it.
        False when its walk is full (it stays queued)."""
        compiled = self._waiting.get(record.id)
        if compiled is None:
            try:
                compiled = compile_query(
                    self.catalog, record.sql, max_result_rows=self.settings.max_result_rows
                )
            except SqlError as exc:
                self.registry.fail(record.id, str(exc), exc.code)
                return True
        table, plan = compiled
        if is_direct(table, plan, self.settings.direct_max_units):
            chosen = selected_units(table, plan)
            count = len(table.units) if chosen is None else len(chosen)
            if not self.registry.claim(record.id, self.name, count, "direct"):
                return True
            try:
                result = run_direct(table, plan, self.settings.max_result_rows, chosen)
            except SqlError as exc:
                self.registry.fail(record.id, str(exc), exc.code)
                return True
            except EventIndexError as exc:
                self.registry.fail(record.id, str(exc))
                return True
            self._store(record.id, result, count, 0)
            return True
        walk = self.walks.get(table.name)
        if walk is not None and walk.full:
            self._waiting[record.id] = compiled  # compiled once, seated when a seat frees
            return False
        self._waiting.pop(record.id, None)
        if not self.registry.claim(record.id, self.name, len(table.units), "scan"):
            return True
        self._walk_for(table).join(record.id, plan)
        return True

    def _apply_cancellations(self) -> None:
        riding = [q for w in self.walks.values() for q in w.riders]
        states = self.registry.states_of(riding)
        for walk in self.walks.values():
            for query_id in list(walk.riders):
                if states.get(query_id) is not QueryState.RUNNING:
                    walk.cancel(query_id)

    def _expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry < 60.0:
            return
        self._last_expiry = now
        for path in self.registry.expire():
            Path(path).unlink(missing_ok=True)
        self.registry.requeue_stale(self.settings.lease_seconds)

    def run_once(self) -> bool:
        """One round; True if any query was admitted or any walk moved."""
        self._expire()
        busy = False
        queued = self.registry.find(states=[QueryState.QUEUED], limit=256)
        for record in queued:
            busy = self._admit(record) or busy
        still_queued = {r.id for r in queued}
        self._waiting = {k: v for k, v in self._waiting.items() if k in still_queued}
        self._apply_cancellations()
        for name, walk in list(self.walks.items()):
            if walk.idle:
                # Dropped, so the next query of this table sees newly committed files.
                del self.walks[name]
                continue
            busy = True
            report = walk.step()
            for done in report.finished:
                if done.error is not None:
                    self.registry.fail(done.query_id, done.error, done.error_code)
                elif done.result is not None:
                    self._store(done.query_id, done.result, done.units_done, done.units_shared)
            self.registry.progress(
                self.name,
                {r.query_id: (r.units_done, r.units_shared) for r in walk.riders.values()},
            )
        return busy

    def run(
        self,
        stop: threading.Event,
        *,
        until_idle: bool = False,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        """Loop until ``stop`` is set (or, with ``until_idle``, until nothing is left)."""
        while not stop.is_set():
            busy = self.run_once()
            if on_round is not None:
                on_round()
            if not busy:
                if until_idle:
                    return
                stop.wait(self.settings.poll_seconds)
