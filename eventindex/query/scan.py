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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.base import Catalog
from catalog.model import Key
from eventindex.config import QuerySettings
from eventindex.errors import EventIndexError
from eventindex.query.registry import QueryRecord, QueryRegistry, QueryState
from eventindex.query.sql import (
    QueryAccumulator,
    QueryPlan,
    SqlError,
    compile_query,
    feed_unit,
    plan_query,
)
from eventindex.query.tables import Cone, ScanTable, position_ranges

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
            if not _names_any(unit.part, grid_chunks[unit.dataset]):
                continue
        elif plan.cone is not None:
            ranges = position_ranges(
                unit, plan.cone.ra_column, plan.cone.dec_column, read_data=read_positions
            )
            if ranges is not None and not plan.cone.may_intersect(*ranges):
                continue
        chosen.append(index)
    return chosen


def _names_any(part: str, chunks: set[int]) -> bool:
    """Whether a chunk file's part (a chunk id, or a run of them ``first-last``) names
    one of ``chunks``."""
    first, _, last = part.partition("-")
    low, high = int(first), int(last or first)
    return any(low <= chunk <= high for chunk in chunks)


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


@dataclass(frozen=True)
class DirectRoute:
    """How a query skips the scan: the units it reads and, in those where an index
    bounds it, the key ranges to read through the map-file key index."""

    units: tuple[int, ...]
    bounds: Mapping[int, tuple[tuple[Key, Key], ...]] = field(default_factory=dict)


def direct_route(
    table: ScanTable,
    plan: QueryPlan,
    max_units: int,
    *,
    catalog: Catalog | None = None,
    read_positions: bool = True,
) -> DirectRoute | None:
    """The route of a query that skips the scan (None: it rides a walk).

    An exact key lookup reads its keys through the key index; an object id of a
    spatially partitioned table (with ``catalog``) is located by the director
    index, then read as one key of one chunk file; a key range or a cone that
    leaves at most ``max_units`` units reads those.
    """
    if plan.point_lookup and table.key_ordered and plan.key_bounds is not None:
        keyed = selected_units(table, plan) or []
        return DirectRoute(tuple(keyed), dict.fromkeys(keyed, plan.key_bounds))
    if catalog is not None and plan.point_lookup:
        located = _director_route(catalog, table, plan)
        if located is not None:
            return located
    chosen = selected_units(table, plan, read_positions=read_positions)
    if chosen is None or len(chosen) > max_units:
        return None
    if plan.key_bounds is not None and table.key_ordered:
        return DirectRoute(tuple(chosen), dict.fromkeys(chosen, plan.key_bounds))
    return DirectRoute(tuple(chosen))


def _director_route(catalog: Catalog, table: ScanTable, plan: QueryPlan) -> DirectRoute | None:
    """Object ids of a table whose datasets are all partitioned with a director index:
    each id's (chunk, sub-chunk) from the director, so that one key of the chunk file
    holding the chunk is read. None when the table is not such a table."""
    from eventindex.query.objects import ObjectTable
    from eventindex.spatial.partition import DIRECTOR_ROLE, ROLE_ATTRIBUTE

    if plan.key_bounds is None or len(table.key) != 1 or not table.grids:
        return None
    if any(
        table.grids.get(unit.dataset, {}).get(ROLE_ATTRIBUTE) != DIRECTOR_ROLE
        for unit in table.units
    ):
        return None
    ids = sorted({int(low[0]) for low, _ in plan.key_bounds})
    bounds: dict[int, list[tuple[Key, Key]]] = {}
    for dataset in sorted({unit.dataset for unit in table.units}):
        try:
            objects = ObjectTable(catalog, catalog.get_dataset(dataset))
        except EventIndexError:
            return None  # not laid out as the director expects: the scan answers
        try:
            chunks, sub_chunks, found = objects.locate_many(np.asarray(ids, dtype=np.int64))
        finally:
            objects.close()
        for object_id, chunk, sub_chunk, hit in zip(ids, chunks, sub_chunks, found, strict=True):
            if not hit:
                continue
            key: Key = (int(chunk), int(sub_chunk), object_id)
            for index, unit in enumerate(table.units):
                if unit.dataset == dataset and _names_any(unit.part, {int(chunk)}):
                    bounds.setdefault(index, []).append((key, key))
    return DirectRoute(tuple(sorted(bounds)), {i: tuple(b) for i, b in bounds.items()})


