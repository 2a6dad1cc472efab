"""What the running service sees of catalog changes: collections by change token, with
listings bounded by changes rather than requests, and object catalogs partitioned while
it runs."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.model import Collection
from catalog.sqlite import SQLiteCatalog
from eventindex.config import load_config
from eventindex.query import Reader
from eventindex.records.schema import RecordKind
from tests.spatial.partition_data import object_table, partition
from webservice.app import create_app
from webservice.problems import ProblemError
from webservice.service import EventCollections

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


class CountingCatalog(SQLiteCatalog):
    """A SQLite catalog that counts its change-token reads and collection listings."""

    tokens = 0
    listings = 0

    def change_token(self) -> int:
        self.tokens += 1
        return super().change_token()

    def list_collections(self) -> list[Collection]:
        self.listings += 1
        return super().list_collections()


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[CountingCatalog]:
    opened = CountingCatalog(str(tmp_path / "catalog.sqlite"))
    opened.create_collection(Collection("first", RecordKind.EVENTS))
    try:
        yield opened
    finally:
        opened.close()


def _status(collections: EventCollections, name: str) -> int:
    try:
        collections.resolve(name, "query")
    except ProblemError as exc:
        return exc.status
    return 200


def test_unknown_names_cost_token_reads_not_listings(catalog: CountingCatalog) -> None:
    with Reader(catalog) as reader:
        collections = EventCollections(catalog, reader, refresh_seconds=0.0)
        assert _status(collections, "first") == 200
        listed, read = catalog.listings, catalog.tokens
        assert [_status(collections, f"bad-{i}") for i in range(200)] == [404] * 200
        assert catalog.listings == listed  # the catalog did not change: no listing
        assert catalog.tokens == read + 200
        assert collections.known("first") and not collections.known("bad-0")

        # A collection created meanwhile is found by the first request naming it.
        catalog.create_collection(Collection("second", RecordKind.EVENTS))
        assert not collections.known("second")
        assert _status(collections, "second") == 200
        assert catalog.listings == listed + 1
        assert collections.known("second")
        # An object catalog is a collection, but not of events.
        catalog.create_collection(Collection("sky", RecordKind.OBJECTS))
        assert _status(collections, "sky") == 404
        assert not collections.known("sky")


def test_listings_at_most_once_per_refresh_period(catalog: CountingCatalog) -> None:
    with Reader(catalog) as reader:
        collections = EventCollections(catalog, reader, refresh_seconds=0.3)
        assert _status(collections, "first") == 200
        listed = catalog.listings
        # The catalog changes under a stream of bad names: still no listing per request,
        # one per refresh period at most.
        started = time.monotonic()
        for i in range(20):
            catalog.create_collection(Collection(f"new-{i}", RecordKind.EVENTS))
            assert _status(collections, f"bad-{i}") == 404
        periods = (time.monotonic() - started) / 0.3
        assert catalog.listings <= listed + 1 + periods
        # Once the last listing is a refresh period old, the newest collection shows.
        deadline = time.monotonic() + 5.0
        while _status(collections, "new-19") != 200:
            assert time.monotonic() < deadline, "new-19 never became visible"
            time.sleep(0.05)
        # refresh() lists again on the next unseen name, however recent the last look.
        catalog.create_collection(Collection("forced", RecordKind.EVENTS))
        collections.refresh()
        assert _status(collections, "forced") == 200


def test_omitted_collection_counts_the_cached_listing(catalog: CountingCatalog) -> None:
    catalog.create_collection(Collection("second", RecordKind.EVENTS))
    with Reader(catalog) as reader:
        collections = EventCollections(catalog, reader, refresh_seconds=60.0)
        with pytest.raises(ProblemError) as raised:
            collections.resolve(None, "query")
        assert raised.value.status == 422
        listed = catalog.listings
        for _ in range(50):
            with pytest.raises(ProblemError):
                collections.resolve(None, "body")
        assert catalog.listings == listed


def test_object_catalog_partitioned_while_running_shows(tmp_path: Path) -> None:
    """The unnamed object catalog is the only one; once a second one is partitioned,
    the running service says there are several within about a refresh period."""
    sky = partition(tmp_path, object_table(600, seed=2))
    try:
        settings = load_config(
            overrides={
                "store.root": sky.store,
                "catalog.path": str(tmp_path / "catalog.sqlite"),
                "webservice.reader_refresh_seconds": 1.0,
            },
            environ={},
        )
        row = sky.table.slice(0, 1).to_pylist()[0]
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            found = client.get(f"/v1/objects/{row['object_id']}")
            assert found.status_code == 200, found.text
            assert found.json()["catalog"] == "sky.Object"
            deep = partition(tmp_path, object_table(400, seed=3), name="deep")
            try:
                changed = time.monotonic()
                while True:
                    answer = client.get(f"/v1/objects/{row['object_id']}")
                    if answer.status_code == 404:
                        break
                    assert answer.status_code == 200, answer.text
                    assert time.monotonic() - changed < 5.0, "the new catalog never showed"
                    time.sleep(0.05)
                seen_after = time.monotonic() - changed
                detail = answer.json()["detail"]
                assert "several object catalogs" in detail and "deep.Object" in detail
                assert seen_after < 2.5  # a refresh period, not thirty
                named = client.get(f"/v1/objects/{row['object_id']}", params={"catalog": "sky"})
                assert named.status_code == 200
                cone = client.get(
                    "/v1/objects/cone",
                    params={"ra": 10.0, "dec": 5.0, "radius_arcsec": 36000.0, "catalog": "deep"},
                )
                assert cone.status_code == 200 and cone.json()["catalog"] == "deep.Object"
            finally:
                deep.catalog.close()
    finally:
        sky.catalog.close()
