"""Several processes (here threads, each with its own connection) opening one new
SQLite catalog file at the same moment all succeed: the switch to WAL mode must not
fail with "database is locked"."""

from __future__ import annotations

import threading
from pathlib import Path

from catalog.sqlite import SQLiteCatalog


def test_concurrent_opens_of_a_new_file_all_succeed(tmp_path: Path) -> None:
    for attempt in range(5):
        path = tmp_path / f"catalog-{attempt}.sqlite"
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def open_it(
            path: Path = path,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            start.wait()
            try:
                SQLiteCatalog(str(path)).close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with SQLiteCatalog(str(path)) as catalog:
            assert catalog.list_collections() == []
