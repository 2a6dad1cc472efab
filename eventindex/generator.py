"""Deterministic synthetic ATLAS-like event records, fast enough for 10^8 events.

One run is generated at a time from ``np.random.default_rng([seed, run, stream])``,
so any run can be produced on its own and twice gives identical tables. All the
per-event work is vectorised numpy: there is no Python loop per event.

The model, after ATLAS Run 2 data taking:

* A run is a sequence of lumiblocks of a few thousand events (about a minute
  each, with the odd lumiblock missing from the stream); timestamps grow with
  lumiblock, bunch crossings come from the run's filling scheme (bunch trains),
  event numbers and L1 ids grow with gaps (other streams take the events in
  between). With ``large_event_numbers`` every other run crosses 2**32.
* Trigger menus belong to a super master key (SMK) that changes every few runs;
  inside a run the prescale keys (L1PSK, HLTPSK) change between lumiblock
  ranges, relaxing prescales as the luminosity falls.
* Every event was recorded by a physics chain (drawn by trigger group), so
  its L1 seed fired; other L1 items fire with rates from their thresholds
  (about 1e-5 to 0.3, minimum-bias items almost always), and thresholds nest
  (an EM22VHI event is an EM12 event too). After-prescale is a subset of
  before-prescale (busy items are prescaled) and after-veto a subset of
  after-prescale. An HLT chain passes only when its seed's after-veto bit is
  set. Common trigger patterns come from a seeded pool of templates per
  (menu, prescale set), so a run costs one row gather per mask; rare items
  and chains (rate below ``_RARE``) are drawn per event on top, so rare
  triggers fire in otherwise ordinary events.
* Every run has one dataset per ``Processing``: RAW files hold the events of
  one lumiblock (interleaved, as several SFOs write them), AOD files merge whole
  upstream files, and a derivation keeps a skimmed subset. References name the
  file GUID and entry of every stage from RAW down to the dataset's own format.
"""

from __future__ import annotations

import functools
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from catalog.model import Dataset
from eventindex.records.schema import (
    EVENT_SCHEMA,
    REFERENCE_TYPE,
    TRIGGER_MASK_FIELDS,
    TriggerMenu,
)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
ByteArray = npt.NDArray[np.uint8]

# 2015-06-01T00:00:00Z: the start of 13 TeV physics data taking.
RUN_EPOCH = 1_433_116_800
# Bunch-crossing ids that can be filled; the abort gap is at the end of the orbit.
BCID_MIN, BCID_MAX = 1, 3563
ABORT_GAP_BUNCHES = 120
# Lumiblock length in seconds (ATLAS aims at one minute).
LUMIBLOCK_SECONDS = (60.0, 120.0)
# Per-run event count spread around ``events_per_run`` unless ``exact``.
RUN_SIZE_SPREAD = 0.3
# Lumiblock sizes are uniform in this fraction of ``events_per_lumiblock``.
LUMIBLOCK_SPREAD = (2 / 3, 4 / 3)
# Upper bound keeps every per-run offset inside int32 Arrow offsets and uint32 L1 ids.
MAX_EVENTS_PER_RUN = 10_000_000
# Prescale sets per SMK; a run uses them in order as its luminosity falls.
PRESCALE_SETS = 4
L1PSK_BASE = 1000
HLTPSK_BASE = 500

# Triggers with a per-event rate below this are drawn per event, not from templates.
_RARE = 2e-3
# Probability that the veto (dead time, busy) removes an item after prescale.
_VETO = 0.01
# L1 items above this rate are prescaled down to it in the first prescale set.
_L1_TAP_TARGET = 0.03
# Fraction of the mask bits that carry a trigger: real menus leave holes.
_MENU_FILL = 0.85
# Template pool size: a power of two between these, near the run size.
_POOL_MIN, _POOL_MAX = 4096, 32768
# At most this many rows per Arrow record batch (fewer for very wide masks).
_TABLE_CHUNK_ROWS = 1 << 22

# Sub-streams of the per-run random generator (the third seed word).
_RNG_LAYOUT, _RNG_TRIGGERS, _RNG_FILES = 1, 2, 3
# Seed words above any uint32 run number, for generators that belong to no run.
_RNG_CATALOGUE, _RNG_SCHEDULE, _RNG_POOL = 2**32 + 1, 2**32 + 2, 2**32 + 3


@dataclass(frozen=True)
class Processing:
    """One processing stage of a run: its format, tag and where its input comes from.

    ``upstream`` is the ``key`` of the processing this one reads (``None`` for
    the raw data); ``keep_fraction`` below one makes a skim.
    """

    format: str
    prodstep: str
    tag: str = ""
    upstream: str | None = None
    events_per_file: int = 5000
    keep_fraction: float = 1.0

    @property
    def key(self) -> str:
        """The dataset-name suffix: ``merge.AOD.r7562_p2521``, ``daq.RAW``."""
        return ".".join([self.prodstep, self.format] + ([self.tag] if self.tag else []))


DEFAULT_PROCESSINGS: tuple[Processing, ...] = (
    Processing("RAW", "daq", events_per_file=1500),
    Processing("AOD", "merge", "r7562_p2521", upstream="daq.RAW"),
    Processing("AOD", "merge", "r9264_p3083", upstream="daq.RAW"),
    Processing(
        "DAOD_PHYS",
        "deriv",
        "r9264_p3083_p4355",
        upstream="merge.AOD.r9264_p3083",
        keep_fraction=0.3,
    ),
)


@dataclass(frozen=True)
class GeneratorSpec:
    """What to generate: which runs, how many events, which processings, which seed."""

    project: str = "data15_13TeV"
    stream: str = "physics_Main"
    first_run: int = 284484
    runs: int = 3
    events_per_run: int = 20_000
    seed: int = 0
    l1_bits: int = 256
    hlt_bits: int = 1024
    large_event_numbers: bool = False
    exact: bool = False
    events_per_lumiblock: int = 3000
    processings: tuple[Processing, ...] = DEFAULT_PROCESSINGS

    def __post_init__(self) -> None:
        for name in ("project", "stream"):
            value = getattr(self, name)
            if not value or "." in value:
                raise ValueError(f"{name} must be non-empty and contain no '.': {value!r}")
        if self.runs < 1:
            raise ValueError(f"runs must be at least 1, not {self.runs}")
        if not 0 < self.first_run <= 2**32 - self.runs:
            raise ValueError(f"first_run {self.first_run} leaves the uint32 run-number range")
        if not 1 <= self.events_per_run <= MAX_EVENTS_PER_RUN:
            raise ValueError(f"events_per_run must be in [1, {MAX_EVENTS_PER_RUN}]")
        if self.events_per_lumiblock < 1:
            raise ValueError("events_per_lumiblock must be at least 1")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")
        for name in ("l1_bits", "hlt_bits"):
            bits = getattr(self, name)
            if bits < 32 or bits % 8 or bits > 65536:
                raise ValueError(f"{name} must be a multiple of 8 in [32, 65536], not {bits}")
        _check_processings(self.processings)

    @property
    def collection(self) -> str:
        """The collection every dataset belongs to: ``project.stream``."""
        return f"{self.project}.{self.stream}"

    @property
    def run_numbers(self) -> range:
        """The run numbers this spec generates, in order."""
        return range(self.first_run, self.first_run + self.runs)

    def dataset_name(self, run_number: int, processing: Processing) -> str:
        """ATLAS dataset name, e.g. ``data15_13TeV.00284484.physics_Main.daq.RAW``."""
        return f"{self.project}.{run_number:08d}.{self.stream}.{processing.key}"


def _check_processings(processings: tuple[Processing, ...]) -> None:
    if not processings:
        raise ValueError("at least one processing is needed")
    seen: set[str] = set()
    for processing in processings:
        if processing.key in seen:
            raise ValueError(f"processing {processing.key!r} appears twice")
        if not processing.format or not processing.prodstep or "." in processing.format:
            raise ValueError(f"processing {processing.key!r}: format and prodstep are needed")
        if processing.events_per_file < 1:
            raise ValueError(f"processing {processing.key!r}: events_per_file must be >= 1")
        if not 0.0 < processing.keep_fraction <= 1.0:
            raise ValueError(f"processing {processing.key!r}: keep_fraction must be in (0, 1]")
        if processing.upstream is None:
            if processing.keep_fraction != 1.0:
                raise ValueError(f"processing {processing.key!r}: raw data cannot be skimmed")
        elif processing.upstream not in seen:
            raise ValueError(
                f"processing {processing.key!r}: upstream {processing.upstream!r} "
                "must be listed before it"
            )
        seen.add(processing.key)


# --------------------------------------------------------------------------
# Trigger catalogue: names, rates and seeds, from realistic patterns
# --------------------------------------------------------------------------

# object -> (reference threshold, rate per event at that threshold, power-law slope)
_L1_OBJECTS: dict[str, tuple[float, float, float]] = {
    "EM": (3.0, 0.6, 2.2),
    "MU": (4.0, 0.4, 2.0),
    "J": (12.0, 0.9, 2.5),
    "TAU": (8.0, 0.5, 2.0),
    "XE": (35.0, 0.08, 4.0),
    "TE": (5.0, 0.3, 1.5),
    "XS": (20.0, 0.02, 3.0),
}
# Isolation (I), hadronic veto (H), variable threshold (V), tau isolation (M).
_L1_SUFFIX_FACTOR = {"V": 0.8, "H": 0.6, "I": 0.5, "M": 0.7}
_L1_FRAGMENT = re.compile(r"(\d*)(EM|MU|J|TAU|XE|TE|XS)(\d+)([A-Z]*)(?:\.(\d+)ETA(\d+))?")


def _fragment_rate(fragment: str) -> float:
    match = _L1_FRAGMENT.fullmatch(fragment)
    if match is None:
        raise ValueError(f"not an L1 threshold fragment: {fragment!r}")
    multiplicity = int(match[1] or 1)
    ref_threshold, ref_rate, slope = _L1_OBJECTS[match[2]]
    rate = ref_rate * (ref_threshold / int(match[3])) ** slope
    for letter in match[4]:
        rate *= _L1_SUFFIX_FACTOR.get(letter, 1.0)
    if match[5] is not None:
        rate *= (int(match[6]) - int(match[5])) / 49
    if multiplicity > 1:
        # Objects come together (pile-up, jets recoil), so n-fold rates beat r**n.
        rate = min(
            rate * 0.1 ** (multiplicity - 1), rate**multiplicity * 10.0 ** (multiplicity - 1)
        )
    return float(rate)


