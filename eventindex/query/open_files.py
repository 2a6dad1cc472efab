"""Open file readers kept for reuse, shared by the threads of one query engine."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from catalog.model import TagFile
from eventindex.storage import MapFileReader
from eventindex.storage.locations import LocationIndex


class _Closable(Protocol):
    def close(self) -> None: ...


Opened = TypeVar("Opened", bound=_Closable)


class OpenPool(Generic[Opened]):
    """An LRU of at most ``max_open`` open readers made by ``opener(uri)``, keyed by file id.

    A reader that is evicted or dropped may still be in use by another thread, so
    it is closed only ``grace_seconds`` later (on a later call, or at ``close``).
    """

    def __init__(
        self, opener: Callable[[str], Opened], max_open: int, grace_seconds: float = 30.0
    ) -> None:
        if max_open < 1:
            raise ValueError(f"max_open_files must be positive, not {max_open}")
        self._opener = opener
        self.max_open = max_open
        self.grace_seconds = grace_seconds
        self._readers: OrderedDict[str, Opened] = OrderedDict()
        self._retired: list[tuple[float, Opened]] = []
        self._lock = threading.Lock()

    def reader(self, entry: TagFile) -> Opened:
        """The open reader of a catalogued file, opening it if needed."""
        return self.open(entry.file_id, entry.uri)

    def open(self, key: str, uri: str) -> Opened:
        """The open reader kept under ``key`` (a file id, or the URI itself)."""
        with self._lock:
            reader = self._readers.get(key)
            if reader is not None:
                self._readers.move_to_end(key)
                return reader
        opened = self._opener(uri)  # outside the lock: opening reads a header
        evicted = False
        with self._lock:
            reader = self._readers.setdefault(key, opened)
            self._readers.move_to_end(key)
            now = time.monotonic()
            while len(self._readers) > self.max_open:
                self._retired.append((now, self._readers.popitem(last=False)[1]))
                evicted = True
        if reader is not opened:  # another thread opened it first
            opened.close()
        if evicted:
            self.close_retired()
        return reader

    def drop(self, file_ids: Iterable[str]) -> None:
        """Forget the readers of files that are gone (closed after the grace time)."""
        now = time.monotonic()
        with self._lock:
            for file_id in file_ids:
                reader = self._readers.pop(file_id, None)
                if reader is not None:
                    self._retired.append((now, reader))

    def close_retired(self, *, force: bool = False) -> None:
        """Close the dropped readers whose grace time is over (all of them if ``force``)."""
        limit = time.monotonic() - self.grace_seconds
        with self._lock:
            closing = [r for t, r in self._retired if force or t <= limit]
            self._retired = [(t, r) for t, r in self._retired if not (force or t <= limit)]
        for reader in closing:
            reader.close()

    def counts(self) -> tuple[int, int]:
        """(open readers in use, dropped readers not yet closed)."""
        with self._lock:
            return len(self._readers), len(self._retired)

    def close(self) -> None:
        """Close every reader; the pool can be used again afterwards (it reopens)."""
        with self._lock:
            keys = list(self._readers)
        self.drop(keys)
        self.close_retired(force=True)


class OpenFiles(OpenPool[MapFileReader]):
    """Open map-file readers."""

    def __init__(self, max_open: int, grace_seconds: float = 30.0) -> None:
        super().__init__(MapFileReader, max_open, grace_seconds)


class OpenLocations(OpenPool[LocationIndex]):
    """Open locations files (memory-mapped: an open one costs address space, not memory)."""

    def __init__(self, max_open: int, grace_seconds: float = 30.0) -> None:
        super().__init__(LocationIndex, max_open, grace_seconds)
