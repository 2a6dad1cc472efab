"""Small generated event tables shared by the producer and consumer tests."""

from __future__ import annotations

import pyarrow as pa
import pytest

from eventindex.generator import GeneratorSpec, generate_run

SPEC = GeneratorSpec(runs=1, events_per_run=1500, seed=3)
RAW = SPEC.dataset_name(SPEC.first_run, SPEC.processings[0])
AOD = SPEC.dataset_name(SPEC.first_run, SPEC.processings[1])


@pytest.fixture(scope="session")
def run_tables() -> dict[str, pa.Table]:
    """One small run: its RAW, two AOD and DAOD datasets."""
    return generate_run(SPEC, SPEC.first_run)