def _item_rate(name: str) -> float:
    rates = [_fragment_rate(fragment) for fragment in name.removeprefix("L1_").split("_")]
    if len(rates) == 1:
        return rates[0]
    return min(0.5 * min(rates), math.prod(rates) * 10.0 ** (len(rates) - 1))


_L1_SINGLES: dict[str, tuple[str, ...]] = {
    "EM": (
        "3", "7", "8VH", "10VH", "12", "15", "15VH", "15VHI", "18VH", "18VHI", "20VH",
        "20VHI", "22VHI", "24VHI", "26VHI", "30VHI", "50V",
    ),
    "MU": ("4", "6", "10", "11", "15", "20", "21"),
    "J": (
        "12", "15", "20", "25", "30", "40", "50", "75", "85", "100", "120", "150", "400",
        "15.31ETA49", "20.31ETA49", "30.31ETA49", "50.31ETA49", "75.31ETA49",
        "100.31ETA49", "15.0ETA25", "20.0ETA25", "40.0ETA25", "20.28ETA31",
    ),
    "TAU": ("8", "12", "12IM", "20IM", "30", "40", "60", "100"),
    "XE": ("35", "40", "45", "50", "55", "60", "70", "80", "150", "300"),
    "TE": ("5", "10", "20", "30", "40", "50"),
    "XS": ("20", "30", "40", "50", "60"),
}  # fmt: skip
_L1_MULTIS: dict[str, tuple[str, ...]] = {
    "2EM": ("3", "7", "8VH", "10VH", "13VH", "15", "15VH", "15VHI", "20VH"),
    "3EM": ("3", "7"),
    "2MU": ("4", "6", "10", "11", "14", "20"),
    "3MU": ("4", "6"),
    "4MU": ("4",),
    "2TAU": ("8", "12IM", "20IM"),
    "3J": ("15", "25.0ETA23", "40", "50"),
    "4J": ("15", "20", "15.0ETA25"),
    "5J": ("15.0ETA25",),
    "6J": ("15",),
}
_L1_COMBINED: tuple[str, ...] = (
    "L1_EM15VH_MU10", "L1_EM7_MU10", "L1_EM8VH_MU20", "L1_2EM8VH_MU10",
    "L1_EM15VH_2EM8VH_MU6", "L1_MU6_2MU4", "L1_MU11_2MU6", "L1_2MU6_3MU4",
    "L1_MU10_TAU12IM", "L1_MU10_TAU20IM", "L1_MU10_TAU12IM_XE35", "L1_MU10_TAU12IM_J25_2J12",
    "L1_EM15VHI_2TAU12IM", "L1_EM15VHI_2TAU12IM_XE35", "L1_EM15VHI_2TAU12IM_J25_3J12",
    "L1_TAU20IM_2TAU12IM", "L1_TAU20IM_2TAU12IM_J25_2J20_3J12", "L1_TAU20IM_2TAU12IM_XE35",
    "L1_TAU40_2TAU12IM_XE40", "L1_TAU60_2TAU40", "L1_J40_XE50", "L1_J40.0ETA25_XE50",
    "L1_J75_XE40", "L1_J75_XE50", "L1_2J15_XE55", "L1_J40.0ETA25_2J25_J20.31ETA49",
    "L1_J40.0ETA25_2J15.31ETA49", "L1_J75_3J20", "L1_J85_3J30", "L1_3J15.0ETA25_XE40",
    "L1_EM20VH_3EM10VH", "L1_EM15VH_3EM7", "L1_2EM15VH_3EM7", "L1_MU20_J40", "L1_MU10_2J20",
    "L1_EM13VH_3J20", "L1_MU10_3J20", "L1_MU20_XE30", "L1_EM22VHI_XE30", "L1_EM20VHI_TAU20IM",
)  # fmt: skip
_L1_TOPO: tuple[tuple[str, float], ...] = (
    ("L1_BPH-2M9-2MU4_BPH-0DR15-2MU4", 4e-3), ("L1_BPH-8M15-MU6MU4_BPH-0DR22-MU6MU4", 3e-3),
    ("L1_BPH-2M9-MU6MU4_BPH-0DR15-MU6MU4", 2e-3), ("L1_BPH-8M15-2MU6_BPH-0DR22-2MU6", 1e-3),
    ("L1_DR-TAU20ITAU12I", 6e-3), ("L1_DR-TAU20ITAU12I-J25", 4e-3),
    ("L1_DR-MU10TAU12I_TAU12I-J25", 2e-3), ("L1_DR-EM15TAU12I-J25", 2e-3),
    ("L1_HT150-J20.ETA31", 3e-3), ("L1_HT190-J15.ETA21", 5e-3), ("L1_HT190-J15s5.ETA21", 4e-3),
    ("L1_MJJ-100", 5e-2), ("L1_MJJ-200", 2e-2), ("L1_MJJ-300", 8e-3), ("L1_MJJ-400", 4e-3),
    ("L1_MJJ-500", 2e-3), ("L1_MJJ-700", 8e-4), ("L1_MJJ-800", 5e-4), ("L1_MJJ-900", 3e-4),
    ("L1_LFV-MU6", 1e-3), ("L1_LFV-MU11", 3e-4), ("L1_LFV-EM8I", 2e-3), ("L1_LFV-EM15I", 8e-4),
    ("L1_DY-DR-2MU4", 3e-3), ("L1_DY-BOX-2MU6", 1e-3), ("L1_J40_DPHI-J20XE50", 2e-3),
    ("L1_J40_DPHI-J20s2XE50", 1.5e-3), ("L1_KF-XE40", 1e-2), ("L1_KF-XE50", 4e-3),
    ("L1_KF-XE55", 2e-3), ("L1_KF-XE60", 1e-3), ("L1_KF-XE65", 6e-4), ("L1_KF-XE75", 2e-4),
    ("L1_10DR-MU20-MU6", 2e-4), ("L1_2MU4-B", 4e-3), ("L1_2MU6-B", 1.5e-3),
    ("L1_MU6MU4-BO", 2e-3), ("L1_W-05RO-XEHT-0", 3e-3), ("L1_W-90RO2-XEHT-0", 2e-3),
    ("L1_EM12_W-MT25", 1e-3), ("L1_EM15_W-MT35", 5e-4), ("L1_BTAG-MU4J15", 6e-3),
    ("L1_BTAG-MU6J20", 3e-3), ("L1_DPHI-AJ20s2XE50", 1.5e-3), ("L1_LLP-NOMATCH", 1e-4),
    ("L1_LATE-MU10_XE50", 2e-5), ("L1_LATE-MU10_J50", 1e-5),
)  # fmt: skip
# Minimum-bias and luminosity items fire in nearly every collision.
_L1_MISC: tuple[tuple[str, float], ...] = (
    ("L1_MBTS_1", 0.85), ("L1_MBTS_2", 0.75), ("L1_MBTS_1_1", 0.6), ("L1_LUCID", 0.4),
    ("L1_BCM_Wide", 2e-2), ("L1_RD0_FILLED", 2e-3), ("L1_ZB", 1e-4), ("L1_ALFA_ANY", 5e-5),
)  # fmt: skip
# Items the core HLT chains seed from, so they survive a narrow mask.
_L1_CORE: tuple[str, ...] = (
    "L1_EM22VHI", "L1_MU20", "L1_J100", "L1_XE50", "L1_TAU60", "L1_2EM15VH", "L1_2MU10",
    "L1_EM15VH_MU10", "L1_4J15", "L1_TAU20IM_2TAU12IM", "L1_XE55", "L1_2EM20VH", "L1_3J50",
    "L1_J40_XE50", "L1_MU4", "L1_EM3", "L1_J12", "L1_MBTS_1",
)  # fmt: skip


def _l1_catalogue() -> list[tuple[str, float]]:
    """Every L1 item the generator knows, most important first, with its rate."""
    items: dict[str, float] = {}
    for name in _L1_CORE:
        items.setdefault(name, dict(_L1_MISC).get(name) or _item_rate(name))
    singles = [f"L1_{obj}{thr}" for obj, thrs in _L1_SINGLES.items() for thr in thrs]
    multis = [f"L1_{obj}{thr}" for obj, thrs in _L1_MULTIS.items() for thr in thrs]
    systematic = [
        *(f"L1_EM{e}_MU{m}" for e in ("7", "8VH", "15VH", "20VH") for m in ("6", "10", "20")),
        *(f"L1_J{j}_XE{x}" for j in ("20", "40", "75") for x in ("40", "50", "60")),
        *(f"L1_MU{m}_J{j}" for m in ("4", "6", "10") for j in ("12", "20", "30", "40", "75")),
        *(f"L1_EM{e}_XE{x}" for e in ("15VHI", "18VHI", "20VHI") for x in ("30", "35", "40")),
    ]
    for name in singles + multis + list(_L1_COMBINED):
        items.setdefault(name, _item_rate(name))
    for name, rate in _L1_MISC + _L1_TOPO:
        items.setdefault(name, rate)
    for name in systematic:
        items.setdefault(name, _item_rate(name))
    return list(items.items())


@dataclass(frozen=True)
class _Chain:
    name: str
    seed: str  # L1 item name
    q: float  # pass probability given the seed after veto
    prescale: int  # HLT prescale in the first prescale set
    family: str


# How much of a physics stream each family of chains makes up.
_FAMILY_WEIGHT: dict[str, float] = {
    "core": 3.0,
    "electron": 2.0,
    "muon": 2.0,
    "photon": 1.0,
    "jet": 1.0,
    "multijet": 1.0,
    "bjet": 0.7,
    "tau": 1.0,
    "met": 1.0,
    "dilepton": 0.8,
    "bphys": 1.0,
    "combined": 0.6,
    "noalg": 0.05,
}


def _threshold(item: str) -> float:
    """The object threshold of an L1 item (``2EM15VH`` -> 15), or its first number."""
    match = _L1_FRAGMENT.fullmatch(item)
    if match is not None:
        return float(match[3])
    digits = re.search(r"\d+", item)
    return float(digits[0]) if digits else 1.0


def _turn_on(threshold: float, seed_threshold: float, slope: float = 2.5) -> float:
    """Fraction of seed-accepted events above an HLT threshold."""
    return min(1.0, float((seed_threshold / threshold) ** slope))


