"""Selecting the events that pass a trigger expression (``Reader.select`` with
``TriggerIndex.selection``), checked against a per-row evaluation of the masks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from catalog.model import FileKind
from eventindex.query.reader import Reader
from eventindex.query.triggers import (
    And,
    Expression,
    Not,
    Or,
    TriggerExpressionError,
    TriggerIndex,
    TriggerName,
    UnknownTriggerError,
    parse_expression,
)
from eventindex.records.schema import mask_bits_set
from eventindex.storage import MapFileReader
from spark_jobs.indexer import plan_index, run_index
from tests.generated_store import GeneratedStore

_L1_MASKS = {None: "l1_tav", "TAV": "l1_tav", "TBP": "l1_tbp", "TAP": "l1_tap"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("trigger-select"))
    # RAW is indexed; the AODs and the DAOD are not (new TagFiles): both paths are used.
    tasks, _ = plan_index(generated.catalog, str(generated.root), "*.daq.RAW")
    run_index(generated.catalog, tasks)
    try:
        yield generated
    finally:
        generated.close()


def brute_force(store: GeneratedStore, table: pa.Table, expression: str) -> list[bool]:
    """Per row, in plain Python: does the row pass ``expression`` with its SMK's menus?"""
    parsed = parse_expression(expression)
    menus = {
        (m.key, m.level): {name: bit for bit, name in m.bits.items()}
        for m in store.catalog.list_trigger_menus()
    }

    def passes(node: Expression, row: dict[str, Any]) -> bool:
        if isinstance(node, Not):
            return not passes(node.operand, row)
        if isinstance(node, And):
            return all(passes(o, row) for o in node.operands)
        if isinstance(node, Or):
            return any(passes(o, row) for o in node.operands)
        assert isinstance(node, TriggerName)
        hlt = menus[(row["smk"], "HLT")]
        if node.qualifier is None and node.name in hlt:
            return hlt[node.name] in mask_bits_set(row["hlt_passed"])
        l1 = menus[(row["smk"], "L1")]
        if node.name in l1:
            return l1[node.name] in mask_bits_set(row[_L1_MASKS[node.qualifier]])
        return False

    return [passes(parsed, row) for row in table.to_pylist()]


def _names(store: GeneratedStore, level: str, count: int) -> list[str]:
    """Triggers of the first run's menu that pass some events but not all."""
    table = store.tables[store.dataset(store.spec.first_run, "RAW")]
    menu = store.catalog.get_trigger_menu(table["smk"][0].as_py(), level)
    chosen = []
    for name in menu.bits.values():
        fired = sum(brute_force(store, table, name))
        if 10 < fired < table.num_rows - 10:
            chosen.append(name)
        if len(chosen) == count:
            break
    return chosen


@pytest.fixture(scope="module")
def expression(store: GeneratedStore) -> str:
    a, b = _names(store, "HLT", 2)
    c, d = _names(store, "L1", 2)
    return f"({a} OR {c}:TBP) AND NOT {d} OR NOT ({b} | {c})"


def _selected(
    store: GeneratedStore, expression: str, run_min: int, run_max: int, **kwargs: Any
) -> list[dict[str, Any]]:
    selection = TriggerIndex(store.catalog).selection(expression, run_min=run_min, run_max=run_max)
    with Reader(store.catalog) as reader:
        return list(
            reader.select(
                store.spec.collection,
                run_min=run_min,
                run_max=run_max,
                rows_of=selection.rows,
                **kwargs,
            )
        )


def test_select_equals_a_per_row_evaluation(store: GeneratedStore, expression: str) -> None:
    runs = store.spec.run_numbers
    rows = _selected(store, expression, runs[0], runs[-1], columns=["lumi_block"])
    expected = []
    for name in sorted(store.tables):
        table = store.tables[name].sort_by(
            [("run_number", "ascending"), ("event_number", "ascending")]
        )
        keep = brute_force(store, table, expression)
        assert 0 < sum(keep) < table.num_rows, name
        expected += [
            {"dataset": name, "run_number": r, "event_number": e, "lumi_block": lb}
            for r, e, lb, k in zip(
                table["run_number"].to_pylist(),
                table["event_number"].to_pylist(),
                table["lumi_block"].to_pylist(),
                keep,
                strict=True,
            )
            if k
        ]
    assert rows == expected
    indexed = {
        e.dataset for e in store.catalog.list_tagfiles(kinds=[FileKind.INDEX]) if e.part
    } & set(store.tables)
    assert indexed and indexed != set(store.tables)  # both paths were taken


def test_a_run_range_and_a_limit(store: GeneratedStore, expression: str) -> None:
    run = store.spec.run_numbers[-1]
    name = store.dataset(run, "AOD", "r7562")
    table = store.tables[name]
    expected = [
        e
        for e, k in zip(
            table["event_number"].to_pylist(), brute_force(store, table, expression), strict=True
        )
        if k
    ]
    rows = _selected(store, expression, run, run, dataset_pattern=name, columns=[])
    assert [r["event_number"] for r in rows] == expected
    assert {r["run_number"] for r in rows} == {run}
    limited = _selected(store, expression, run, run, dataset_pattern=name, limit=5, columns=[])
    assert [r["event_number"] for r in limited] == expected[:5]


def test_index_and_masks_give_the_same_rows(store: GeneratedStore, expression: str) -> None:
    [master] = store.catalog.list_tagfiles(
        dataset=store.dataset(store.spec.first_run, "RAW"), kinds=[FileKind.MASTER]
    )
    selection = TriggerIndex(store.catalog).selection(expression)
    from_index = selection.rows(master)
    from_masks = selection._rows_from_masks(master)
    assert from_index.dtype == np.uint32 and len(from_index) > 0
    np.testing.assert_array_equal(from_index, from_masks)


def test_bad_expressions_are_refused_before_reading(store: GeneratedStore) -> None:
    index = TriggerIndex(store.catalog)
    with pytest.raises(TriggerExpressionError, match="position 12"):
        index.selection("L1_XE50 AND")
    with pytest.raises(UnknownTriggerError, match="unknown trigger 'HLT_nope'"):
        index.selection("HLT_nope")
    with pytest.raises(ValueError, match="run range"):
        index.selection("L1_XE50", run_min=5, run_max=4)


def test_take_reads_rows_across_row_groups(store: GeneratedStore) -> None:
    [master] = store.catalog.list_tagfiles(
        dataset=store.dataset(store.spec.first_run, "RAW"), kinds=[FileKind.MASTER]
    )
    with MapFileReader(master.uri) as reader:
        assert reader.num_row_groups > 2
        every = reader.read(["event_number"])["event_number"].to_pylist()
        rows = [0, 1, 1023, 1024, 2047, reader.num_rows - 1]
        pieces = list(reader.take(rows, ["event_number"]))
        assert len(pieces) == 3
        assert pa.concat_tables(pieces)["event_number"].to_pylist() == [every[i] for i in rows]
        whole = list(reader.take(range(1024, 2048), ["event_number"]))
        assert whole[0]["event_number"].to_pylist() == every[1024:2048]
        assert list(reader.take([], ["event_number"])) == []
        with pytest.raises(ValueError, match="ascend"):
            list(reader.take([3, 2]))
        with pytest.raises(ValueError, match="ascend"):
            list(reader.take([reader.num_rows]))
