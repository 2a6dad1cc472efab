"""Small event and object tables whose values follow from the key, so answers can be checked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest

from eventindex.records.schema import EVENT_SCHEMA, OBJECT_SCHEMA
from eventindex.storage import KeyCache

EVENT_KEY = ["run_number", "event_number"]
OBJECT_KEY = ["object_id"]
PICK_COLUMNS = ["run_number", "event_number", "lumi_block", "timestamp", "references"]
GUIDS = (
    "0a66c3f2-56b6-e511-8b7b-02163e011f0e",
    "5d2c7a1e-0b2d-4b3a-9c4e-1f2a3b4c5d6e",
    "9a87fd23-e17b-4947-8091-0b5a64f8cf3d",
)


def _mask(value: int, width: int) -> bytes:
    mask = bytearray(width)
    mask[value % width] = 1 << (value % 8)
    return bytes(mask)


def event_rows(keys: Sequence[tuple[int, int]], copy: int = 0) -> list[dict[str, object]]:
    """EVENT_SCHEMA rows whose payload is a function of the key (and ``copy``, for duplicates)."""
    rows = []
    for run, event in keys:
        rows.append(
            {
                "run_number": run,
                "event_number": event,
                "lumi_block": event % 1000 + copy,
                "timestamp": 1_433_116_800 + run % 1000 + event % 100_000,
                "timestamp_ns": (event * 7919) % 1_000_000_000,
                "bcid": event % 3563,
                "lvl1_id": event % 2**32,
                "is_simulation": False,
                "is_calibration": event % 5 == 0,
                "is_testbeam": False,
                "mc_channel_number": 0,
                "mc_event_weight": 1.0,
                "l1_tbp": _mask(event, 32),
                "l1_tap": _mask(event // 2, 32),
                "l1_tav": _mask(event // 4, 32),
                "hlt_passed": _mask(event, 128),
                "smk": 2127,
                "l1psk": 1000 + run % 3,
                "hltpsk": 500,
                "references": [
                    {"format": "RAW", "guid": GUIDS[run % 3], "position": event % 1500},
                    {"format": "AOD", "guid": GUIDS[(run + 1) % 3], "position": event % 5000},
                ],
            }
        )
    return rows


def event_table(keys: Sequence[tuple[int, int]], copy: int = 0) -> pa.Table:
    return pa.Table.from_pylist(event_rows(keys, copy), schema=EVENT_SCHEMA)


def object_table(ids: Sequence[int]) -> pa.Table:
    values = np.asarray(ids, dtype=np.int64)
    return pa.table(
        {
            "object_id": values,
            "ra": (values % 360_000) / 1000.0,
            "dec": (values % 180_000) / 1000.0 - 90.0,
        },
        schema=OBJECT_SCHEMA,
    )


@pytest.fixture
def key_cache() -> KeyCache:
    """A private key cache, so hit and miss counts belong to one test."""
    return KeyCache()
