"""The embedded chain, end to end: JSON lines → extract → send → memory broker → consume →
catalog; every produced record is picked back, none twice."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from catalog import SQLiteCatalog
from consumers.daemon import consume
from eventindex.config import load_config
from eventindex.generator import GeneratorSpec, generate_run
from eventindex.query import Reader
from eventindex.records.jsonl import write_jsonl
from eventindex.transport import open_transport
from eventindex.transport.memory import MemoryBroker
from producers.extract import ExtractOptions, extract
from producers.sender import FileSender


def test_produced_records_are_picked_back(tmp_path: Path) -> None:
    spec = GeneratorSpec(runs=1, events_per_run=2000, seed=11)
    tables = generate_run(spec, spec.first_run)
    files = []
    for name, table in tables.items():
        source = tmp_path / f"{name}.jsonl"
        write_jsonl(table, source)
        files.append(tmp_path / f"{name}.ei")
        extract([source], files[-1], ExtractOptions(), message_bytes=5000)
    url = f"memory://chain-{uuid.uuid4().hex[:8]}"
    settings = load_config(
        overrides={
            "store.root": str(tmp_path / "store"),
            "catalog.path": str(tmp_path / "catalog.sqlite"),
            "consumer.flush_seconds": 0.5,
        }
    )
    stop = threading.Event()
    consumers = threading.Thread(
        target=consume, args=(settings, url), kwargs={"workers": 2, "stop": stop}
    )
    consumers.start()
    try:
        with open_transport(url) as transport:
            sender = FileSender(transport)
            sender.listen()
            reports = [sender.send(path) for path in files]
            assert sender.wait_stored(reports, 30)
    finally:
        stop.set()
        consumers.join(timeout=30)
        MemoryBroker.forget(url.removeprefix("memory://"))
    with SQLiteCatalog(str(tmp_path / "catalog.sqlite")) as catalog:
        stored = {f.dataset: 0 for f in catalog.list_tagfiles()}
        for entry in catalog.list_tagfiles():
            stored[entry.dataset] += entry.rows
        assert stored == {name: table.num_rows for name, table in tables.items()}
        reader = Reader(catalog)
        raw = next(t for name, t in tables.items() if name.endswith(".daq.RAW"))
        for row in (0, 777, raw.num_rows - 1):
            run_number = raw["run_number"][row].as_py()
            event_number = raw["event_number"][row].as_py()
            picked = reader.pick(spec.collection, run_number, event_number)
            assert picked is not None
            expected = {r["guid"] for r in raw["references"][row].as_py()}
            assert expected <= {location.guid for location in picked.locations}
        reader.close()