def run_direct(
    table: ScanTable,
    plan: QueryPlan,
    max_rows: int,
    route: DirectRoute | None = None,
) -> pa.Table:
    """Answer ``plan`` from the units of its ``route`` (by default every unit it can
    select without a catalog), reading key ranges through the key index where the
    route bounds them."""
    if route is None:
        route = direct_route(table, plan, len(table.units)) or DirectRoute(
            tuple(range(len(table.units)))
        )
    accumulator = plan.accumulator(max_rows)
    for index in route.units:
        unit = table.units[index]
        bounds = route.bounds.get(index)
        if bounds:
            accumulator.add(table.read_key_ranges(unit, bounds, plan.columns))
        else:
            accumulator.add(table.read_unit(unit, plan.columns))
        if accumulator.satisfied:
            break
    if not route.units:
        # Nothing to read (an id the director does not know): the answer of no rows.
        columns = [table.schema.field(c) for c in plan.columns]
        accumulator.add(pa.schema(columns).empty_table())
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
    units: int = 1


@dataclass
class UnitOutcome:
    """What one unit gave each query evaluated on it: a partial result (Arrow IPC
    bytes, for ``QueryAccumulator.absorb``; empty when the unit held nothing for
    it) or the error, with its code, that stopped it there."""

    unit: int
    partials: dict[str, bytes] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def evaluate_unit(
    table: ScanTable, unit: int, queries: Sequence[tuple[str, str]], max_rows: int
) -> UnitOutcome:
    """Read unit ``unit`` of ``table`` once and evaluate every ``(query id, SQL)`` on it:
    the pure transform of a batched (e.g. Spark) scan step, run wherever the unit is.
    A query that fails here is reported, and the others go on."""
    outcome = UnitOutcome(unit)
    plans: list[tuple[str, QueryPlan]] = []
    for query_id, sql in queries:
        try:
            plans.append((query_id, plan_query(sql, table, max_result_rows=max_rows)))
        except SqlError as exc:
            outcome.errors[query_id] = (str(exc), exc.code)
    if not plans:
        return outcome
    entry = table.units[unit]
    columns = sorted({c for _, plan in plans for c in plan.columns})
    try:
        data = table.read_unit(entry, columns)
    except EventIndexError as exc:
        for query_id, _ in plans:
            outcome.errors[query_id] = (f"unit {entry.uri}: {exc}", "failed")
        return outcome
    accumulators = [plan.accumulator(max_rows) for _, plan in plans]
    failures = _feed(accumulators, data)
    for (query_id, _), accumulator, failure in zip(plans, accumulators, failures, strict=True):
        if failure is not None:
            outcome.errors[query_id] = failure
            continue
        partial = accumulator.partial()
        outcome.partials[query_id] = b"" if partial is None else _to_ipc(partial)
    return outcome


class ScanEvaluator(Protocol):
    """Evaluates a walk's step elsewhere (a Spark job, a pool of processes): each
    listed unit is read once and every query listed for it evaluated on it."""

    @property
    def units_per_step(self) -> int:
        """How many consecutive units one step covers."""

    def evaluate(
        self,
        table: ScanTable,
        work: Sequence[tuple[int, Sequence[tuple[str, str]]]],
        max_rows: int,
    ) -> list[UnitOutcome]:
        """One ``UnitOutcome`` per ``(unit, [(query id, SQL), ...])`` of ``work``;
        raises ``EventIndexError`` when the step as a whole cannot run."""


def _feed(accumulators: Sequence[QueryAccumulator], data: pa.Table) -> list[tuple[str, str] | None]:
    """Feed one unit to many queries at once; per query, the error and its code if it
    failed on this unit."""
    return [
        None
        if failure is None
        else (str(failure), failure.code)
        if isinstance(failure, SqlError)
        else (f"evaluation failed: {failure}", "failed")
        for failure in feed_unit(accumulators, data)
    ]


