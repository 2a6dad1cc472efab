"""Catalog throughput: register, commit and list 10,000 TagFiles in a fresh SQLite file.

Figures: ``register_10k_s`` (``add_tagfiles`` in batches, state writing),
``commit_10k_s`` (``commit_tagfile`` one file at a time, as consumers do),
``list_10k_ms`` (one ``list_tagfiles`` of the dataset) and
``run_range_query_ms`` (a ``first_key_range`` lookup). The baseline is a bare
``executemany`` of the same number of rows into a one-table SQLite file in the
same folder, so ``register_vs_raw_insert`` compares like with like on a noisy
machine. The target is registering 10,000 TagFiles in at most 5 s.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from benchmarks.common import emit
from catalog import Collection, Dataset, FileKind, SQLiteCatalog, TagFile
from eventindex.records.schema import RecordKind

COLLECTION = "data15_13TeV.physics_Main"
DATASET = "data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521"
TARGET_S = 5.0


def _tagfiles(count: int) -> list[TagFile]:
    """TagFiles as consumers register them: one run each of 100, a few messages and GUIDs."""
    return [
        TagFile(
            file_id=f"{i:08d}",
            dataset=DATASET,
            collection=COLLECTION,
            kind=FileKind.MASTER,
            uri=f"var/store/{COLLECTION}/{DATASET}/master/{i:08d}.parquet",
            rows=50_000,
            bytes=4_000_000,
            checksum=f"xxh64:{i:016x}",
            key_min=(280_000 + i // 100, i * 1000),
            key_max=(280_000 + i // 100, i * 1000 + 999),
            message_ids=tuple(f"producer-{i % 16}:{i}-{m}" for m in range(4)),
            guids=(f"{i:08X}-8F3D-E511-9B6C-02163E01342B",),
        )
        for i in range(count)
    ]


def _raw_insert_s(folder: Path, count: int) -> float:
    """The baseline: the same number of rows into one plain table, one transaction."""
    with closing(sqlite3.connect(folder / "baseline.sqlite", isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, uri TEXT, rows INTEGER, doc TEXT)")
        rows = [(f"{i:08d}", f"uri-{i}", i, "[1,2,3]") for i in range(count)]
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows)
        conn.execute("COMMIT")
        return time.perf_counter() - start


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.catalog", description=__doc__)
    parser.add_argument("--files", type=int, default=10_000, help="TagFiles to register")
    parser.add_argument("--batch", type=int, default=1_000, help="entries per add_tagfiles")
    args = parser.parse_args(argv)
    tagfiles = _tagfiles(args.files)

    with tempfile.TemporaryDirectory(prefix="ei-bench-catalog-") as tmp:
        folder = Path(tmp)
        baseline_s = _raw_insert_s(folder, args.files)
        with SQLiteCatalog(str(folder / "catalog.sqlite")) as catalog:
            catalog.create_collection(Collection(COLLECTION, RecordKind.EVENTS))
            catalog.create_dataset(Dataset(DATASET, COLLECTION, format="AOD"))

            start = time.perf_counter()
            for first in range(0, len(tagfiles), args.batch):
                catalog.add_tagfiles(tagfiles[first : first + args.batch])
            register_s = time.perf_counter() - start

            start = time.perf_counter()
            for entry in tagfiles:
                catalog.commit_tagfile(entry)
            commit_s = time.perf_counter() - start

            start = time.perf_counter()
            listed = catalog.list_tagfiles(dataset=DATASET)
            list_ms = (time.perf_counter() - start) * 1000

            start = time.perf_counter()
            in_run = catalog.list_tagfiles(
                collection=COLLECTION, first_key_range=(280_050, 280_050)
            )
            range_ms = (time.perf_counter() - start) * 1000

            start = time.perf_counter()
            absorbed = catalog.absorbed_message_ids(m for t in tagfiles for m in t.message_ids)
            absorbed_ms = (time.perf_counter() - start) * 1000

        if len(listed) != args.files or len(absorbed) != 4 * args.files:
            raise RuntimeError(f"lost entries: listed {len(listed)}, absorbed {len(absorbed)}")
        return {
            "benchmark": "catalog",
            "backend": "sqlite",
            "files": args.files,
            "batch": args.batch,
            "register_10k_s": round(register_s, 4),
            "commit_10k_s": round(commit_s, 4),
            "register_and_commit_10k_s": round(register_s + commit_s, 4),
            "commits_per_s": round(args.files / commit_s, 1),
            "list_10k_ms": round(list_ms, 2),
            "run_range_query_ms": round(range_ms, 3),
            "run_range_files": len(in_run),
            "absorbed_message_ids_40k_ms": round(absorbed_ms, 2),
            "baseline_raw_insert_s": round(baseline_s, 4),
            "register_vs_raw_insert": round(register_s / baseline_s, 2),
            "target_register_s": TARGET_S,
            "meets_target": register_s + commit_s <= TARGET_S,
        }


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
