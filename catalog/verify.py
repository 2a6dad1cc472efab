"""``eventindex catalog verify``: do the catalog and the store agree?

Errors (exit status 1): a committed file that is missing, has another size or
checksum, cannot be read, or whose rows or key range differ from its entry; an
extension whose rows or keys differ from its master; an orphan map-file that no
entry names. Warnings (fatal only with ``strict``): overlapping key ranges
inside a dataset part (lookups must open several files; compaction fixes it),
temporary files left by interrupted writes, and entries stuck in ``writing``.
"""

from __future__ import annotations

import enum
import itertools
import posixpath
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from catalog.base import Catalog
from catalog.fileset import absolute_uri
from catalog.model import FileKind, FileState, TagFile
from eventindex.errors import StorageError
from eventindex.storage import (
    MapFileReader,
    checksum_algorithm,
    file_checksum,
    file_size,
    resolve,
)
from eventindex.storage.locations import LOCATIONS_PART, LocationIndex

STALE_WRITING_SECONDS = 3600.0


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    severity: Severity
    kind: str
    detail: str
    uri: str = ""
    file_id: str = ""
    dataset: str = ""


@dataclass
class VerifyReport:
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.WARNING]

    def ok(self, strict: bool = False) -> bool:
        return not (self.problems if strict else self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok(),
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [asdict(p) for p in self.problems],
        }

    def to_text(self) -> str:
        lines = [
            f"checked {self.files_checked} committed files, {self.bytes_checked:,} bytes: "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        ]
        for problem in self.problems:
            where = problem.uri or problem.dataset
            lines.append(f"  {problem.severity.upper():7} {problem.kind}: {problem.detail}")
            if where:
                lines.append(f"          at {where}")
        return "\n".join(lines)


def _check_file(
    entry: TagFile, checksums: bool, report: VerifyReport
) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
    """Check one committed file; returns (rows, key_min, key_max) read from it."""

    def problem(kind: str, detail: str) -> None:
        report.problems.append(
            Problem(Severity.ERROR, kind, detail, entry.uri, entry.file_id, entry.dataset)
        )

    try:
        size = file_size(entry.uri)
    except StorageError:
        problem("missing_file", f"committed file {entry.file_id} is not in the store")
        return None
    report.bytes_checked += size
    if size != entry.bytes:
        problem("size_mismatch", f"catalog says {entry.bytes} bytes, file has {size}")
    try:
        if (
            checksums
            and entry.checksum
            and file_checksum(entry.uri, checksum_algorithm(entry.checksum)) != entry.checksum
        ):
            problem("checksum_mismatch", f"file content does not match checksum {entry.checksum}")
        if entry.kind is FileKind.INDEX and entry.part == LOCATIONS_PART:
            with LocationIndex(entry.uri) as located:  # not Parquet: a locations file
                rows, key_min, key_max = located.rows, located.key_min, located.key_max
        else:
            with MapFileReader(entry.uri) as reader:
                rows, key_min, key_max = reader.num_rows, reader.key_min, reader.key_max
    # A damaged footer can fail in many ways below the storage layer; each is "unreadable".
    except (StorageError, OSError, ValueError, TypeError, KeyError, pa.ArrowException) as exc:
        problem("unreadable", f"{type(exc).__name__}: {exc}")
        return None
    if rows != entry.rows:
        problem("rows_mismatch", f"catalog says {entry.rows} rows, file has {rows}")
    if (key_min, key_max) != (entry.key_min, entry.key_max):
        problem(
            "key_range_mismatch",
            f"catalog says keys {entry.key_min}..{entry.key_max}, file has {key_min}..{key_max}",
        )
    return rows, key_min, key_max