@functools.cache
def _prefetch_pool() -> ThreadPoolExecutor:
    # One thread: the next unit is decoded (by Arrow's own threads, without the GIL)
    # while the riders evaluate the current one.
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventindex-prefetch")


def lower_priority(increment: int) -> int:
    """Make this process (every thread it has, and those it starts) ``increment`` nicer,
    so interactive work on the same machine is scheduled first; its new niceness."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return os.nice(0) if hasattr(os, "nice") else 0
    tasks = Path("/proc/self/task")
    if tasks.is_dir():
        # Linux sets niceness per thread: Arrow's pool threads may already be running.
        for entry in tasks.iterdir():
            try:
                thread = int(entry.name)
                current = os.getpriority(os.PRIO_PROCESS, thread)
                os.setpriority(os.PRIO_PROCESS, thread, min(19, current + increment))
            except (ValueError, ProcessLookupError, PermissionError):
                continue
        return os.getpriority(os.PRIO_PROCESS, 0)
    return os.nice(increment)


def background_worker(settings: QuerySettings) -> int:
    """Set this process up as a scan worker, a background service: ``worker_nice``
    nicer, and at most ``worker_threads`` Arrow threads decoding; its niceness."""
    if settings.worker_threads:
        pa.set_cpu_count(settings.worker_threads)
    return lower_priority(settings.worker_nice)


class SharedScan:
    """One convoy: a walk round one table's units that queries join and leave.

    Each step reads one unit here (the next one is decoded meanwhile, with
    ``prefetch``), or, with an ``evaluator``, hands the next
    ``evaluator.units_per_step`` units to it and folds in what each gave.
    """

    def __init__(
        self,
        table: ScanTable,
        *,
        max_queries: int,
        max_rows: int,
        prefetch: bool = True,
        evaluator: ScanEvaluator | None = None,
    ) -> None:
        if not table.units:
            raise ValueError(f"table {table.name!r} has no units to walk")
        self.table = table
        self.max_queries = max_queries
        self.max_rows = max_rows
        self.prefetch = prefetch
        self.evaluator = evaluator
        self.position = 0
        self.riders: dict[str, Rider] = {}
        self.units_read = 0
        self._next: tuple[int, frozenset[str], Future[pa.Table]] | None = None

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

    def _needs(self, rider: Rider, index: int, ahead: int = 0) -> bool:
        """Whether ``rider`` reads unit ``index``, ``ahead`` units from now."""
        left = len(self.table.units) - rider.units_done
        return ahead < left and (rider.needed is None or index in rider.needed)

    def step(self) -> StepReport:
        """Read the current unit once for every rider that needs it, then move on (or,
        with an evaluator, the next ``units_per_step`` units)."""
        if self.evaluator is not None:
            return self._step_elsewhere(self.evaluator)
        index = self.position
        unit = self.table.units[index]
        readers = [r for r in self.riders.values() if self._needs(r, index)]
        report = StepReport(unit=index, read=bool(readers))
        if readers:
            columns = frozenset(c for r in readers for c in r.plan.columns)
            try:
                data: pa.Table | None = self._read(index, columns)
                self.units_read += 1
            except EventIndexError as exc:
                data = None
                for rider in readers:
                    report.finished.append(self._drop(rider, f"unit {unit.uri}: {exc}"))
            if data is not None:
                self._read_ahead((index + 1) % len(self.table.units))
                shared = len(readers) > 1
                failures = _feed([r.accumulator for r in readers], data)
                for rider, failure in zip(readers, failures, strict=True):
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

    def _read(self, index: int, columns: frozenset[str]) -> pa.Table:
        """Unit ``index``: the one decoded ahead if it has the columns, else read now."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == index and columns <= ahead[1]:
            return ahead[2].result()
        return self.table.read_unit(self.table.units[index], sorted(columns))

    def _read_ahead(self, index: int) -> None:
        """Start decoding unit ``index`` for the riders that will read it next."""
        if not self.prefetch:
            return
        readers = [r for r in self.riders.values() if self._needs(r, index, ahead=1)]
        if not readers:
            return
        columns = frozenset(c for r in readers for c in r.plan.columns)
        unit = self.table.units[index]
        future = _prefetch_pool().submit(self.table.read_unit, unit, sorted(columns))
        self._next = (index, columns, future)

    def _step_elsewhere(self, evaluator: ScanEvaluator) -> StepReport:
        count = max(1, min(evaluator.units_per_step, len(self.table.units)))
        indices = [(self.position + offset) % len(self.table.units) for offset in range(count)]
        riders = list(self.riders.values())
        readers = {
            index: [r for r in riders if self._needs(r, index, ahead=offset)]
            for offset, index in enumerate(indices)
        }
        reading = {index: {r.query_id for r in found} for index, found in readers.items()}
        work = [
            (index, [(r.query_id, r.plan.sql) for r in readers[index]])
            for index in indices
            if readers[index]
        ]
        report = StepReport(unit=self.position, read=bool(work), units=count)
        outcomes: dict[int, UnitOutcome] = {}
        if work:
            try:
                outcomes = {o.unit: o for o in evaluator.evaluate(self.table, work, self.max_rows)}
            except EventIndexError as exc:
                for rider in {r.query_id: r for i, _ in work for r in readers[i]}.values():
                    report.finished.append(self._drop(rider, f"scan step failed: {exc}"))
            self.units_read += len(outcomes)
        for index in indices:
            outcome = outcomes.get(index)
            shared = len(readers[index]) > 1
            for rider in list(self.riders.values()):
                if outcome is not None and rider.query_id in reading[index]:
                    failure = self._absorb(rider, outcome)
                    if failure is not None:
                        report.finished.append(self._drop(rider, *failure))
                        continue
                    rider.units_shared += shared
                rider.units_done += 1
                if rider.units_done >= len(self.table.units) or rider.accumulator.satisfied:
                    report.finished.append(self._complete(rider))
        self.position = (self.position + count) % len(self.table.units)
        return report

    @staticmethod
    def _absorb(rider: Rider, outcome: UnitOutcome) -> tuple[str, str] | None:
        if rider.query_id in outcome.errors:
            return outcome.errors[rider.query_id]
        partial = outcome.partials.get(rider.query_id)
        if partial is None:
            return f"unit {outcome.unit} gave no answer", "failed"
        if not partial or rider.accumulator.satisfied:
            return None
        try:
            rider.accumulator.absorb(_from_ipc(partial))
        except SqlError as exc:
            return str(exc), exc.code
        return None

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

    ``run_once()`` does one round (admit, cancel, one step of every walk) and
    says whether there was anything to do; ``run(stop)`` loops until ``stop`` is
    set, sleeping ``poll_seconds`` when idle (as rucio's daemons do). Walks are
    evaluated in this process, or by ``evaluator`` (a Spark job per step).
    """

    def __init__(
        self,
        catalog: Catalog,
        registry: QueryRegistry,
        settings: QuerySettings,
        *,
        name: str | None = None,
        evaluator: ScanEvaluator | None = None,
    ) -> None:
        self.catalog = catalog
        self.registry = registry
        self.settings = settings
        self.evaluator = evaluator
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
                prefetch=self.settings.prefetch,
                evaluator=self.evaluator,
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
        try:
            route = direct_route(table, plan, self.settings.direct_max_units, catalog=self.catalog)
        except EventIndexError as exc:
            self.registry.fail(record.id, str(exc))
            return True
        if route is not None:
            if not self.registry.claim(record.id, self.name, len(route.units), "direct"):
                return True
            try:
                result = run_direct(table, plan, self.settings.max_result_rows, route)
            except SqlError as exc:
                self.registry.fail(record.id, str(exc), exc.code)
                return True
            except EventIndexError as exc:
                self.registry.fail(record.id, str(exc))
                return True
            self._store(record.id, result, len(route.units), 0)
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
