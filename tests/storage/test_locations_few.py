"""A few keys or rows of a locations file are handled one by one (below ``_SCALAR_MAX``),
many at once with numpy: both ways give the same answers, present keys or absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eventindex.storage import locations
from eventindex.storage.locations import LocationIndex, write_locations
from tests.storage.test_locations import ATTRIBUTES, _rows, _table


@pytest.mark.parametrize("depths", [[2] * 60, [i % 4 for i in range(60)]], ids=["fixed", "varying"])
@pytest.mark.parametrize("scalar_max", [0, 16, 10**6], ids=["numpy", "default", "loop"])
def test_few_and_many_keys_answer_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depths: list[int], scalar_max: int
) -> None:
    monkeypatch.setattr(locations, "_SCALAR_MAX", scalar_max)
    rows = _rows(depths)
    info = write_locations(_table(rows), str(tmp_path / "f.locations"), ATTRIBUTES)
    present = [(r["run_number"], r["event_number"]) for r in rows]
    absent = [(8, 2**40), (7, 2**40 + 1), (7, 0), (7, 2**64 - 1), (2**32 - 1, 2**40)]
    rng = np.random.default_rng(scalar_max % 97)
    with LocationIndex(info.uri) as index:
        for size in (1, 2, 5, 16, 17, 40, 65):
            chosen = rng.choice(len(present) + len(absent), size=size, replace=True)
            keys = [(present + absent)[i] for i in chosen.tolist()]
            runs = np.array([k[0] for k in keys], dtype=np.uint32)
            events = np.array([k[1] for k in keys], dtype=np.uint64)
            expected = [index.find(*key) for key in keys]
            assert index.find_many(runs, events).tolist() == expected
            index.prefetch_keys(runs, events)
            found = index.find_many(runs, events, prefetched=True)
            assert found.tolist() == expected
            hits = found[found >= 0]
            assert index.references_many(hits) == [index.references(r) for r in hits.tolist()]
            index.prefetch_rows(hits)
            index.prefetch_references(hits)
            assert index.references_many(hits, prefetched=True) == [
                index.references(r) for r in hits.tolist()
            ]
            assert index.attributes_many(hits) == [
                {name: rows[r][name] for name in ATTRIBUTES} for r in hits.tolist()
            ]


def test_one_key_asks_for_its_block_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``_SCALAR_MAX`` keys, each key's block of event numbers is asked for by
    itself (no numpy over the whole segment), and a prefetched find asks for nothing."""
    rows = _rows([1] * 30)
    info = write_locations(_table(rows), str(tmp_path / "f.locations"), ATTRIBUTES)
    with LocationIndex(info.uri) as index:
        asked: list[tuple[str, int, int]] = []
        real = index._advise

        def record(section: str, start: int, stop: int) -> None:
            asked.append((section, start, stop))
            real(section, start, stop)  # the real madvise, on a real mapping

        monkeypatch.setattr(index, "_advise", record)
        keys = [(7, 2**40 + 3000), (9, 2**40 + 20_000), (8, 1)]  # rows 3 and 20, and absent
        runs = np.array([k[0] for k in keys], dtype=np.uint32)
        events = np.array([k[1] for k in keys], dtype=np.uint64)
        index.prefetch_keys(runs, events)
        assert [section for section, _, _ in asked] == ["events", "events"]
        assert all(
            start <= row < stop for (_, start, stop), row in zip(asked, (3, 20), strict=True)
        )
        asked.clear()
        assert index.find_many(runs, events, prefetched=True).tolist() == [3, 20, -1]
        assert asked == []
