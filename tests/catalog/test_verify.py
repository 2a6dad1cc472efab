"""``verify_catalog``: every way the catalog and the store can disagree is reported,
with the right kind and severity, and ``ok()`` decides the exit status."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from catalog import FileKind, FileState, TagFile, new_file_id
from catalog.verify import STALE_WRITING_SECONDS, Severity, VerifyReport, verify_catalog
from eventindex.generator import GeneratorSpec
from eventindex.storage import MapFileReader, file_checksum
from tests.generated_store import GeneratedStore

SPEC = GeneratorSpec(runs=1, events_per_run=1500)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GeneratedStore]:
    generated = GeneratedStore.create(tmp_path, SPEC)
    try:
        yield generated
    finally:
        generated.close()


def committed(store: GeneratedStore) -> list[TagFile]:
    return store.catalog.list_tagfiles()


def raw_file(store: GeneratedStore) -> TagFile:
    (entry,) = store.catalog.list_tagfiles(dataset=store.dataset(SPEC.first_run, "RAW"))
    return entry


def verify(store: GeneratedStore, **kwargs: object) -> VerifyReport:
    return verify_catalog(store.catalog, str(store.root), **kwargs)  # type: ignore[arg-type]


def kinds(report: VerifyReport) -> dict[str, Severity]:
    return {problem.kind: problem.severity for problem in report.problems}


def assert_error(report: VerifyReport, kind: str, entry: TagFile | None = None) -> None:
    assert kinds(report).get(kind) is Severity.ERROR, report.to_text()
    assert not report.ok() and not report.ok(strict=True)
    if entry is not None:
        (problem,) = [p for p in report.problems if p.kind == kind]
        assert (problem.file_id, problem.uri, problem.dataset) == (
            entry.file_id,
            entry.uri,
            entry.dataset,
        )


def assert_warning_only(report: VerifyReport, kind: str) -> None:
    assert kinds(report) == {kind: Severity.WARNING}, report.to_text()
    assert report.ok(), "warnings alone pass"
    assert not report.ok(strict=True), "--strict fails on warnings"


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- a clean store --------------------------------------------------------------
def test_clean_store_verifies(store: GeneratedStore) -> None:
    calls: list[tuple[int, int]] = []
    report = verify_catalog(
        store.catalog, str(store.root), progress=lambda done, total: calls.append((done, total))
    )
    files = committed(store)
    assert report.problems == []
    assert report.ok() and report.ok(strict=True)
    assert report.files_checked == len(files) == len(SPEC.processings)
    assert report.bytes_checked == sum(f.bytes for f in files)
    assert calls == [(n, len(files)) for n in range(1, len(files) + 1)]
    assert report.to_dict()["ok"] is True
    assert "0 errors, 0 warnings" in report.to_text()


def test_store_root_spelling_does_not_matter(
    store: GeneratedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog holds absolute URIs; a relative or unnormalised root finds the same files."""
    (tmp_path / "elsewhere").mkdir()
    assert verify_catalog(store.catalog, str(tmp_path / "elsewhere" / ".." / "store")).ok(True)
    assert verify_catalog(store.catalog, str(store.root) + "/").ok(strict=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert verify_catalog(store.catalog, "../store").ok(strict=True)


def test_without_store_root_only_catalogued_files_are_checked(store: GeneratedStore) -> None:
    (store.root / "stray.parquet").write_bytes(b"PAR1")
    report = verify_catalog(store.catalog, None)
    assert report.ok(strict=True)
    assert report.files_checked == len(SPEC.processings)


# -- errors ---------------------------------------------------------------------
def test_deleted_file_is_missing(store: GeneratedStore) -> None:
    entry = raw_file(store)
    Path(entry.uri).unlink()
    report = verify(store)
    assert_error(report, "missing_file", entry)
    assert kinds(report) == {"missing_file": Severity.ERROR}


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_changed_size(store: GeneratedStore, change: str) -> None:
    entry = raw_file(store)
    path = Path(entry.uri)
    data = path.read_bytes()
    path.write_bytes(data[:-100] if change == "truncate" else data + b"\0" * 10)
    report = verify(store)
    assert_error(report, "size_mismatch", entry)
    assert str(entry.bytes) in next(p.detail for p in report.problems if p.kind == "size_mismatch")


def test_same_size_corruption_fails_the_checksum(store: GeneratedStore) -> None:
    entry = raw_file(store)
    flip_byte(Path(entry.uri), entry.bytes // 3)  # inside a data page, not the footer
    report = verify(store)
    assert_error(report, "checksum_mismatch", entry)
    assert "size_mismatch" not in kinds(report)
    # Without re-hashing, a damaged data page goes unnoticed: the footer is intact.
    assert verify(store, checksums=False).ok(strict=True)


def test_damaged_footer_is_unreadable(store: GeneratedStore) -> None:
    entry = raw_file(store)
    flip_byte(Path(entry.uri), entry.bytes - 1)  # the trailing PAR1 magic
    report = verify(store, checksums=False)
    assert_error(report, "unreadable", entry)
    assert kinds(verify(store)) == {
        "checksum_mismatch": Severity.ERROR,
        "unreadable": Severity.ERROR,
    }


def test_damaged_footer_metadata_is_unreadable_not_a_crash(store: GeneratedStore) -> None:
    """A footer value that is no longer UTF-8 (a flipped bit in the key-value metadata)."""
    entry = raw_file(store)
    path = Path(entry.uri)
    data = path.read_bytes()
    at = data.rindex(entry.file_id.encode())  # the eventindex.file_id value in the footer
    path.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    report = verify(store, checksums=False)
    assert_error(report, "unreadable", entry)


def test_orphan_parquet_file(store: GeneratedStore) -> None:
    entry = raw_file(store)
    orphan = Path(entry.uri).with_name(f"{new_file_id()}.parquet")
    shutil.copyfile(entry.uri, orphan)
    (store.root / "notes.txt").write_text("not a map-file, not our business")
    report = verify(store)
    assert kinds(report) == {"orphan_file": Severity.ERROR}
    assert report.problems[0].uri == str(orphan)
    assert not report.ok()
    # Checking one dataset cannot tell orphans from other datasets' files.
    assert verify(store, dataset=entry.dataset).ok(strict=True)


def test_catalog_rows_and_key_range_disagree_with_the_file(store: GeneratedStore) -> None:
    real = raw_file(store)
    copy = Path(real.uri).with_name(f"{new_file_id()}.parquet")
    shutil.copyfile(real.uri, copy)
    wrong = replace(
        real,
        file_id=new_file_id(),
        uri=str(copy),
        rows=real.rows + 1,
        key_min=(real.key_min[0], real.key_min[1] - 1),
        state=FileState.COMMITTED,
        message_ids=(),
        guids=(),
    )
    store.catalog.add_tagfiles([wrong])
    report = verify(store)
    problems = {p.kind: p for p in report.problems if p.file_id == wrong.file_id}
    assert set(problems) == {"rows_mismatch", "key_range_mismatch"}
    assert all(p.severity is Severity.ERROR for p in problems.values())
    assert f"{wrong.rows} rows" in problems["rows_mismatch"].detail
    assert not report.ok()


def test_extension_that_differs_from_its_master(store: GeneratedStore) -> None:
    master = raw_file(store)
    dataset = store.catalog.get_dataset(master.dataset)
    with MapFileReader(master.uri) as reader:
        table = reader.read(["run_number", "event_number", "bcid"])
    good = store.writer.write(
        table, dataset, kind=FileKind.EXTENSION, part="bcid", attributes={"master": master.file_id}
    )
    assert verify(store).ok(strict=True), "a matching extension is fine"

    short = store.writer.write(
        table.slice(1),
        dataset,
        kind=FileKind.EXTENSION,
        part="short",
        attributes={"master": master.file_id},
    )
    orphaned = store.writer.write(
        table, dataset, kind=FileKind.EXTENSION, part="lost", attributes={"master": "gone"}
    )
    report = verify(store)
    flagged = {p.file_id for p in report.problems if p.kind == "extension_mismatch"}
    assert flagged == {short.file_id, orphaned.file_id}
    assert good.file_id not in flagged
    assert kinds(report) == {"extension_mismatch": Severity.ERROR}
    assert not report.ok()


# -- warnings -------------------------------------------------------------------
def test_leftover_temporary_file(store: GeneratedStore) -> None:
    entry = raw_file(store)
    leftover = Path(entry.uri).with_name(f".{new_file_id()}.parquet.{new_file_id()}.tmp")
    leftover.write_bytes(b"half a file")
    report = verify(store)
    assert_warning_only(report, "temporary_file")
    assert report.problems[0].uri == str(leftover)


def test_overlapping_key_ranges_in_one_dataset(store: GeneratedStore) -> None:
    entry = raw_file(store)
    with MapFileReader(entry.uri) as reader:
        table = reader.read()
    store.writer.write(table.slice(table.num_rows // 2), store.catalog.get_dataset(entry.dataset))
    report = verify(store)
    assert_warning_only(report, "overlapping_keys")
    assert report.problems[0].dataset == entry.dataset


def test_stale_writing_entry(store: GeneratedStore, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = raw_file(store)
    pending = TagFile(
        file_id=new_file_id(),
        dataset=entry.dataset,
        collection=entry.collection,
        kind=FileKind.MASTER,
        uri=entry.uri.replace(entry.file_id, "pending"),
        state=FileState.WRITING,
    )
    store.catalog.add_tagfiles([pending])
    assert verify(store).ok(strict=True), "a write in progress is not a problem"

    later = time.time() + STALE_WRITING_SECONDS + 60
    monkeypatch.setattr(time, "time", lambda: later)
    report = verify(store)
    assert_warning_only(report, "stale_writing")
    assert report.problems[0].file_id == pending.file_id


def test_problems_serialise(store: GeneratedStore) -> None:
    entry = raw_file(store)
    Path(entry.uri).unlink()
    (store.root / ".x.parquet.1.tmp").write_bytes(b"")
    report = verify(store)
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["ok"] is False
    assert (as_dict["errors"], as_dict["warnings"]) == (1, 1)
    assert {p["kind"]: p["severity"] for p in as_dict["problems"]} == {
        "missing_file": "error",
        "temporary_file": "warning",
    }
    text = report.to_text()
    assert "ERROR   missing_file" in text and "WARNING temporary_file" in text
    assert entry.uri in text


def test_entries_checksummed_with_blake2b_still_verify(store: GeneratedStore) -> None:
    """Catalogs written before XXH3-128 checksums keep verifying by their own algorithm."""
    entry = raw_file(store)
    assert entry.checksum.startswith("xxh3-128:")
    legacy = file_checksum(entry.uri, "blake2b")
    with sqlite3.connect(store.catalog_path) as connection:
        connection.execute(
            "UPDATE tagfiles SET checksum = ? WHERE file_id = ?", (legacy, entry.file_id)
        )
    assert verify(store).ok(strict=True)
    flip_byte(Path(entry.uri), entry.bytes // 3)
    assert_error(verify(store), "checksum_mismatch", entry)