def _by_threshold(table: tuple[tuple[int, str], ...], threshold: int) -> str:
    """The item of the highest table threshold not above ``threshold``."""
    chosen = table[0][1]
    for limit, item in table:
        if threshold >= limit:
            chosen = item
    return chosen


# HLT threshold -> L1 seed: the highest row whose threshold the chain reaches.
_EM_SEEDS = (
    (0, "EM3"), (9, "EM7"), (12, "EM8VH"), (14, "EM12"), (17, "EM15"), (20, "EM15VH"),
    (24, "EM20VH"), (26, "EM22VHI"), (28, "EM24VHI"), (40, "EM22VHI"),
)  # fmt: skip
_MU_SEEDS = ((0, "MU4"), (8, "MU6"), (14, "MU10"), (18, "MU15"), (22, "MU20"))
_J_SEEDS = (
    (0, "J12"), (45, "J15"), (60, "J20"), (110, "J30"), (175, "J50"), (260, "J75"), (360, "J100"),
)  # fmt: skip
_TAU_SEEDS = ((0, "TAU8"), (25, "TAU12IM"), (35, "TAU20IM"), (80, "TAU40"), (125, "TAU60"))
_MUJET_SEEDS = ((0, "MU4_J12"), (35, "MU6_J20"), (85, "MU6_J40"), (150, "MU6_J75"))

# Thresholds in the order a menu adds them: physics thresholds before support ones.
_E_THRESHOLDS = (26, 24, 28, 60, 140, 17, 20, 120, 300, 15, 14, 12, 10, 9, 7, 5)
_G_THRESHOLDS = (140, 120, 200, 300, 60, 70, 80, 100, 160, 35, 40, 45, 50, 25, 20, 15, 10)
_MU_THRESHOLDS = (26, 24, 50, 60, 80, 20, 22, 28, 40, 18, 14, 11, 10, 8, 6, 4)
_J_THRESHOLDS = (
    420, 460, 380, 400, 440, 360, 340, 320, 300, 260, 200, 175, 150, 110, 85, 60, 45, 35, 25, 15,
)  # fmt: skip
_MULTIJET_THRESHOLDS = (100, 85, 110, 175, 225, 75, 70, 65, 60, 55, 50, 45, 35, 25)
_TAU_THRESHOLDS = (160, 125, 80, 50, 35, 25, 200, 0)
_XE_THRESHOLDS = (110, 100, 90, 120, 130, 80, 70, 60, 50, 35)

# Identification and isolation working points -> efficiency on seed-accepted events.
_E_IDS = {"lhvloose": 0.5, "lhloose": 0.35, "lhmedium": 0.2, "lhtight": 0.12}
_E_ISOS = {"": 1.0, "ivarloose": 0.7, "ivarmedium": 0.6, "ivartight": 0.5}
_G_IDS = {"loose": 0.6, "medium": 0.45, "tight": 0.3, "etcut": 0.9}
_MU_ISOS = {
    "": 1.0, "ivarmedium": 0.45, "iloose": 0.6, "ivarloose": 0.55, "imedium": 0.4,
    "msonly": 1.0, "0eta105_msonly": 0.5, "idperf": 0.9,
}  # fmt: skip
_J_VARIANTS = {
    "": 1.0, "_a10_lcw_subjes": 0.8, "_a10t_lcw_jes": 0.6, "_320eta490": 0.3, "_a10r": 0.8,
    "_jes": 1.0, "_nojcalib": 1.0, "_sub": 1.0,
}  # fmt: skip
_TAU_IDS = {"medium1": 0.25, "tight1": 0.15, "loose1": 0.35, "perf": 0.8, "idperf": 0.9}
_XE_ALGOS = {
    "_mht": 1.0, "_pufit": 0.8, "": 1.0, "_tc_lcw": 1.0, "_tc_em": 1.0, "_pueta": 0.9,
    "_cell": 1.0,
}  # fmt: skip
_BPHYS_TOPICS = {
    "bJpsimumu": 0.3, "bUpsimumu": 0.15, "bBmumu": 0.05, "bDimu": 0.5, "bBmumuxv2": 0.1,
    "bDimu_noL2": 0.5, "bJpsimumu_noL2": 0.3, "bBmumux_BsmumuPhi": 0.04, "bPhi": 0.05,
    "bTau": 0.02,
}  # fmt: skip
# B-physics leg combination -> (L1 seed, explicit L1 suffix of the chain name).
_BPHYS_LEGS = {
    "2mu4": ("2MU4", ""),
    "mu6_mu4": ("MU6_2MU4", ""),
    "2mu6": ("2MU6", ""),
    "2mu10": ("2MU10", ""),
    "mu11_mu6": ("MU11_2MU6", ""),
    "3mu4": ("3MU4", ""),
    "2mu4_topo": ("BPH-2M9-2MU4_BPH-0DR15-2MU4", "_L1BPH-2M9-2MU4_BPH-0DR15-2MU4"),
    "mu6_mu4_topo": (
        "BPH-8M15-MU6MU4_BPH-0DR22-MU6MU4",
        "_L1BPH-8M15-MU6MU4_BPH-0DR22-MU6MU4",
    ),
}
_DIMUONS = ((14, "2MU10"), (10, "2MU10"), (6, "2MU6"), (4, "2MU4"), (15, "2MU10"), (20, "2MU20"))
_DIELECTRONS = ((17, "2EM15VHI"), (12, "2EM10VH"), (24, "2EM20VH"), (15, "2EM13VH"))
_MULTIPHOTONS = (
    (2, 50, "2EM20VH"), (2, 22, "2EM15VH"), (2, 20, "2EM15VH"), (2, 25, "2EM20VH"),
    (2, 10, "2EM7"), (3, 20, "2EM15VH"), (3, 15, "2EM10VH"),
)  # fmt: skip
_DITAU_SEEDS = (
    "TAU20IM_2TAU12IM", "DR-TAU20ITAU12I", "DR-TAU20ITAU12I-J25",
    "TAU20IM_2TAU12IM_J25_2J20_3J12", "TAU40_2TAU12IM_XE40", "TAU60_2TAU40",
)  # fmt: skip
# Combined chains: (name, L1 seed, pass probability given the seed, prescale).
_COMBINED = (
    ("HLT_e17_lhloose_nod0_mu14", "L1_EM15VH_MU10", 0.3, 1),
    ("HLT_e7_lhmedium_nod0_mu24", "L1_MU20", 0.01, 1),
    ("HLT_e26_lhmedium_nod0_mu8noL1", "L1_EM22VHI", 0.01, 1),
    ("HLT_e24_lhmedium_nod0_L1EM20VHI_mu8noL1", "L1_EM20VHI", 0.01, 1),
    ("HLT_mu14_ivarloose_tau25_medium1_tracktwo", "L1_MU10_TAU12IM", 0.1, 1),
    ("HLT_mu14_ivarloose_tau35_medium1_tracktwo", "L1_MU10_TAU20IM", 0.1, 1),
    ("HLT_mu14_ivarloose_tau25_medium1_tracktwo_xe50", "L1_MU10_TAU12IM_XE35", 0.08, 1),
    ("HLT_e17_lhmedium_nod0_ivarloose_tau25_medium1_tracktwo", "L1_EM15VHI_2TAU12IM", 0.1, 1),
    ("HLT_e17_lhmedium_nod0_tau25_medium1_tracktwo_xe50", "L1_EM15VHI_2TAU12IM_XE35", 0.08, 1),
    ("HLT_e24_lhmedium_nod0_ivarloose_tau35_medium1_tracktwo", "L1_EM20VHI_TAU20IM", 0.1, 1),
    ("HLT_j80_xe80", "L1_J40_XE50", 0.3, 1),
    ("HLT_j100_xe80", "L1_J40_XE50", 0.25, 1),
    ("HLT_g45_tight_xe45_L1EM22VHI_XE30", "L1_EM22VHI_XE30", 0.05, 1),
    ("HLT_g70_loose_xe70noL1", "L1_EM22VHI", 0.02, 1),
    ("HLT_e5_lhtight_nod0_e4_etcut_Jpsiee", "L1_2EM3", 0.01, 20),
    ("HLT_e9_lhtight_nod0_e4_etcut_Jpsiee", "L1_EM7", 0.005, 20),
    ("HLT_2e12_lhloose_nod0_mu10", "L1_2EM8VH_MU10", 0.15, 1),
    ("HLT_e12_lhloose_nod0_2mu10", "L1_2MU10", 0.05, 1),
    ("HLT_g25_medium_mu24", "L1_MU20", 0.02, 1),
    ("HLT_g15_loose_2mu10_msonly", "L1_2MU10", 0.03, 1),
    ("HLT_mu26_ivarmedium_j150_boffperf_split_j35_boffperf_split", "L1_MU20", 0.01, 1),
    ("HLT_2j35_bmv2c2070_split_2j35_L14J15", "L1_4J15", 0.02, 1),
    ("HLT_j45_320eta490_j45_320eta490_L1J40.0ETA25_2J15.31ETA49", "L1_J40.0ETA25_2J15.31ETA49",
     0.2, 1),
    ("HLT_j70_j50_0eta490_invm1000j50_dphi24_xe90_pufit_xe50_L1MJJ-500", "L1_MJJ-500", 0.1, 1),
)  # fmt: skip


def _electron_chains() -> Iterator[_Chain]:
    for nod0 in ("_nod0", ""):
        for iso, iso_eff in _E_ISOS.items():
            for ident, id_eff in _E_IDS.items():
                for thr in _E_THRESHOLDS:
                    if iso and not 15 <= thr <= 28:
                        continue  # isolation only pays off for W/Z electrons
                    seed = _by_threshold(_EM_SEEDS, thr)
                    name = f"HLT_e{thr}_{ident}{nod0}" + (f"_{iso}" if iso else "")
                    q = _turn_on(thr, _threshold(seed)) * id_eff * iso_eff
                    prescale = 1 if thr >= 24 else (20 if thr >= 15 else 400)
                    yield _Chain(name, f"L1_{seed}", q, prescale, "electron")


