"""The synthetic event generator: determinism, schema, and the realism the rest relies on."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from eventindex import generator
from eventindex.generator import (
    DEFAULT_PROCESSINGS,
    GeneratorSpec,
    Processing,
    dataset_specs,
    generate_menus,
    generate_run,
    hlt_seeds,
    iter_runs,
)
from eventindex.records.schema import EVENT_SCHEMA, TriggerMenu

SPEC = GeneratorSpec(
    runs=4, events_per_run=8000, events_per_lumiblock=700, seed=11, large_event_numbers=True
)
RAW, AOD_OLD, AOD_NEW, DAOD = (SPEC.dataset_name(SPEC.first_run, p) for p in DEFAULT_PROCESSINGS)


def clear_caches() -> None:
    """Forget cached menus and template pools, so a rerun recomputes everything."""
    generator._trigger_universe.cache_clear()
    generator._schedule.cache_clear()
    generator._pool.cache_clear()


@pytest.fixture(scope="module")
def runs() -> dict[int, dict[str, pa.Table]]:
    return dict(iter_runs(SPEC))


@pytest.fixture(scope="module")
def big_run() -> dict[str, pa.Table]:
    """One run at the default lumiblock and file sizes."""
    spec = GeneratorSpec(runs=1, events_per_run=40_000, exact=True, seed=3)
    return generate_run(spec, spec.first_run)


def all_tables(runs: dict[int, dict[str, pa.Table]]) -> Iterator[tuple[str, pa.Table]]:
    for tables in runs.values():
        yield from tables.items()


def masks(table: pa.Table, name: str) -> np.ndarray:
    """A mask column as an (events, bits) boolean matrix."""
    data = b"".join(table.column(name).to_pylist())
    rows = np.frombuffer(data, dtype=np.uint8).reshape(table.num_rows, -1)
    return np.unpackbits(rows, axis=1, bitorder="little").astype(bool)


def references(table: pa.Table, level: int) -> tuple[list[str], list[str], np.ndarray]:
    """(formats, guids, positions) of the ``level``-th reference of every event."""
    refs = table.column("references").to_pylist()
    formats = [r[level]["format"] for r in refs]
    guids = [r[level]["guid"] for r in refs]
    positions = np.array([r[level]["position"] for r in refs])
    return formats, guids, positions


def numpy_column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy())


# -- determinism -------------------------------------------------------------


def test_same_seed_gives_identical_tables(runs):
    clear_caches()
    again = generate_run(SPEC, SPEC.first_run + 1)
    first = runs[SPEC.first_run + 1]
    assert list(again) == list(first)
    for name, table in first.items():
        assert again[name].equals(table), name


def test_runs_do_not_depend_on_how_many_runs_the_spec_has(runs):
    longer = dataclasses.replace(SPEC, runs=SPEC.runs + 3)
    for run_number in (SPEC.first_run, SPEC.first_run + 3):
        tables = generate_run(longer, run_number)
        for name, table in runs[run_number].items():
            assert tables[name].equals(table), name
    smks = {m.key for m in generate_menus(SPEC)}
    assert smks <= {m.key for m in generate_menus(longer)}


def test_different_seed_gives_different_events(runs):
    other = dataclasses.replace(SPEC, seed=SPEC.seed + 1)
    tables = generate_run(other, SPEC.first_run)
    mine = runs[SPEC.first_run][RAW]
    theirs = tables[RAW]
    assert not theirs.equals(mine)
    assert set(references(theirs, 0)[1]).isdisjoint(references(mine, 0)[1])
    shared = min(theirs.num_rows, mine.num_rows)
    assert (
        not theirs.column("l1_tbp").slice(0, shared).equals(mine.column("l1_tbp").slice(0, shared))
    )


def test_exact_fixes_the_run_size_otherwise_it_varies(runs):
    raw_names = {run: SPEC.dataset_name(run, DEFAULT_PROCESSINGS[0]) for run in runs}
    sizes = [tables[raw_names[run]].num_rows for run, tables in runs.items()]
    assert len(set(sizes)) > 1
    assert all(0.7 * SPEC.events_per_run <= size <= 1.3 * SPEC.events_per_run for size in sizes)
    exact = GeneratorSpec(runs=1, events_per_run=1234, exact=True)
    tables = generate_run(exact, exact.first_run)
    assert tables[exact.dataset_name(exact.first_run, DEFAULT_PROCESSINGS[0])].num_rows == 1234


# -- datasets and schema -----------------------------------------------------


def test_every_table_has_exactly_the_event_schema(runs):
    for name, table in all_tables(runs):
        assert table.schema.equals(EVENT_SCHEMA), name
        assert table.num_rows > 0
        for column in table.columns:
            assert column.null_count == 0


def test_tables_are_the_datasets_that_dataset_specs_lists(runs):
    datasets = dataset_specs(SPEC)
    assert len(datasets) == SPEC.runs * len(SPEC.processings)
    assert {d.name for d in datasets} == {name for name, _ in all_tables(runs)}
    by_name = {d.name: d for d in datasets}
    raw = by_name[RAW]
    assert raw.name == "data15_13TeV.00284484.physics_Main.daq.RAW"
    assert (raw.format, raw.processing_tag, raw.upstream) == ("RAW", "", None)
    aod = by_name["data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521"]
    assert (aod.format, aod.processing_tag, aod.upstream) == ("AOD", "r7562_p2521", RAW)
    daod = by_name[DAOD]
    assert daod.upstream == AOD_NEW
    assert daod.processing_tag == "r9264_p3083_p4355"
    for dataset in datasets:
        assert dataset.collection == "data15_13TeV.physics_Main" == SPEC.collection
        assert (dataset.project, dataset.stream) == ("data15_13TeV", "physics_Main")
        run = int(dataset.attributes["run_number"])
        assert dataset.name.startswith(f"data15_13TeV.{run:08d}.physics_Main.")
        if dataset.upstream is not None:
            assert dataset.upstream in by_name


def test_rows_are_sorted_by_key_and_keys_are_unique(runs):
    for name, table in all_tables(runs):
        run = numpy_column(table, "run_number")
        event = numpy_column(table, "event_number")
        assert event.dtype == np.uint64
        assert (run == run[0]).all(), name
        assert (event[1:] > event[:-1]).all(), name


def test_event_fields_look_like_collision_data(runs):
    for name, table in all_tables(runs):
        for flag in ("is_simulation", "is_calibration", "is_testbeam"):
            assert not pc.any(table.column(flag)).as_py(), name
        assert pc.max(table.column("mc_channel_number")).as_py() == 0
        assert pc.max(pc.abs(table.column("mc_event_weight"))).as_py() == 0
        bcid = numpy_column(table, "bcid")
        assert bcid.min() >= 1
        assert bcid.max() <= 3563
        assert (numpy_column(table, "timestamp_ns") < 1_000_000_000).all()


def test_bunch_crossings_come_from_a_few_trains(runs):
    for tables in runs.values():
        bcid = np.unique(numpy_column(tables[next(iter(tables))], "bcid")).astype(np.int64)
        assert len(bcid) <= 2808  # the LHC design maximum
        # Trains are separated by gaps of at least eight empty bunches.
        trains = 1 + int((np.diff(bcid) > 8).sum())
        assert 1 <= trains <= 40
        assert bcid.max() < 3563 - 100  # the abort gap stays empty


def test_event_numbers_cross_two_to_the_32_when_asked(runs):
    raw = runs[SPEC.first_run][RAW]
    event = numpy_column(raw, "event_number")
    assert event.max() > 2**32
    assert event.min() < 2**32  # the run crosses the boundary
    small = GeneratorSpec(runs=2, events_per_run=3000)
    for _, tables in iter_runs(small):
        for table in tables.values():
            assert numpy_column(table, "event_number").max() < 2**32


# -- time structure ----------------------------------------------------------


def test_lumiblocks_hold_a_few_hundred_events_here_and_time_only_grows(runs):
    low, high = 2 * SPEC.events_per_lumiblock // 3, 4 * SPEC.events_per_lumiblock // 3
    starts = []
    for run, tables in runs.items():
        raw = tables[SPEC.dataset_name(run, DEFAULT_PROCESSINGS[0])]
        lb = numpy_column(raw, "lumi_block")
        assert (np.diff(lb.astype(np.int64)) >= 0).all()
        numbers, counts = np.unique(lb, return_counts=True)
        assert len(numbers) >= 5
        assert ((counts[:-1] >= low) & (counts[:-1] <= high)).all(), counts
        assert counts[-1] <= high
        time_ns = numpy_column(raw, "timestamp").astype(np.int64) * 10**9 + numpy_column(
            raw, "timestamp_ns"
        )
        assert (np.diff(time_ns) >= 0).all()
        lvl1 = numpy_column(raw, "lvl1_id").astype(np.int64)
        assert (np.diff(lvl1) > 0).all()
        # About a minute or two per lumiblock.
        seconds_per_lb = (time_ns[-1] - time_ns[0]) / 1e9 / (numbers[-1] - numbers[0])
        assert 50 < seconds_per_lb < 130
        starts.append(time_ns[0])
    assert starts == sorted(starts)
    assert starts[0] >= 1_433_116_800 * 10**9  # 2015-06-01


def test_default_lumiblocks_hold_a_few_thousand_events(big_run):
    raw = next(iter(big_run.values()))
    counts = np.unique(numpy_column(raw, "lumi_block"), return_counts=True)[1]
    assert ((counts[:-1] >= 2000) & (counts[:-1] <= 4000)).all()


def test_trigger_keys_follow_the_schedule(runs):
    menus = generate_menus(SPEC)
    smks_in_data = set()
    prescale_changes = 0
    for tables in runs.values():
        raw = tables[next(iter(tables))]
        smk = np.unique(numpy_column(raw, "smk"))
        assert len(smk) == 1  # the menu changes between runs only
        smks_in_data.add(int(smk[0]))
        lb = numpy_column(raw, "lumi_block")
        l1psk = numpy_column(raw, "l1psk")
        hltpsk = numpy_column(raw, "hltpsk")
        changes = np.flatnonzero(np.diff(l1psk.astype(np.int64)))
        prescale_changes += len(changes)
        # Prescale keys change at lumiblock boundaries, both levels together.
        assert (lb[changes] != lb[changes + 1]).all()
        assert (np.flatnonzero(np.diff(hltpsk.astype(np.int64))) == changes).all()
    assert smks_in_data == {m.key for m in menus}
    assert prescale_changes > 0
    many = GeneratorSpec(runs=12, events_per_run=100)
    assert len({m.key for m in generate_menus(many)}) >= 3


# -- triggers ----------------------------------------------------------------


def test_masks_have_the_menu_widths_and_tav_within_tap_within_tbp(runs):
    for name, table in all_tables(runs):
        tbp, tap, tav = (masks(table, m) for m in ("l1_tbp", "l1_tap", "l1_tav"))
        hlt = masks(table, "hlt_passed")
        assert tbp.shape[1] == SPEC.l1_bits
        assert hlt.shape[1] == SPEC.hlt_bits
        assert not (tap & ~tbp).any(), name
        assert not (tav & ~tap).any(), name
        # Every event was recorded: it passed L1 and at least one physics chain.
        assert tav.any(axis=1).all(), name
        assert hlt.any(axis=1).all(), name


def test_menus_name_every_bit_that_is_set(runs):
    menus = {(m.key, m.level): m for m in generate_menus(SPEC)}
    for tables in runs.values():
        raw = tables[next(iter(tables))]
        key = int(numpy_column(raw, "smk")[0])
        for column, level in (("l1_tbp", "L1"), ("hlt_passed", "HLT")):
            fired = np.flatnonzero(masks(raw, column).any(axis=0))
            assert set(fired.tolist()) <= set(menus[key, level].bits)


def test_hlt_chains_pass_only_when_their_l1_seed_passed(runs):
    menus = {(m.key, m.level): m for m in generate_menus(SPEC)}
    seeds = hlt_seeds(SPEC)
    checked = 0
    for tables in runs.values():
        for table in tables.values():
            key = int(numpy_column(table, "smk")[0])
            l1, hlt = menus[key, "L1"], menus[key, "HLT"]
            tav, passed = masks(table, "l1_tav"), masks(table, "hlt_passed")
            for bit in np.flatnonzero(passed.any(axis=0)):
                seed_bit = l1.bit_of(seeds[key][hlt.bits[int(bit)]])
                assert tav[passed[:, bit], seed_bit].all(), hlt.bits[int(bit)]
                checked += 1
    assert checked > 300


def test_trigger_rates_span_orders_of_magnitude(big_run):
    raw = next(iter(big_run.values()))
    for column in ("l1_tbp", "hlt_passed"):
        rate = masks(raw, column).mean(axis=0)
        rate = rate[rate > 0]
        assert (rate < 1e-3).sum() >= 10, column  # rare triggers
        assert (rate > 0.05).sum() >= 5, column  # common ones
        assert np.log10(rate.max() / rate.min()) > 3, column
    tbp = masks(raw, "l1_tbp").mean(axis=0)
    assert (tbp > 0.6).sum() >= 2  # a few items fire in nearly every crossing
    tav = masks(raw, "l1_tav").mean(axis=0)
    assert (tav < tbp).sum() > 10  # busy items are prescaled


def test_menus_are_realistic_and_fit_the_masks():
    menus = generate_menus(SPEC)
    assert [m.level for m in menus] == ["L1", "HLT"] * (len(menus) // 2)
    for menu in menus:
        TriggerMenu.model_validate(menu.model_dump())
        width = SPEC.l1_bits if menu.level == "L1" else SPEC.hlt_bits
        assert max(menu.bits) < width
        assert 0.5 * width < len(menu.bits) < width  # well filled, with holes
        prefix = "L1_" if menu.level == "L1" else "HLT_"
        assert all(name.startswith(prefix) for name in menu.bits.values())
    names = {name for menu in menus for name in menu.bits.values()}
    for expected in ("L1_EM22VHI", "L1_MU20", "L1_J100", "L1_XE50", "L1_TAU60",
                     "HLT_e26_lhtight_nod0_ivarloose", "HLT_mu26_ivarmedium", "HLT_j420",
                     "HLT_xe110_mht_L1XE50"):  # fmt: skip
        assert expected in names
    assert any(re.fullmatch(r"HLT_2e\d+_lh\w+", name) for name in names)
    seeds = hlt_seeds(SPEC)
    by_key = {(m.key, m.level): set(m.bits.values()) for m in menus}
    for key in {m.key for m in menus}:
        assert set(seeds[key]) == by_key[key, "HLT"]
        assert set(seeds[key].values()) <= by_key[key, "L1"]


def test_narrower_masks_follow_the_spec():
    spec = GeneratorSpec(runs=1, events_per_run=2000, l1_bits=128, hlt_bits=256, seed=5)
    table = next(iter(generate_run(spec, spec.first_run).values()))
    assert masks(table, "l1_tav").shape[1] == 128
    assert masks(table, "hlt_passed").shape[1] == 256
    assert masks(table, "hlt_passed").any(axis=1).all()


# -- files and references ----------------------------------------------------


def assert_positions_enumerate_files(guids: list[str], positions: np.ndarray) -> None:
    by_file: dict[str, list[int]] = {}
    for guid, position in zip(guids, positions.tolist(), strict=True):
        by_file.setdefault(guid, []).append(position)
    for guid, entries in by_file.items():
        assert sorted(entries) == list(range(len(entries))), guid


def test_guids_are_uuid4_strings(runs):
    for _, table in all_tables(runs):
        for ref in table.column("references")[0].as_py():
            parsed = uuid.UUID(ref["guid"])
            assert parsed.version == 4
            assert str(parsed) == ref["guid"]


def test_references_name_every_stage_down_to_the_dataset(runs):
    expected = {
        RAW: ["RAW"],
        AOD_OLD: ["RAW", "AOD"],
        AOD_NEW: ["RAW", "AOD"],
        DAOD: ["RAW", "AOD", "DAOD_PHYS"],
    }
    tables = runs[SPEC.first_run]
    for name, formats in expected.items():
        lengths = pc.list_value_length(tables[name].column("references"))
        assert pc.all(pc.equal(lengths, len(formats))).as_py()
        for level, fmt in enumerate(formats):
            assert set(references(tables[name], level)[0]) == {fmt}


def test_positions_are_entries_zero_to_n_in_every_file(runs):
    for name, table in all_tables(runs):
        depth = len(table.column("references")[0].as_py())
        for level in range(depth):
            _, guids, positions = references(table, level)
            if level == depth - 1:  # the dataset's own files hold exactly its events
                assert_positions_enumerate_files(guids, positions)
            else:
                assert positions.min() >= 0, name


def test_raw_files_hold_one_lumiblock_and_a_thousand_or_two_events(big_run):
    raw = next(iter(big_run.values()))
    _, guids, _ = references(raw, 0)
    lb = numpy_column(raw, "lumi_block")
    lumiblocks_of: dict[str, set[int]] = {}
    for guid, block in zip(guids, lb.tolist(), strict=True):
        lumiblocks_of.setdefault(guid, set()).add(block)
    assert all(len(blocks) == 1 for blocks in lumiblocks_of.values())
    sizes = Counter(guids)
    last_lb = lb.max()
    full = [size for guid, size in sizes.items() if lumiblocks_of[guid] != {last_lb}]
    assert min(full) >= 900, min(full)
    assert max(full) <= 2300, max(full)
    # SFOs interleave: a file's events are not a contiguous run of events.
    first_guid = guids[0]
    rows = [i for i, guid in enumerate(guids) if guid == first_guid]
    assert rows[-1] - rows[0] + 1 > len(rows)


def test_aod_files_hold_about_five_thousand_events(big_run):
    aod = list(big_run.values())[1]
    sizes = sorted(Counter(references(aod, 1)[1]).values())
    assert 3500 <= np.median(sizes) <= 6500, sizes


def test_both_aod_processings_point_at_the_same_raw_entries(runs):
    for run, tables in runs.items():
        old = tables[SPEC.dataset_name(run, DEFAULT_PROCESSINGS[1])]
        new = tables[SPEC.dataset_name(run, DEFAULT_PROCESSINGS[2])]
        raw = tables[SPEC.dataset_name(run, DEFAULT_PROCESSINGS[0])]
        assert old.column("event_number").equals(new.column("event_number"))
        for table in (old, new):
            _, guids, positions = references(table, 0)
            _, raw_guids, raw_positions = references(raw, 0)
            assert guids == raw_guids
            assert (positions == raw_positions).all()
        assert set(references(old, 1)[1]).isdisjoint(references(new, 1)[1])
        assert not (references(old, 1)[2] == references(new, 1)[2]).all()


def test_daod_is_a_skimmed_subset_of_its_aod(runs):
    for run, tables in runs.items():
        aod = tables[SPEC.dataset_name(run, DEFAULT_PROCESSINGS[2])]
        daod = tables[SPEC.dataset_name(run, DEFAULT_PROCESSINGS[3])]
        aod_events = numpy_column(aod, "event_number")
        daod_events = numpy_column(daod, "event_number")
        assert np.isin(daod_events, aod_events).all()
        assert 0.25 < len(daod_events) / len(aod_events) < 0.35
        picked = aod.take(pa.array(np.flatnonzero(np.isin(aod_events, daod_events))))
        for level in (0, 1):
            assert references(daod, level)[1] == references(picked, level)[1]
            assert (references(daod, level)[2] == references(picked, level)[2]).all()
        # Everything but the references is the same record.
        assert daod.drop_columns(["references"]).equals(picked.drop_columns(["references"]))


# -- spec validation ---------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"runs": 0},
        {"events_per_run": 0},
        {"l1_bits": 100},
        {"hlt_bits": 8},
        {"stream": "physics.Main"},
        {"seed": -1},
        {"processings": ()},
        {"processings": (Processing("AOD", "merge", "r1", upstream="daq.RAW"),)},
        {"processings": (Processing("RAW", "daq", keep_fraction=0.5),)},
        {"processings": (Processing("RAW", "daq"), Processing("RAW", "daq"))},
    ],
)
def test_bad_specs_are_rejected(changes):
    with pytest.raises(ValueError):
        GeneratorSpec(**changes)


def test_runs_outside_the_spec_are_rejected():
    with pytest.raises(ValueError, match="not generated"):
        generate_run(SPEC, SPEC.first_run + SPEC.runs)


CUSTOM_CHAIN = (
    Processing("RAW", "daq", events_per_file=500),
    Processing("AOD", "merge", "f1_m1", upstream="daq.RAW", events_per_file=1000),
    Processing("DAOD_EXOT", "deriv", "f1_m1_p1", upstream="merge.AOD.f1_m1", keep_fraction=0.5),
    Processing("NTUP", "deriv", "f1_m1_p1_x", upstream="deriv.DAOD_EXOT.f1_m1_p1",
               keep_fraction=0.5),
)  # fmt: skip


def test_custom_processing_chains():
    spec = GeneratorSpec(runs=1, events_per_run=3000, processings=CUSTOM_CHAIN)
    tables = generate_run(spec, spec.first_run)
    ntup = tables[f"data15_13TeV.{spec.first_run:08d}.physics_Main.deriv.NTUP.f1_m1_p1_x"]
    assert [r["format"] for r in ntup.column("references")[0].as_py()] == [
        "RAW", "AOD", "DAOD_EXOT", "NTUP",
    ]  # fmt: skip
    assert 0.15 < ntup.num_rows / next(iter(tables.values())).num_rows < 0.35
    _, guids, positions = references(ntup, 3)
    assert_positions_enumerate_files(guids, positions)


def test_big_runs_are_built_in_record_batches(monkeypatch, runs):
    monkeypatch.setattr(generator, "_TABLE_CHUNK_ROWS", 1000)
    tables = generate_run(SPEC, SPEC.first_run)
    for name, table in runs[SPEC.first_run].items():
        assert tables[name].column("event_number").num_chunks > 1
        assert tables[name].equals(table), name
