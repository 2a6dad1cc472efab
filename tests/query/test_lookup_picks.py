"""A lookup answers as its keys' picks would, whatever its size: small batches take the
locations files key by key, large ones with numpy (``locations._SCALAR_MAX``)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from eventindex.query import Reader
from eventindex.storage import locations
from tests.generated_store import GeneratedStore
from tests.query.test_reader import sample_keys
from tests.query.test_reader_locations import describe


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path_factory.mktemp("lookup-picks"))
    describe(generated)
    try:
        yield generated
    finally:
        generated.close()


def random_keys(store: GeneratedStore, rng: random.Random) -> list[tuple[int, int]]:
    """Existing events, the keys next to them (mostly absent), other runs' numbers."""
    existing = sample_keys(store, 120, seed=rng.randrange(1000))
    near = [(run, event + rng.choice((-1, 1))) for run, event in existing[:40]]
    runs = store.spec.run_numbers
    elsewhere = [
        (rng.choice(runs) + rng.choice((-1, 1)), rng.randrange(1, 10**6)) for _ in range(10)
    ]
    keys = existing + near + elsewhere
    rng.shuffle(keys)
    return keys


@pytest.mark.parametrize("scalar_max", [0, 16, 10**6], ids=["numpy", "default", "loop"])
@pytest.mark.parametrize(
    "filters",
    [{}, {"formats": ["AOD"]}, {"dataset_pattern": "*.merge.AOD.*"}],
    ids=["all", "formats", "pattern"],
)
def test_lookups_of_every_size_equal_their_picks(
    store: GeneratedStore,
    monkeypatch: pytest.MonkeyPatch,
    scalar_max: int,
    filters: dict[str, Any],
) -> None:
    monkeypatch.setattr(locations, "_SCALAR_MAX", scalar_max)
    rng = random.Random(scalar_max)
    collection = store.spec.collection
    keys = random_keys(store, rng)
    with Reader(store.catalog) as reader:
        assert reader.located(collection)
        picks = {key: reader.pick(collection, *key, **filters) for key in keys}
        assert any(p is None for p in picks.values()) and any(picks.values())
        for size in (1, 2, 7, 40, len(keys)):
            batch = [rng.choice(keys) for _ in range(size)]  # repeats too
            assert reader.lookup(collection, batch, **filters) == [picks[k] for k in batch]
        assert reader.stats()["mapfile_reads"] == 0