def _photon_chains() -> Iterator[_Chain]:
    for ident, eff in _G_IDS.items():
        for thr in _G_THRESHOLDS:
            seed = _by_threshold(_EM_SEEDS, thr)
            prescale = 1 if thr >= 120 else (10 if thr >= 35 else 300)
            q = _turn_on(thr, _threshold(seed)) * eff
            yield _Chain(f"HLT_g{thr}_{ident}", f"L1_{seed}", q, prescale, "photon")
    for mult, thr, seed in _MULTIPHOTONS:
        for ident in ("loose", "tight", "medium"):
            q = min(1.0, _turn_on(thr, _threshold(seed)) * _G_IDS[ident] ** mult * 3)
            prescale = 1 if thr >= 20 else 10
            yield _Chain(f"HLT_{mult}g{thr}_{ident}", f"L1_{seed}", q, prescale, "photon")
    for lead, sub, ident in ((35, 25, "medium"), (35, 25, "loose"), (40, 30, "tight")):
        q = min(1.0, _turn_on(lead, 20) * _G_IDS[ident] ** 2 * 3)
        name = f"HLT_g{lead}_{ident}_g{sub}_{ident}_L12EM20VH"
        yield _Chain(name, "L1_2EM20VH", q, 1, "photon")


def _muon_chains() -> Iterator[_Chain]:
    for iso, eff in _MU_ISOS.items():
        for thr in _MU_THRESHOLDS:
            seed = _by_threshold(_MU_SEEDS, thr)
            name = f"HLT_mu{thr}" + (f"_{iso}" if iso else "")
            q = _turn_on(thr, _threshold(seed), 2.0) * eff
            unprescaled = thr >= 24 or (iso == "" and thr >= 50)
            prescale = 1 if unprescaled else (15 if thr >= 14 else 300)
            yield _Chain(name, f"L1_{seed}", q, prescale, "muon")


def _dilepton_chains() -> Iterator[_Chain]:
    for thr, seed in _DIMUONS:
        q = _turn_on(thr, _threshold(seed), 2.0)
        yield _Chain(f"HLT_2mu{thr}", f"L1_{seed}", q, 1, "dilepton")
    for lead in (22, 20, 18, 24, 26):
        # The second muon is found at the HLT without an L1 seed of its own.
        for sub in (8, 10):
            q = _turn_on(lead, 20, 2.0) * 0.15
            yield _Chain(f"HLT_mu{lead}_mu{sub}noL1", "L1_MU20", q, 1, "dilepton")
        q = _turn_on(lead, 20, 2.0) * 0.05
        yield _Chain(f"HLT_mu{lead}_2mu4noL1", "L1_MU20", q, 1, "dilepton")
    yield _Chain("HLT_3mu4", "L1_3MU4", 0.6, 1, "dilepton")
    yield _Chain("HLT_3mu6", "L1_3MU6", 0.6, 1, "dilepton")
    yield _Chain("HLT_4mu4", "L1_4MU4", 0.5, 1, "dilepton")
    for thr, seed in _DIELECTRONS:
        for ident in ("lhvloose", "lhloose", "lhmedium"):
            for nod0 in ("_nod0", ""):
                q = _turn_on(thr, _threshold(seed)) * 2 * _E_IDS[ident]
                name = f"HLT_2e{thr}_{ident}{nod0}_L1{seed}"
                yield _Chain(name, f"L1_{seed}", min(q, 1.0), 1, "dilepton")
    yield _Chain("HLT_e17_lhloose_nod0_2e9_lhloose_nod0", "L1_EM15VH_3EM7", 0.2, 1, "dilepton")


def _bphys_chains() -> Iterator[_Chain]:
    for topic, eff in _BPHYS_TOPICS.items():
        for legs, (seed, suffix) in _BPHYS_LEGS.items():
            name = f"HLT_{legs.removesuffix('_topo')}_{topic}{suffix}"
            prescale = 5 if legs == "2mu4" else 1
            yield _Chain(name, f"L1_{seed}", eff, prescale, "bphys")


def _jet_chains() -> Iterator[_Chain]:
    for variant, eff in _J_VARIANTS.items():
        for thr in _J_THRESHOLDS:
            if variant == "_320eta490":
                seed = "J75.31ETA49" if thr >= 200 else "J15.31ETA49"
            else:
                seed = _by_threshold(_J_SEEDS, thr)
            q = _turn_on(thr, _threshold(seed), 3.0) * eff
            unprescaled = thr >= 420 or (variant.startswith("_a10") and thr >= 400)
            prescale = 1 if unprescaled else (50 if thr >= 150 else 2000)
            yield _Chain(f"HLT_j{thr}{variant}", f"L1_{seed}", q, prescale, "jet")
    for thr in (1000, 850, 1100, 700, 1200, 550, 400):
        for seed in ("J100", "HT190-J15.ETA21", "J75"):
            q = _turn_on(thr, 4.0 * _threshold(seed) + 300, 3.0)
            prescale = 1 if thr >= 1000 else 10
            yield _Chain(f"HLT_ht{thr}_L1{seed}", f"L1_{seed}", q, prescale, "jet")


def _multijet_chains() -> Iterator[_Chain]:
    seeds = {2: "J75", 3: "3J50", 4: "3J50", 5: "4J15", 6: "4J15", 7: "4J15"}
    for mult, seed in seeds.items():
        for thr in _MULTIJET_THRESHOLDS:
            q = _turn_on(thr, 1.5 * _threshold(seed), 2.5) ** (0.5 + 0.15 * mult)
            prescale = 1 if thr * mult >= 350 else 20
            name = f"HLT_{mult}j{thr}"
            yield _Chain(name, f"L1_{seed}", q, prescale, "multijet")
            if mult >= 4:
                yield _Chain(f"{name}_0eta240", f"L1_{seed}", q * 0.7, prescale, "multijet")


def _bjet_chains() -> Iterator[_Chain]:
    for wp in (60, 70, 77, 85, 50, 40):
        for thr in (225, 175, 150, 300, 55, 35):
            seed = _by_threshold(_J_SEEDS, thr)
            # Looser working points (higher efficiency) keep more light jets.
            q = _turn_on(thr, _threshold(seed), 3.0) * (wp / 100.0) ** 3
            for split in ("_split", ""):
                name = f"HLT_j{thr}_bmv2c20{wp}{split}"
                yield _Chain(name, f"L1_{seed}", q, 1 if thr >= 225 else 10, "bjet")
        for thr in (35, 55, 70, 75):
            name = f"HLT_2j{thr}_bmv2c20{wp}_split_2j{thr}_L14J15.0ETA25"
            yield _Chain(name, "L1_4J15.0ETA25", 0.05 * (wp / 100.0) ** 3, 1, "bjet")


def _tau_chains() -> Iterator[_Chain]:
    for ident, eff in _TAU_IDS.items():
        for algo in ("tracktwo", "ptonly", "track"):
            for thr in _TAU_THRESHOLDS:
                seed = _by_threshold(_TAU_SEEDS, thr)
                q = _turn_on(max(thr, 10), _threshold(seed), 2.0) * eff
                prescale = 1 if thr >= 160 and ident not in ("perf", "idperf") else 30
                name = f"HLT_tau{thr}_{ident}_{algo}"
                yield _Chain(name, f"L1_{seed}", q, prescale, "tau")
    for lead, sub in ((35, 25), (40, 30), (80, 50), (35, 35)):
        for ident in ("medium1", "tight1"):
            for seed in _DITAU_SEEDS:
                name = f"HLT_tau{lead}_{ident}_tracktwo_tau{sub}_{ident}_tracktwo_L1{seed}"
                yield _Chain(name, f"L1_{seed}", _TAU_IDS[ident] ** 2 * 2.0, 1, "tau")


def _met_chains() -> Iterator[_Chain]:
    for algo, eff in _XE_ALGOS.items():
        for thr in _XE_THRESHOLDS:
            for seed_thr in (50, 55, 60, 70, 80, 35):
                if seed_thr > thr:
                    continue
                q = _turn_on(thr, seed_thr, 3.0) * eff
                prescale = 1 if thr >= 90 and seed_thr >= 50 else 50
                name = f"HLT_xe{thr}{algo}_L1XE{seed_thr}"
                yield _Chain(name, f"L1_XE{seed_thr}", q, prescale, "met")


def _combined_chains() -> Iterator[_Chain]:
    for name, seed, q, prescale in _COMBINED:
        yield _Chain(name, seed, q, prescale, "combined")
    for mu in (4, 6):
        for thr in (15, 25, 35, 55, 85, 110, 150, 175, 260, 320):
            seed = _by_threshold(_MUJET_SEEDS, thr)
            name = f"HLT_mu{mu}_j{thr}_gsc{thr + 10}_boffperf_split_dr05_dz02"
            yield _Chain(name, f"L1_{seed}", 0.1, 20, "combined")


def _noalg_chains(l1_items: list[str]) -> Iterator[_Chain]:
    for item in l1_items:
        yield _Chain(f"HLT_noalg_L1{item.removeprefix('L1_')}", item, 1.0, 5000, "noalg")


# Chains whose names the brief and the physics programme fix; they lead the menu.
_HLT_CORE: tuple[_Chain, ...] = tuple(
    _Chain(name, seed, q, prescale, "core")
    for name, seed, q, prescale in (
        ("HLT_e26_lhtight_nod0_ivarloose", "L1_EM22VHI", 0.35, 1),
        ("HLT_mu26_ivarmedium", "L1_MU20", 0.4, 1),
        ("HLT_j420", "L1_J100", 0.15, 1),
        ("HLT_xe110_mht_L1XE50", "L1_XE50", 0.2, 1),
        ("HLT_tau160_medium1_tracktwo", "L1_TAU60", 0.2, 1),
        ("HLT_e60_lhmedium_nod0", "L1_EM22VHI", 0.1, 1),
        ("HLT_e140_lhloose_nod0", "L1_EM22VHI", 0.03, 1),
        ("HLT_mu50", "L1_MU20", 0.1, 1),
        ("HLT_2mu14", "L1_2MU10", 0.4, 1),
        ("HLT_mu22_mu8noL1", "L1_MU20", 0.1, 1),
        ("HLT_2e17_lhvloose_nod0", "L1_2EM15VH", 0.3, 1),
        ("HLT_e17_lhloose_nod0_mu14", "L1_EM15VH_MU10", 0.3, 1),
        ("HLT_g140_loose", "L1_EM22VHI", 0.03, 1),
        ("HLT_g35_medium_g25_medium", "L1_2EM20VH", 0.2, 1),
        ("HLT_2g50_loose", "L1_2EM20VH", 0.05, 1),
        ("HLT_4j100", "L1_3J50", 0.1, 1),
        ("HLT_xe110_pufit_L1XE55", "L1_XE55", 0.2, 1),
        ("HLT_tau35_medium1_tracktwo_tau25_medium1_tracktwo", "L1_TAU20IM_2TAU12IM", 0.1, 1),
        ("HLT_j80_xe80", "L1_J40_XE50", 0.3, 1),
        ("HLT_j225_bmv2c2060_split", "L1_J100", 0.1, 1),
        # Support triggers: loose selections, heavily prescaled.
        ("HLT_mu4", "L1_MU4", 1.0, 500),
        ("HLT_e5_lhloose_nod0", "L1_EM3", 0.5, 1000),
        ("HLT_j15", "L1_J12", 1.0, 5000),
        ("HLT_noalg_mb_L1MBTS_1", "L1_MBTS_1", 1.0, 10000),
    )
)