def _check_overlaps(entries: Iterable[TagFile], report: VerifyReport) -> None:
    groups: dict[tuple[str, FileKind, str], list[TagFile]] = defaultdict(list)
    for entry in entries:
        if entry.kind in (FileKind.MASTER, FileKind.EXTENSION, FileKind.DIRECTOR):
            groups[(entry.dataset, entry.kind, entry.part)].append(entry)
    for (dataset, kind, part), files in groups.items():
        files.sort(key=lambda e: (e.key_min, e.key_max))
        for before, after in itertools.pairwise(files):
            if after.key_min <= before.key_max:
                label = f"{kind.value}{'/' + part if part else ''}"
                report.problems.append(
                    Problem(
                        Severity.WARNING,
                        "overlapping_keys",
                        f"{label} files {before.file_id} ({before.key_min}..{before.key_max}) "
                        f"and {after.file_id} ({after.key_min}..{after.key_max}) overlap",
                        dataset=dataset,
                    )
                )


def _check_extensions(committed: dict[str, TagFile], report: VerifyReport) -> None:
    for entry in committed.values():
        if entry.kind is not FileKind.EXTENSION:
            continue
        master_id = entry.attributes.get("master", "")
        master = committed.get(master_id)
        if master is None:
            detail = f"extension {entry.file_id} names master {master_id!r}, which is not committed"
        elif master.rows != entry.rows or (master.key_min, master.key_max) != (
            entry.key_min,
            entry.key_max,
        ):
            detail = (
                f"extension {entry.file_id} has {entry.rows} rows {entry.key_min}..{entry.key_max}"
                f", its master {master.file_id} {master.rows} rows "
                f"{master.key_min}..{master.key_max}"
            )
        else:
            continue
        report.problems.append(
            Problem(
                Severity.ERROR,
                "extension_mismatch",
                detail,
                entry.uri,
                entry.file_id,
                entry.dataset,
            )
        )


def _normal(uri: str) -> str:
    return posixpath.normpath(absolute_uri(uri)) if "://" not in uri else uri


def _store_files(root: str) -> list[str]:
    """Every file under ``root``, hidden ones too (temporary files of writes start
    with a dot), as URIs spelled from ``root``."""
    filesystem, path = resolve(root)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    prefix, base = root.rstrip("/"), path.rstrip("/")
    return sorted(
        prefix + info.path[len(base) :]
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File
    )


def verify_catalog(
    catalog: Catalog,
    store_root: str | None,
    *,
    dataset: str | None = None,
    checksums: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check every committed file (of one dataset, or all) against the store.

    With ``store_root``, also look for orphan and temporary files under it
    (only when checking everything: a single dataset's check cannot know
    which files belong to others).
    """
    report = VerifyReport()
    every = catalog.list_tagfiles(dataset=dataset, states=None)
    committed = {e.file_id: e for e in every if e.state is FileState.COMMITTED}
    for number, entry in enumerate(committed.values(), start=1):
        _check_file(entry, checksums, report)
        report.files_checked += 1
        if progress:
            progress(number, len(committed))
    _check_overlaps(committed.values(), report)
    _check_extensions(committed, report)
    now = time.time()
    for entry in every:
        if entry.state is FileState.WRITING and now - entry.created_at > STALE_WRITING_SECONDS:
            report.problems.append(
                Problem(
                    Severity.WARNING,
                    "stale_writing",
                    f"entry {entry.file_id} 'writing' since {time.ctime(entry.created_at)}",
                    entry.uri,
                    entry.file_id,
                    entry.dataset,
                )
            )
    if store_root is not None and dataset is None:
        known = {_normal(e.uri) for e in every}
        for uri in _store_files(absolute_uri(store_root)):
            name = uri.rsplit("/", 1)[-1]
            if name.endswith(".tmp"):
                report.problems.append(
                    Problem(
                        Severity.WARNING,
                        "temporary_file",
                        "left by an interrupted write (or one still running)",
                        uri,
                    )
                )
            elif (
                name.endswith(".parquet") and not name.startswith(".") and _normal(uri) not in known
            ):
                report.problems.append(
                    Problem(Severity.ERROR, "orphan_file", "no catalog entry names this file", uri)
                )
    return report
