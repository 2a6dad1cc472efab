"""Trigger expressions, the inverted index and counts, checked against a per-row evaluation
of the generated masks with the generated menus."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalog.model import Dataset, FileKind
from eventindex.errors import NotFoundError
from eventindex.query.trigger_index import (
    MASK_CODES,
    LoadedIndex,
    bit_rows,
    build_trigger_index,
    mask_matrix,
)
from eventindex.query.triggers import (
    And,
    Not,
    Or,
    TriggerExpressionError,
    TriggerIndex,
    TriggerMenuMissingError,
    TriggerName,
    parse_expression,
    parse_run_range,
)
from eventindex.records.schema import TRIGGER_MASK_FIELDS, mask_bits_set
from spark_jobs.indexer import plan_index, run_index
from tests.generated_store import GeneratedStore

# -- parsing -------------------------------------------------------------------


def test_precedence_not_binds_tighter_than_and_than_or() -> None:
    parsed = parse_expression("A or B AND not C:tbp")
    assert parsed == Or(
        (
            TriggerName("A", None, 1),
            And((TriggerName("B", None, 6), Not(TriggerName("C", "TBP", 16)))),
        )
    )
    assert parse_expression("!(A | B) && C") == And(
        (
            Not(Or((TriggerName("A", None, 3), TriggerName("B", None, 7)))),
            TriggerName("C", None, 13),
        )
    )


@pytest.mark.parametrize(
    ("text", "token", "position", "words"),
    [
        ("", "", 1, "empty"),
        ("A AND", "", 6, "end of the expression"),
        ("(A OR B", "", 8, "missing ')'"),
        ("A B", "B", 3, "found 'B'"),
        ("A ) B", ")", 3, "found ')'"),
        ("A $ B", "$", 3, "'$'"),
        ("NOT", "", 4, "expected a trigger name"),
        ("A:XYZ", "A:XYZ", 1, "unknown mask 'XYZ'"),
    ],
)
def test_malformed_expressions_name_the_token_and_position(
    text: str, token: str, position: int, words: str
) -> None:
    with pytest.raises(TriggerExpressionError) as caught:
        parse_expression(text)
    assert (caught.value.token, caught.value.position) == (token, position)
    assert words in str(caught.value)
    if text:
        assert f"position {position}" in str(caught.value)


def test_run_ranges() -> None:
    assert parse_run_range("284484") == (284484, 284484)
    assert parse_run_range("284484-284490") == (284484, 284490)
    for bad in ("x", "5-3", "1-2-3", "-4"):
        with pytest.raises(ValueError, match="run range"):
            parse_run_range(bad)


# -- the transform ----------------------------------------------------------------


def test_mask_matrix_pads_masks_of_several_widths() -> None:
    column = pa.array([b"\x01", b"\x00\x80", b"", b"\xff\x01\x02"], pa.binary())
    assert mask_matrix(column).tolist() == [[1, 0, 0], [0, 128, 0], [0, 0, 0], [255, 1, 2]]
    rows = bit_rows(mask_matrix(column))
    assert {bit: np.concatenate(p).tolist() for bit, p in rows.items()} == {
        0: [0, 3],
        **{bit: [3] for bit in range(1, 8)},
        15: [1],
        8: [3],
        17: [3],
    }


def test_index_bitmaps_hold_exactly_the_rows_with_each_bit(store: GeneratedStore) -> None:
    table = store.tables[store.dataset(store.spec.first_run, "RAW")]
    loaded = LoadedIndex(build_trigger_index(table))
    run_number, smk = store.spec.first_run, table["smk"][0].as_py()
    assert loaded.groups == {(run_number, smk): table.num_rows}
    for name in TRIGGER_MASK_FIELDS:
        expected: dict[int, list[int]] = {}
        for row, mask in enumerate(table[name].to_pylist()):
            for bit in mask_bits_set(mask):
                expected.setdefault(bit, []).append(row)
        assert expected
        for bit, rows in expected.items():
            assert list(loaded.bitmap(run_number, smk, MASK_CODES[name], bit)) == rows
        unused = max(expected) + 1
        assert len(loaded.bitmap(run_number, smk, MASK_CODES[name], unused)) == 0


def test_rows_of_one_run_need_not_be_contiguous() -> None:
    table = pa.table(
        {
            "run_number": pa.array([1, 2, 1, 2], pa.uint32()),
            "smk": pa.array([7, 8, 7, 8], pa.uint32()),
            **{
                name: pa.array([b"\x01", b"\x03", b"\x02", b"\x00"]) for name in TRIGGER_MASK_FIELDS
            },
        }
    )
    loaded = LoadedIndex(build_trigger_index(table))
    assert loaded.groups == {(1, 7): 2, (2, 8): 2}
    code = MASK_CODES["hlt_passed"]
    assert list(loaded.bitmap(1, 7, code, 0)) == [0]
    assert list(loaded.bitmap(1, 7, code, 1)) == [2]
    assert list(loaded.bitmap(2, 8, code, 1)) == [1]


# -- counting against a per-row evaluation ------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("triggers"))
    try:
        yield generated
    finally:
        generated.close()


@pytest.fixture(scope="module")
def indexed(store: GeneratedStore) -> GeneratedStore:
    tasks, _ = plan_index(store.catalog, str(store.root), "*")
    run_index(store.catalog, tasks)
    return store


def _passes(store: GeneratedStore, table: pa.Table, name: str) -> np.ndarray:
    """Per row: does ``name`` (L1 after veto, or HLT) pass, read with the row's menu."""
    result = np.zeros(table.num_rows, dtype=bool)
    smks = table["smk"].to_numpy()
    for smk in np.unique(smks):
        level = "L1" if name.startswith("L1_") else "HLT"
        bits = {n: b for b, n in store.catalog.get_trigger_menu(int(smk), level).bits.items()}
        if name not in bits:
            continue
        column = "l1_tav" if level == "L1" else "hlt_passed"
        matrix = mask_matrix(table[column])
        bit = bits[name]
        rows = smks == smk
        result[rows] = ((matrix[rows, bit // 8] >> (bit % 8)) & 1).astype(bool)
    return result


def _common_triggers(store: GeneratedStore, level: str, count: int) -> list[str]:
    """Triggers that fire in some but not all events of the first run."""
    table = store.tables[store.dataset(store.spec.first_run, "RAW")]
    menu = store.catalog.get_trigger_menu(table["smk"][0].as_py(), level)
    chosen = []
    for name in menu.bits.values():
        fired = int(_passes(store, table, name).sum())
        if 10 < fired < table.num_rows - 10:
            chosen.append(name)
        if len(chosen) == count:
            break
    return chosen


def test_counts_equal_a_per_row_evaluation(indexed: GeneratedStore) -> None:
    store = indexed
    a, b = _common_triggers(store, "HLT", 2)
    c, d = _common_triggers(store, "L1", 2)
    expression = f"({a} OR {c}) AND NOT {d} OR NOT ({b} | {c})"
    index = TriggerIndex(store.catalog)
    answer = index.count(expression, dataset="*.daq.RAW")
    expected_total = 0
    for run_number in store.spec.run_numbers:
        table = store.tables[store.dataset(run_number, "RAW")]
        pa_, pb, pc_, pd = (_passes(store, table, n) for n in (a, b, c, d))
        expected = int((((pa_ | pc_) & ~pd) | ~(pb | pc_)).sum())
        assert answer.runs[run_number].passed == expected
        assert answer.runs[run_number].events == table.num_rows
        expected_total += expected
    assert answer.passed == expected_total
    assert answer.files == 2 and answer.unindexed_files == 0
    one_run = index.count(
        expression, dataset="*.daq.RAW", run_min=store.spec.first_run, run_max=store.spec.first_run
    )
    assert one_run.passed == answer.runs[store.spec.first_run].passed
    assert list(one_run.runs) == [store.spec.first_run]


def test_overlap_matrix_is_pairwise_intersections(indexed: GeneratedStore) -> None:
    store = indexed
    names = _common_triggers(store, "HLT", 2) + _common_triggers(store, "L1", 2)
    answer = TriggerIndex(store.catalog).overlap(names, dataset="*.merge.AOD.r7562_p2521")
    tables = [store.tables[store.dataset(r, "AOD", "r7562")] for r in store.spec.run_numbers]
    passes = [np.concatenate([_passes(store, t, n) for t in tables]) for n in names]
    for i in range(len(names)):
        for j in range(len(names)):
            assert answer.matrix[i][j] == int((passes[i] & passes[j]).sum()), (i, j)
    assert answer.events == sum(t.num_rows for t in tables)


def test_unindexed_files_give_the_same_answers(
    store: GeneratedStore, indexed: GeneratedStore
) -> None:
    a, b = _common_triggers(store, "HLT", 2)
    indexes = store.catalog.list_tagfiles(kinds=[FileKind.INDEX])
    index = TriggerIndex(store.catalog)
    with_index = index.count(f"{a} OR {b}", dataset="*")
    store.catalog.retire_tagfiles([e.file_id for e in indexes])
    try:
        index.refresh()
        without = index.count(f"{a} OR {b}", dataset="*")
    finally:
        # Put the indexes back for the other tests: index the masters again.
        tasks, _ = plan_index(store.catalog, str(store.root), "*")
        run_index(store.catalog, tasks)
    assert without.unindexed_files == without.files > 0
    assert (without.passed, without.events) == (with_index.passed, with_index.events)


def test_unknown_trigger_and_dataset_are_named(indexed: GeneratedStore) -> None:
    index = TriggerIndex(indexed.catalog)
    with pytest.raises(TriggerExpressionError, match="unknown trigger 'HLT_nope' at position 12"):
        index.count("L1_XE50 OR HLT_nope", dataset="*")
    with pytest.raises(NotFoundError, match=r"no dataset matches 'nothing\.\*'"):
        index.count("L1_XE50", dataset="nothing.*")
    with pytest.raises(TriggerExpressionError, match="applies to L1 items only"):
        hlt = _common_triggers(indexed, "HLT", 1)[0]
        index.count(f"{hlt}:TBP", dataset="*")


def test_a_run_without_its_menu_is_a_clear_error(indexed: GeneratedStore, tmp_path: Path) -> None:
    store = indexed
    table = store.tables[store.dataset(store.spec.first_run, "RAW")]
    orphan_run = 999_999
    table = table.set_column(
        0, "run_number", pa.array(np.full(table.num_rows, orphan_run), pa.uint32())
    )
    table = table.set_column(
        table.schema.get_field_index("smk"),
        "smk",
        pa.array(np.full(table.num_rows, 7), pa.uint32()),
    )
    dataset = Dataset(name="menuless.RAW", collection=store.spec.collection, format="RAW")
    store.catalog.create_dataset(dataset)
    store.writer.write(table, dataset)
    index = TriggerIndex(store.catalog)
    with pytest.raises(
        TriggerMenuMissingError, match=r"SMK 7, needed by run 999999 \(dataset menuless\.RAW"
    ):
        index.count("L1_XE50", dataset="menuless.*")
    # Other runs are unaffected.
    assert index.count("L1_XE50", dataset="*.daq.RAW").events > 0