def _hlt_catalogue(l1_items: list[str]) -> list[_Chain]:
    """Every HLT chain the generator knows, families interleaved, core chains first."""
    families = [
        _electron_chains(),
        _muon_chains(),
        _jet_chains(),
        _met_chains(),
        _tau_chains(),
        _photon_chains(),
        _multijet_chains(),
        _dilepton_chains(),
        _bjet_chains(),
        _bphys_chains(),
        _combined_chains(),
        _noalg_chains(l1_items),
    ]
    chains: dict[str, _Chain] = {chain.name: chain for chain in _HLT_CORE}
    # Round robin, so a narrow mask still holds every kind of physics.
    while families:
        for family in list(families):
            chain = next(family, None)
            if chain is None:
                families.remove(family)
            else:
                chains.setdefault(chain.name, chain)
    return list(chains.values())


@dataclass(frozen=True)
class _TriggerUniverse:
    """The union of all menus of a spec: every item with its bit, rate and lifetime.

    ``*_intro``/``*_retire`` are the first SMK index that has the trigger and the
    first one that no longer has it.
    """

    l1_names: tuple[str, ...]
    l1_bit: IntArray
    l1_rate: FloatArray
    l1_intro: IntArray
    l1_retire: IntArray
    hlt_names: tuple[str, ...]
    hlt_bit: IntArray
    hlt_seed: IntArray  # index into the l1 arrays
    hlt_q: FloatArray
    hlt_prescale: IntArray
    hlt_family: IntArray  # index into _FAMILY_WEIGHT
    hlt_intro: IntArray
    hlt_retire: IntArray
    l1_implies: BoolArray  # [a, b]: item a firing means item b fires (a lower threshold)
    l1_common: BoolArray  # drawn from template pools rather than per event
    l1_physics_seed: BoolArray  # seeds an unprescaled chain, so never prescaled itself

    def l1_active(self, smk_index: int) -> BoolArray:
        return (self.l1_intro <= smk_index) & (smk_index < self.l1_retire)

    def hlt_active(self, smk_index: int) -> BoolArray:
        return (
            (self.hlt_intro <= smk_index)
            & (smk_index < self.hlt_retire)
            & self.l1_active(smk_index)[self.hlt_seed]
        )


@dataclass(frozen=True)
class _Fragment:
    multiplicity: int
    obj: str
    threshold: int
    qualities: frozenset[str]
    eta: tuple[int, int]

    def covers(self, other: _Fragment) -> bool:
        """Whether this condition passing means ``other`` passes too."""
        return (
            self.obj == other.obj
            and other.multiplicity <= self.multiplicity
            and other.threshold <= self.threshold
            and other.qualities <= self.qualities
            and other.eta[0] <= self.eta[0]
            and self.eta[1] <= other.eta[1]
        )


def _fragments(name: str) -> list[_Fragment] | None:
    """The threshold conditions of an L1 item, or None for topological and other items."""
    fragments = []
    for part in name.removeprefix("L1_").split("_"):
        match = _L1_FRAGMENT.fullmatch(part)
        if match is None:
            return None
        # Jets without an eta range are central (|eta| < 3.1); the rest cover everything.
        default_eta = (0, 31) if match[2] == "J" else (0, 49)
        eta = (int(match[5]), int(match[6])) if match[5] is not None else default_eta
        fragments.append(
            _Fragment(int(match[1] or 1), match[2], int(match[3]), frozenset(match[4]), eta)
        )
    return fragments


def _implications(names: list[str]) -> BoolArray:
    """``[a, b]`` is true when every condition of item b is met whenever item a fires."""
    parsed = [_fragments(name) for name in names]
    implies = np.eye(len(names), dtype=np.bool_)
    for a, fragments_a in enumerate(parsed):
        for b, fragments_b in enumerate(parsed):
            if fragments_a is not None and fragments_b is not None:
                implies[a, b] |= all(any(fa.covers(fb) for fa in fragments_a) for fb in fragments_b)
    return implies


def _lifetimes(rng: np.random.Generator, count: int, core: int) -> tuple[IntArray, IntArray]:
    # Most triggers live in every menu; some arrive in a later SMK, some are retired.
    intro = np.where(rng.random(count) < 0.06, rng.integers(1, 6, count), 0)
    retire = np.where(rng.random(count) < 0.05, intro + rng.integers(1, 8, count), 2**31)
    intro[:core] = 0
    retire[:core] = 2**31
    return intro.astype(np.int64), retire.astype(np.int64)


@functools.lru_cache(maxsize=16)
def _trigger_universe(seed: int, l1_bits: int, hlt_bits: int) -> _TriggerUniverse:
    rng = np.random.default_rng([seed, _RNG_CATALOGUE])
    l1 = _l1_catalogue()[: int(l1_bits * _MENU_FILL)]
    l1_names = [name for name, _ in l1]
    l1_index = {name: i for i, name in enumerate(l1_names)}
    # Rates jitter per seed, so two seeds give two different (but alike) menus.
    jitter = np.exp(rng.normal(0.0, 0.25, len(l1)))
    l1_rate = np.clip(np.array([rate for _, rate in l1]) * jitter, 5e-6, 0.95)
    l1_bit = rng.permutation(l1_bits)[: len(l1)].astype(np.int64)
    l1_intro, l1_retire = _lifetimes(rng, len(l1), len(_L1_CORE))

    chains = [c for c in _hlt_catalogue(l1_names) if c.seed in l1_index]
    chains = chains[: int(hlt_bits * _MENU_FILL)]
    # Seeds of unprescaled chains record most events, so they sit in the templates.
    l1_physics_seed = np.zeros(len(l1), dtype=np.bool_)
    l1_physics_seed[[l1_index[c.seed] for c in chains if c.prescale == 1]] = True
    families = list(_FAMILY_WEIGHT)
    n_core = sum(1 for c in chains if c.family == "core")
    q_jitter = np.exp(rng.normal(0.0, 0.2, len(chains)))
    hlt_intro, hlt_retire = _lifetimes(rng, len(chains), n_core)
    return _TriggerUniverse(
        l1_names=tuple(l1_names),
        l1_bit=l1_bit,
        l1_rate=l1_rate,
        l1_intro=l1_intro,
        l1_retire=l1_retire,
        hlt_names=tuple(c.name for c in chains),
        hlt_bit=rng.permutation(hlt_bits)[: len(chains)].astype(np.int64),
        hlt_seed=np.array([l1_index[c.seed] for c in chains], dtype=np.int64),
        hlt_q=np.clip(np.array([c.q for c in chains]) * q_jitter, 1e-4, 1.0),
        hlt_prescale=np.array([c.prescale for c in chains], dtype=np.int64),
        hlt_family=np.array([families.index(c.family) for c in chains], dtype=np.int64),
        hlt_intro=hlt_intro,
        hlt_retire=hlt_retire,
        l1_implies=_implications(l1_names),
        l1_common=(l1_rate >= _RARE) | l1_physics_seed,
        l1_physics_seed=l1_physics_seed,
    )


@dataclass(frozen=True)
class _Schedule:
    smk_values: tuple[int, ...]  # SMK of each SMK index
    run_smk_index: tuple[int, ...]  # SMK index of each run of the spec


@functools.lru_cache(maxsize=64)
def _schedule(seed: int, runs: int) -> _Schedule:
    # Separate streams, so adding runs to a spec never changes the earlier runs' keys.
    lengths = np.random.default_rng([seed, _RNG_SCHEDULE, 0]).integers(2, 5, size=runs)
    run_smk = np.repeat(np.arange(runs), lengths)[:runs]
    smk_count = int(run_smk[-1]) + 1
    increments = np.random.default_rng([seed, _RNG_SCHEDULE, 1]).integers(3, 40, size=smk_count)
    smk_values = 2100 + np.cumsum(increments)
    return _Schedule(tuple(int(v) for v in smk_values), tuple(int(i) for i in run_smk))


def _run_index(spec: GeneratorSpec, run_number: int) -> int:
    if run_number not in spec.run_numbers:
        raise ValueError(
            f"run {run_number} is not generated by this spec "
            f"(runs {spec.first_run}..{spec.first_run + spec.runs - 1})"
        )
    return run_number - spec.first_run


def generate_menus(spec: GeneratorSpec) -> list[TriggerMenu]:
    """The L1 and HLT menu of every SMK the spec's runs use, by key then level."""
    universe = _trigger_universe(spec.seed, spec.l1_bits, spec.hlt_bits)
    schedule = _schedule(spec.seed, spec.runs)
    menus = []
    for smk_index, smk in enumerate(schedule.smk_values):
        l1 = universe.l1_active(smk_index)
        hlt = universe.hlt_active(smk_index)
        l1_bits = {int(universe.l1_bit[i]): universe.l1_names[i] for i in np.flatnonzero(l1)}
        hlt_bits = {int(universe.hlt_bit[i]): universe.hlt_names[i] for i in np.flatnonzero(hlt)}
        menus.append(TriggerMenu(key=smk, level="L1", bits=dict(sorted(l1_bits.items()))))
        menus.append(TriggerMenu(key=smk, level="HLT", bits=dict(sorted(hlt_bits.items()))))
    return menus


def hlt_seeds(spec: GeneratorSpec) -> dict[int, dict[str, str]]:
    """For every SMK, the L1 item that seeds each HLT chain of its menu."""
    universe = _trigger_universe(spec.seed, spec.l1_bits, spec.hlt_bits)
    schedule = _schedule(spec.seed, spec.runs)
    return {
        smk: {
            universe.hlt_names[i]: universe.l1_names[universe.hlt_seed[i]]
            for i in np.flatnonzero(universe.hlt_active(smk_index))
        }
        for smk_index, smk in enumerate(schedule.smk_values)
    }


def dataset_specs(spec: GeneratorSpec) -> list[Dataset]:
    """Every dataset of every run, with its upstream dataset, run by run."""
    by_key = {p.key: p for p in spec.processings}
    datasets = []
    for run_number in spec.run_numbers:
        for processing in spec.processings:
            upstream = by_key[processing.upstream] if processing.upstream else None
            attributes = {
                "run_number": str(run_number),
                "prodstep": processing.prodstep,
                "data_type": processing.format,
            }
            if processing.keep_fraction < 1.0:
                attributes["keep_fraction"] = repr(processing.keep_fraction)
            datasets.append(
                Dataset(
                    name=spec.dataset_name(run_number, processing),
                    collection=spec.collection,
                    format=processing.format,
                    processing_tag=processing.tag,
                    project=spec.project,
                    stream=spec.stream,
                    upstream=spec.dataset_name(run_number, upstream) if upstream else None,
                    attributes=attributes,
                )
            )
    return datasets


# --------------------------------------------------------------------------
# Template pools: the common trigger patterns of one (SMK, prescale set)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pool:
    tbp: ByteArray  # (size, l1_bits / 8)
    tap: ByteArray
    tav: ByteArray
    hlt: ByteArray  # (size, hlt_bits / 8)
    tav_offsets: IntArray  # CSR by L1 bit: templates whose after-veto mask has the bit
    tav_templates: IntArray
    overlay_chains: IntArray  # chains too rare for the pool but seeded by a pool item
    overlay_rates: FloatArray  # their per-event rate


def _pool_size(spec: GeneratorSpec) -> int:
    size = 1 << max(0, math.ceil(math.log2(spec.events_per_run)))
    return min(_POOL_MAX, max(_POOL_MIN, size))


def _hlt_pass_probability(universe: _TriggerUniverse, prescale_set: int) -> FloatArray:
    prescale = np.maximum(1, universe.hlt_prescale >> prescale_set)
    probability: FloatArray = universe.hlt_q / prescale
    return probability


def _pack_items(flags: BoolArray, bits: IntArray, width: int) -> ByteArray:
    """Item-major flags (items, templates) as template-major masks (templates, width / 8)."""
    packed = np.zeros((width // 8, flags.shape[1]), dtype=np.uint8)
    for item, bit in enumerate(bits.tolist()):
        packed[bit >> 3] |= flags[item].view(np.uint8) << np.uint8(bit & 7)
    return np.ascontiguousarray(packed.T)


def _menu_epoch(universe: _TriggerUniverse, smk_index: int) -> int:
    """The first SMK index whose menus equal this one's: equal menus share pools."""
    l1, hlt = universe.l1_active(smk_index), universe.hlt_active(smk_index)
    for earlier in range(smk_index):
        if (universe.l1_active(earlier) == l1).all() and (
            universe.hlt_active(earlier) == hlt
        ).all():
            return earlier
    return smk_index


def _primary_weights(universe: _TriggerUniverse, chains: IntArray) -> FloatArray:
    """How often each chain is the one that recorded an event: each family gets its
    share of the stream, split among its chains with looser chains taking more."""
    family = universe.hlt_family[chains]
    share = np.sqrt(universe.hlt_q[chains])
    family_total = np.bincount(family, weights=share, minlength=len(_FAMILY_WEIGHT))
    family_weight = np.array(list(_FAMILY_WEIGHT.values()))
    weight: FloatArray = family_weight[family] * share / family_total[family]
    normalised: FloatArray = weight / weight.sum()
    return normalised


@functools.lru_cache(maxsize=16)
def _pool(spec: GeneratorSpec, menu_epoch: int, prescale_set: int) -> _Pool:
    universe = _trigger_universe(spec.seed, spec.l1_bits, spec.hlt_bits)
    rng = np.random.default_rng([spec.seed, _RNG_POOL, menu_epoch, prescale_set])
    size = _pool_size(spec)
    templates = np.arange(size)

    # Item-major (items, templates) flags keep every per-item operation contiguous.
    common = np.flatnonzero(universe.l1_active(menu_epoch) & universe.l1_common)
    column_of = np.full(len(universe.l1_names), -1, dtype=np.int64)
    column_of[common] = np.arange(len(common))
    q = _hlt_pass_probability(universe, prescale_set)
    seeded = universe.hlt_active(menu_epoch) & (column_of[universe.hlt_seed] >= 0)
    unprescaled = seeded & (np.maximum(1, universe.hlt_prescale >> prescale_set) == 1)
    candidates = np.flatnonzero(unprescaled)
    if len(candidates) == 0:
        raise ValueError("the menu is too narrow: no unprescaled HLT chain to record events")

    # The chain that recorded the event passed, and so did its seed.
    weights = _primary_weights(universe, candidates)
    primary = candidates[rng.choice(len(candidates), size=size, p=weights)]
    primary_seed = column_of[universe.hlt_seed[primary]]
    shape = (len(common), size)
    tbp = rng.random(shape, dtype=np.float32) < universe.l1_rate[common, None]
    tbp[primary_seed, templates] = True
    # Thresholds nest: an item firing fires every looser item of the same objects
    # (implication is transitive, so one pass over the pairs closes the set).
    implies = universe.l1_implies[np.ix_(common, common)] & ~np.eye(len(common), dtype=np.bool_)
    for source, target in zip(*(a.tolist() for a in np.nonzero(implies)), strict=True):
        tbp[target] |= tbp[source]
    # Physics seeds run unprescaled; busier items are prescaled to a target rate,
    # less as the prescale sets relax.
    prescale = np.maximum(1, np.rint(tbp.mean(axis=1) / _L1_TAP_TARGET)).astype(np.int64)
    prescale[universe.l1_physics_seed[common]] = 1
    keep = 1.0 / np.maximum(1, prescale >> prescale_set)
    tap = tbp & (rng.random(shape, dtype=np.float32) < keep[:, None])
    tav = tap & (rng.random(shape, dtype=np.float32) >= _VETO)
    tap[primary_seed, templates] = True
    tav[primary_seed, templates] = True
    with_seed = [np.flatnonzero(row) for row in tav]

    seed_fraction = np.zeros(len(universe.hlt_names))
    seed_fraction[seeded] = tav.mean(axis=1)[column_of[universe.hlt_seed[seeded]]]
    in_pool = unprescaled | (seeded & (q * seed_fraction >= _RARE))
    overlay = np.flatnonzero(seeded & ~in_pool)

    # Each pool chain runs on the templates where its seed passed after veto.
    by_primary = np.argsort(primary, kind="stable")
    primary_sorted = primary[by_primary]
    hlt = np.zeros((spec.hlt_bits // 8, size), dtype=np.uint8)
    for chain in np.flatnonzero(in_pool).tolist():
        candidates_of_chain = with_seed[column_of[universe.hlt_seed[chain]]]
        draw = rng.random(len(candidates_of_chain), dtype=np.float32)
        first, last = np.searchsorted(primary_sorted, [chain, chain + 1])
        passed = np.concatenate([candidates_of_chain[draw < q[chain]], by_primary[first:last]])
        bit = int(universe.hlt_bit[chain])
        hlt[bit >> 3, passed] |= np.uint8(1 << (bit & 7))

    # Templates by after-veto bit, for rare chains that must land on an event with their seed.
    bits = universe.l1_bit[common]
    counts = np.zeros(spec.l1_bits, dtype=np.int64)
    counts[bits] = [len(rows) for rows in with_seed]
    by_bit = np.argsort(bits)
    return _Pool(
        tbp=_pack_items(tbp, bits, spec.l1_bits),
        tap=_pack_items(tap, bits, spec.l1_bits),
        tav=_pack_items(tav, bits, spec.l1_bits),
        hlt=np.ascontiguousarray(hlt.T),
        tav_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        tav_templates=np.concatenate([with_seed[i] for i in by_bit]).astype(np.int64),
        overlay_chains=overlay.astype(np.int64),
        overlay_rates=q[overlay] * seed_fraction[overlay],
    )


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunEvents:
    """Event-level columns of one run, in (run, event) order, plus its structure."""

    run_number: int
    lb_index: IntArray  # per event: index of its lumiblock in lb_counts
    lb_counts: IntArray
    columns: dict[str, npt.NDArray[Any]]
    segment_bounds: IntArray  # event index where each prescale set starts, plus n
    smk_index: int

    @property
    def size(self) -> int:
        return len(self.lb_index)


def _run_size(spec: GeneratorSpec, rng: np.random.Generator) -> int:
    if spec.exact:
        return spec.events_per_run
    low = max(1, round(spec.events_per_run * (1 - RUN_SIZE_SPREAD)))
    high = max(low, round(spec.events_per_run * (1 + RUN_SIZE_SPREAD)))
    return int(rng.integers(low, high + 1))


def _lumiblock_limits(spec: GeneratorSpec) -> tuple[int, int]:
    low = max(1, math.floor(spec.events_per_lumiblock * LUMIBLOCK_SPREAD[0]))
    high = max(low, math.floor(spec.events_per_lumiblock * LUMIBLOCK_SPREAD[1]))
    return low, high


def _run_spacing(spec: GeneratorSpec) -> int:
    """Seconds between the starts of consecutive runs: longer than any run lasts."""
    most_events = math.ceil(spec.events_per_run * (1 + RUN_SIZE_SPREAD))
    most_lumiblocks = 2 * (most_events // _lumiblock_limits(spec)[0] + 1) + 8
    longest = most_lumiblocks * LUMIBLOCK_SECONDS[1]
    return int(math.ceil((longest + 1800) / 3600) * 3600)


def _filled_bunches(rng: np.random.Generator) -> IntArray:
    # A 25 ns filling scheme: equal bunch trains separated by injection gaps,
    # nothing in the abort gap at the end of the orbit.
    train = int(rng.choice([12, 36, 48, 72, 144]))
    gap = int(rng.choice([8, 31, 38, 39]))
    first = BCID_MIN + int(rng.integers(0, 40))
    fits = (BCID_MAX - ABORT_GAP_BUNCHES - first) // (train + gap)
    trains = max(1, min(fits, int(rng.integers(4, 40))))
    starts = first + np.arange(trains) * (train + gap)
    return (starts[:, None] + np.arange(train)[None, :]).ravel().astype(np.int64)


def _increasing(rng: np.random.Generator, n: int, start: int, mean_gap: int) -> IntArray:
    """``start`` plus a cumulative sum of gaps uniform in [1, 2 * mean_gap - 1]."""
    span = 2 * max(1, mean_gap) - 1
    gaps = 1 + (rng.random(n) * span).astype(np.int64)
    return start + np.cumsum(gaps)


def _run_events(spec: GeneratorSpec, run_number: int) -> _RunEvents:
    run_index = _run_index(spec, run_number)
    rng = np.random.default_rng([spec.seed, run_number, _RNG_LAYOUT])
    n = _run_size(spec, rng)

    low, high = _lumiblock_limits(spec)
    sizes = rng.integers(low, high + 1, size=n // low + 2)
    ends = np.cumsum(sizes)
    nlb = int(np.searchsorted(ends, n)) + 1
    lb_counts = sizes[:nlb].astype(np.int64)
    lb_counts[-1] = n - (int(ends[nlb - 2]) if nlb > 1 else 0)
    lb_first = np.cumsum(lb_counts) - lb_counts
    lb_index = np.repeat(np.arange(nlb), lb_counts)

    # Physics starts a few lumiblocks into the run; now and then a lumiblock
    # has no events in the stream (busy, a detector recovering).
    steps = 1 + np.where(rng.random(nlb) < 0.05, rng.integers(1, 4, nlb), 0)
    steps[0] = 1 + int(rng.integers(0, 4))
    lb_numbers = np.cumsum(steps)
    durations = (rng.uniform(*LUMIBLOCK_SECONDS, size=int(lb_numbers[-1]) + 1) * 1e9).astype(
        np.int64
    )
    lb_start_ns = np.concatenate([[0], np.cumsum(durations)])[lb_numbers]
    lb_duration_ns = durations[lb_numbers]

    rank = np.arange(n) - lb_first[lb_index]
    # Stratified draws keep times sorted inside a lumiblock without a sort.
    fraction = (rank + rng.random(n)) / lb_counts[lb_index]
    offset_ns = lb_start_ns[lb_index] + (lb_duration_ns[lb_index] * fraction).astype(np.int64)
    run_start = RUN_EPOCH + run_index * _run_spacing(spec)

    filled = _filled_bunches(rng)
    bcid = filled[(rng.random(n) * len(filled)).astype(np.int64)]

    mean_gap = min(100, 2**31 // n)
    if spec.large_event_numbers and run_index % 2 == 0:
        # The run crosses 2**32 half-way, so truncation to 32 bits shows at once.
        first_event = 2**32 - (n // 2) * mean_gap
    else:
        first_event = int(rng.integers(1_000, 200_000))
    event_number = _increasing(rng, n, first_event, mean_gap)
    lvl1_id = _increasing(rng, n, 0, min(60, 2**31 // n))

    # Prescale sets change at lumiblock boundaries, looser as the luminosity falls.
    schedule = _schedule(spec.seed, spec.runs)
    smk_index = schedule.run_smk_index[run_index]
    sets = 1 + int(rng.integers(0, min(PRESCALE_SETS, nlb)))
    cut_lbs = np.sort(rng.choice(np.arange(1, nlb), size=sets - 1, replace=False))
    segment_bounds = np.concatenate([[0], lb_first[cut_lbs], [n]]).astype(np.int64)
    segment = np.repeat(np.arange(sets), np.diff(segment_bounds))

    zeros_u32 = np.zeros(n, dtype=np.uint32)
    false = np.zeros(n, dtype=np.bool_)
    columns: dict[str, npt.NDArray[Any]] = {
        "run_number": np.full(n, run_number, dtype=np.uint32),
        "event_number": event_number.astype(np.uint64),
        "lumi_block": lb_numbers[lb_index].astype(np.uint32),
        "timestamp": (run_start + offset_ns // 1_000_000_000).astype(np.uint32),
        "timestamp_ns": (offset_ns % 1_000_000_000).astype(np.uint32),
        "bcid": bcid.astype(np.uint16),
        "lvl1_id": lvl1_id.astype(np.uint32),
        "is_simulation": false,
        "is_calibration": false,
        "is_testbeam": false,
        "mc_channel_number": zeros_u32,
        "mc_event_weight": np.zeros(n, dtype=np.float32),
        "smk": np.full(n, schedule.smk_values[smk_index], dtype=np.uint32),
        "l1psk": (L1PSK_BASE + PRESCALE_SETS * smk_index + segment).astype(np.uint32),
        "hltpsk": (HLTPSK_BASE + PRESCALE_SETS * smk_index + segment).astype(np.uint32),
    }
    return _RunEvents(run_number, lb_index, lb_counts, columns, segment_bounds, smk_index)


@dataclass(frozen=True)
class _Masks:
    l1_tbp: ByteArray
    l1_tap: ByteArray
    l1_tav: ByteArray
    hlt_passed: ByteArray


def _set_bits(mask: ByteArray, events: IntArray, bits: IntArray) -> None:
    flat = mask.reshape(-1)
    index = events * mask.shape[1] + (bits >> 3)
    np.bitwise_or.at(flat, index, np.left_shift(1, bits & 7).astype(np.uint8))


def _ranges(starts: IntArray, lengths: IntArray) -> IntArray:
    """Concatenated ``arange(start, start + length)`` for every pair."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    run_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - run_starts, lengths) + np.arange(total)


def _run_masks(spec: GeneratorSpec, events: _RunEvents) -> _Masks:
    universe = _trigger_universe(spec.seed, spec.l1_bits, spec.hlt_bits)
    rng = np.random.default_rng([spec.seed, events.run_number, _RNG_TRIGGERS])
    n = events.size
    epoch = _menu_epoch(universe, events.smk_index)
    pools = [_pool(spec, epoch, j) for j in range(len(events.segment_bounds) - 1)]
    size = _pool_size(spec)
    template = (rng.random(n) * size).astype(np.int64)
    bounds = events.segment_bounds

    # Rare chains seeded by common items: pick the events, then give each one a
    # template whose after-veto mask holds the seed.
    forced_events, forced_chains = [], []
    for j, pool in enumerate(pools):
        lo, hi = int(bounds[j]), int(bounds[j + 1])
        counts = rng.binomial(hi - lo, pool.overlay_rates)
        chains = np.repeat(pool.overlay_chains, counts)
        chosen = lo + (rng.random(len(chains)) * (hi - lo)).astype(np.int64)
        seed_bits = universe.l1_bit[universe.hlt_seed[chains]]
        start = pool.tav_offsets[seed_bits]
        width = pool.tav_offsets[seed_bits + 1] - start
        pick = start + (rng.random(len(chains)) * width).astype(np.int64)
        template[chosen] = pool.tav_templates[pick]
        forced_events.append(chosen)
        forced_chains.append(chains)

    l1_width, hlt_width = spec.l1_bits // 8, spec.hlt_bits // 8
    masks = _Masks(
        l1_tbp=np.empty((n, l1_width), dtype=np.uint8),
        l1_tap=np.empty((n, l1_width), dtype=np.uint8),
        l1_tav=np.empty((n, l1_width), dtype=np.uint8),
        hlt_passed=np.empty((n, hlt_width), dtype=np.uint8),
    )
    for j, pool in enumerate(pools):
        lo, hi = int(bounds[j]), int(bounds[j + 1])
        rows = template[lo:hi]
        np.take(pool.tbp, rows, axis=0, mode="clip", out=masks.l1_tbp[lo:hi])
        np.take(pool.tap, rows, axis=0, mode="clip", out=masks.l1_tap[lo:hi])
        np.take(pool.tav, rows, axis=0, mode="clip", out=masks.l1_tav[lo:hi])
        np.take(pool.hlt, rows, axis=0, mode="clip", out=masks.hlt_passed[lo:hi])

    # A later forced template may have replaced an earlier one: keep only the
    # rare chains whose seed the final template still has.
    chosen = np.concatenate(forced_events).astype(np.int64)
    chains = np.concatenate(forced_chains).astype(np.int64)
    seed_bits = universe.l1_bit[universe.hlt_seed[chains]]
    has_seed = (masks.l1_tav[chosen, seed_bits >> 3] >> (seed_bits & 7)) & 1
    hlt_events = [chosen[has_seed == 1]]
    hlt_chains = [chains[has_seed == 1]]

    # Rare L1 items are unprescaled and independent of the rest of the event;
    # looser items they imply fire too (before prescale).
    active_l1 = universe.l1_active(events.smk_index)
    rare = np.flatnonzero(active_l1 & ~universe.l1_common)
    items = np.repeat(rare, rng.binomial(n, universe.l1_rate[rare]))
    item_events = (rng.random(len(items)) * n).astype(np.int64)
    implied_item, implied = np.nonzero(universe.l1_implies[items] & active_l1)
    _set_bits(masks.l1_tbp, item_events[implied_item], universe.l1_bit[implied])
    _set_bits(masks.l1_tap, item_events, universe.l1_bit[items])
    after_veto = rng.random(len(items)) >= _VETO
    items, item_events = items[after_veto], item_events[after_veto]
    _set_bits(masks.l1_tav, item_events, universe.l1_bit[items])

    # Chains seeded by rare items run on the events where their seed passed.
    active = np.flatnonzero(universe.hlt_active(events.smk_index))
    rare_seeded = active[np.isin(universe.hlt_seed[active], rare)]
    order = np.argsort(items, kind="stable")
    items, item_events = items[order], item_events[order]
    first = np.searchsorted(items, universe.hlt_seed[rare_seeded], side="left")
    last = np.searchsorted(items, universe.hlt_seed[rare_seeded], side="right")
    candidates = _ranges(first, last - first)
    chain_of = np.repeat(rare_seeded, last - first)
    candidate_events = item_events[candidates]
    segment = np.searchsorted(bounds, candidate_events, side="right") - 1
    q = np.stack([_hlt_pass_probability(universe, j) for j in range(len(pools))])
    passed = rng.random(len(candidates)) < q[segment, chain_of]
    hlt_events.append(candidate_events[passed])
    hlt_chains.append(chain_of[passed])

    _set_bits(
        masks.hlt_passed,
        np.concatenate(hlt_events),
        universe.hlt_bit[np.concatenate(hlt_chains)],
    )
    return masks


# --------------------------------------------------------------------------
# Files, GUIDs, references
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileLayout:
    """Where each event of the run sits in one processing's files (-1: absent)."""

    file: IntArray
    position: IntArray
    order: IntArray  # rank of the event in the processing's file order
    file_counts: IntArray
    guids: ByteArray  # (files, 36) ASCII


def _guids(rng: np.random.Generator, count: int) -> ByteArray:
    raw = rng.integers(0, 256, size=(count, 16), dtype=np.uint8)
    text = "".join(str(uuid.UUID(bytes=row.tobytes(), version=4)) for row in raw)
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).reshape(count, 36)


def _compress_files(file: IntArray, count: int) -> tuple[IntArray, IntArray]:
    """Renumber files so none is empty; returns new file ids and their sizes."""
    sizes = np.bincount(file, minlength=count)
    new_id = np.cumsum(sizes > 0) - 1
    return new_id[file], sizes[sizes > 0]


def _positions(file: IntArray, file_counts: IntArray) -> tuple[IntArray, IntArray]:
    """Entry of each event in its file (events keep run order inside a file)."""
    order = np.argsort(file, kind="stable")
    file_start = np.cumsum(file_counts) - file_counts
    position = np.empty(len(file), dtype=np.int64)
    position[order] = np.arange(len(file)) - file_start[file[order]]
    return position, file_start[file] + position


def _raw_layout(
    processing: Processing, events: _RunEvents, rng: np.random.Generator
) -> _FileLayout:
    # A lumiblock's events go to a few files at once (one per SFO), interleaved.
    per_lb = np.maximum(1, np.rint(events.lb_counts / processing.events_per_file)).astype(np.int64)
    first_file = np.cumsum(per_lb) - per_lb
    within = (rng.random(events.size) * per_lb[events.lb_index]).astype(np.int64)
    file, file_counts = _compress_files(first_file[events.lb_index] + within, int(per_lb.sum()))
    position, order = _positions(file, file_counts)
    return _FileLayout(file, position, order, file_counts, _guids(rng, len(file_counts)))


def _derived_layout(
    processing: Processing, upstream: _FileLayout, rng: np.random.Generator
) -> _FileLayout:
    n = len(upstream.file)
    present = upstream.file >= 0
    if processing.keep_fraction < 1.0:
        keep = present & (rng.random(n) < processing.keep_fraction)
        # The output reads its input files in turn: rank the kept events in upstream order.
        by_order = np.empty(int(present.sum()), dtype=np.int64)
        by_order[upstream.order[present]] = np.flatnonzero(present)
        kept_in_order = keep[by_order]
        order = np.full(n, -1, dtype=np.int64)
        order[by_order[kept_in_order]] = np.arange(int(kept_in_order.sum()))
        kept_per_input = np.bincount(upstream.file[keep], minlength=len(upstream.file_counts))
    else:
        keep, order, kept_per_input = present, upstream.order, upstream.file_counts

    # A job merges whole upstream files until it has about events_per_file.
    target = processing.events_per_file * rng.uniform(0.8, 1.2)
    group = ((np.cumsum(kept_per_input) - kept_per_input) // target).astype(np.int64)
    group_sizes = np.bincount(group, weights=kept_per_input).astype(np.int64)
    file_of_input = (np.cumsum(group_sizes > 0) - 1)[group]
    file_counts = group_sizes[group_sizes > 0]
    file_start = np.cumsum(file_counts) - file_counts

    if keep.all():
        file = file_of_input[upstream.file]
        position = order - file_start[file]
    else:
        file = np.full(n, -1, dtype=np.int64)
        file[keep] = file_of_input[upstream.file[keep]]
        position = np.full(n, -1, dtype=np.int64)
        position[keep] = order[keep] - file_start[file[keep]]
    return _FileLayout(file, position, order, file_counts, _guids(rng, len(file_counts)))


def _layouts(spec: GeneratorSpec, events: _RunEvents) -> dict[str, _FileLayout]:
    layouts: dict[str, _FileLayout] = {}
    for index, processing in enumerate(spec.processings):
        rng = np.random.default_rng([spec.seed, events.run_number, _RNG_FILES, index])
        if processing.upstream is None:
            layouts[processing.key] = _raw_layout(processing, events, rng)
        else:
            layouts[processing.key] = _derived_layout(processing, layouts[processing.upstream], rng)
    return layouts


def _chain_of(spec: GeneratorSpec, processing: Processing) -> list[Processing]:
    by_key = {p.key: p for p in spec.processings}
    chain = [processing]
    while chain[-1].upstream is not None:
        chain.append(by_key[chain[-1].upstream])
    return chain[::-1]


# --------------------------------------------------------------------------
# Arrow assembly
# --------------------------------------------------------------------------


def _offsets(count: int, width: int) -> pa.Buffer:
    return pa.py_buffer(np.arange(0, (count + 1) * width, width, dtype=np.int32))


def _fixed_width_binary(values: ByteArray, dtype: pa.DataType) -> pa.Array:
    """A ``binary``/``string`` array of equal-width values from an (n, width) byte matrix."""
    count, width = values.shape
    data = np.ascontiguousarray(values)
    return pa.Array.from_buffers(dtype, count, [None, _offsets(count, width), pa.py_buffer(data)])


def _references(
    chain: list[Processing],
    layouts: dict[str, _FileLayout],
    rows: IntArray,
) -> pa.Array:
    depth, count = len(chain), len(rows)
    formats = [p.format.encode("utf-8") for p in chain]
    pattern = np.frombuffer(b"".join(formats), dtype=np.uint8)
    lengths = np.array([len(f) for f in formats], dtype=np.int64)
    starts = (np.cumsum(lengths) - lengths)[None, :] + (np.arange(count) * lengths.sum())[:, None]
    format_offsets = np.append(starts.ravel(), count * lengths.sum()).astype(np.int32)
    format_array = pa.Array.from_buffers(
        pa.string(),
        count * depth,
        [None, pa.py_buffer(format_offsets), pa.py_buffer(np.tile(pattern, count))],
    )
    # One gather from the GUIDs of every level, in reference order.
    guid_table = np.concatenate([layouts[p.key].guids for p in chain])
    file_index = np.empty((count, depth), dtype=np.int64)
    positions = np.empty((count, depth), dtype=np.uint64)
    first_guid = 0
    for level, processing in enumerate(chain):
        layout = layouts[processing.key]
        file_index[:, level] = layout.file[rows] + first_guid
        positions[:, level] = layout.position[rows]
        first_guid += len(layout.guids)
    guid_rows = np.empty((count * depth, 36), dtype=np.uint8)
    np.take(guid_table, file_index.ravel(), axis=0, mode="clip", out=guid_rows)
    guid_array = _fixed_width_binary(guid_rows, pa.string())
    struct = pa.StructArray.from_arrays(
        [format_array, guid_array, pa.array(positions.ravel(), type=pa.uint64())],
        fields=list(REFERENCE_TYPE),
    )
    list_offsets = pa.array(np.arange(0, (count + 1) * depth, depth, dtype=np.int32))
    return pa.ListArray.from_arrays(
        list_offsets, struct, type=EVENT_SCHEMA.field("references").type
    )


def _event_arrays(events: _RunEvents, masks: _Masks, rows: slice | IntArray) -> dict[str, pa.Array]:
    """Arrow arrays of every column but the references, for some rows of the run."""
    arrays = {
        name: pa.array(values[rows], type=EVENT_SCHEMA.field(name).type)
        for name, values in events.columns.items()
    }
    for name in TRIGGER_MASK_FIELDS:
        mask: ByteArray = getattr(masks, name)
        arrays[name] = _fixed_width_binary(mask[rows], pa.binary())
    return arrays


def _chunk_rows(spec: GeneratorSpec) -> int:
    """Rows per record batch, so no binary or string child passes int32 offsets."""
    reference_bytes = max(
        sum(36 + len(p.format.encode("utf-8")) for p in _chain_of(spec, processing))
        for processing in spec.processings
    )
    row_bytes = max(spec.hlt_bits // 8, spec.l1_bits // 8, reference_bytes)
    return max(1, min(_TABLE_CHUNK_ROWS, (2**31 - 1) // row_bytes))


def generate_run(spec: GeneratorSpec, run_number: int) -> dict[str, pa.Table]:
    """Every dataset of one run: dataset name -> table with exactly ``EVENT_SCHEMA``.

    Rows are sorted by (run_number, event_number); the same run of the same
    spec always gives identical tables.
    """
    events = _run_events(spec, run_number)
    masks = _run_masks(spec, events)
    layouts = _layouts(spec, events)
    n = events.size
    chunk_rows = _chunk_rows(spec)
    starts = range(0, max(n, 1), chunk_rows)
    # Datasets with every event share the event columns: only references differ.
    shared: list[dict[str, pa.Array]] = []
    tables = {}
    for processing in spec.processings:
        rows = np.flatnonzero(layouts[processing.key].file >= 0)
        chain = _chain_of(spec, processing)
        complete = len(rows) == n
        if complete and not shared:
            shared = [_event_arrays(events, masks, slice(s, s + chunk_rows)) for s in starts]
        batches = []
        for index, start in enumerate(range(0, max(len(rows), 1), chunk_rows)):
            chunk = rows[start : start + chunk_rows]
            arrays = shared[index] if complete else _event_arrays(events, masks, chunk)
            arrays = {**arrays, "references": _references(chain, layouts, chunk)}
            batches.append(
                pa.RecordBatch.from_arrays(
                    [arrays[name] for name in EVENT_SCHEMA.names], schema=EVENT_SCHEMA
                )
            )
        tables[spec.dataset_name(run_number, processing)] = pa.Table.from_batches(
            batches, schema=EVENT_SCHEMA
        )
    return tables


def iter_runs(spec: GeneratorSpec) -> Iterator[tuple[int, dict[str, pa.Table]]]:
    """``(run_number, generate_run(spec, run_number))`` for every run of the spec."""
    for run_number in spec.run_numbers:
        yield run_number, generate_run(spec, run_number)


__all__ = [
    "DEFAULT_PROCESSINGS",
    "GeneratorSpec",
    "Processing",
    "dataset_specs",
    "generate_menus",
    "generate_run",
    "hlt_seeds",
    "iter_runs",
]
