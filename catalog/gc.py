"""``eventindex catalog gc``: delete the files no reader needs any more, then forget them.

Garbage is (1) retired entries (inputs of a compaction, replaced extension and
index files, explicitly retired files) retired more than the grace time ago:
readers that listed a file before it was retired may still read it, so the
grace must be far longer than any query or scan; and (2) crash debris: entries
still ``writing`` after ``STALE_WRITING_SECONDS`` (what ``catalog verify``
warns about), with their file and the temporary files of the interrupted write
(``.<name>.<hex>.tmp`` next to it).

Order, per entry: delete its files, then forget the entry. A crash in between
leaves at worst an entry without a file; the next run finds no file to delete
and forgets the entry. A file or entry that is already gone (another gc, a
crash) is not an error. Files are reached through ``eventindex.storage`` URIs,
so local stores and HDFS are handled alike.

Before deleting anything, every retired entry is stamped through
``retire_tagfiles``: entries that carry no retirement time (retired by older
versions) get one now and wait one grace time, and entries retired only by a
backend's reading rule get their state written down, so it cannot change later.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from catalog.base import Catalog
from catalog.model import FileState, TagFile
from catalog.verify import STALE_WRITING_SECONDS
from eventindex.errors import NotFoundError, StorageError
from eventindex.storage import resolve
from eventindex.storage.filesystem import delete_file, file_size


@dataclass(frozen=True)
class Removed:
    """One entry whose files were deleted (or would be, in a dry run)."""

    file_id: str
    dataset: str
    reason: str  # "retired" or "stale_writing"
    uri: str
    files: tuple[str, ...]
    bytes: int


@dataclass
class GcReport:
    dry_run: bool
    grace_seconds: float
    removed: list[Removed] = field(default_factory=list)
    waiting: int = 0  # retired less than the grace time ago
    stamped: int = 0  # retired without a known time: stamped now, removed by a later run
    writing: int = 0  # being written (not stale yet)
    errors: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        return sum(len(r.files) for r in self.removed)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok(),
            "dry_run": self.dry_run,
            "grace_seconds": self.grace_seconds,
            "entries": len(self.removed),
            "files": self.files,
            "bytes": self.bytes,
            "waiting": self.waiting,
            "stamped": self.stamped,
            "writing": self.writing,
            "errors": self.errors,
            "removed": [asdict(r) | {"files": list(r.files)} for r in self.removed],
        }

    def to_text(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [
            f"{verb} {len(self.removed)} entries, {self.files} files, {self.bytes:,} bytes; "
            f"{self.waiting} retired within the grace time ({self.grace_seconds:,.0f} s), "
            f"{self.stamped} stamped with a retirement time now, "
            f"{self.writing} being written"
        ]
        for item in self.removed:
            lines.append(
                f"  {item.reason:13} {item.file_id} ({item.dataset}): "
                f"{len(item.files)} files, {item.bytes:,} bytes"
            )
            lines.extend(f"      {uri}" for uri in item.files)
        lines.extend(f"  ERROR {error}" for error in self.errors)
        return "\n".join(lines)


class _Directories:
    """Directory listings of one run, so temporary files are found without a listing
    per entry."""

    def __init__(self) -> None:
        self._names: dict[str, list[str]] = {}

    def names(self, directory: str) -> list[str]:
        if directory not in self._names:
            filesystem, path = resolve(directory)
            selector = pafs.FileSelector(path, allow_not_found=True)
            try:
                infos = filesystem.get_file_info(selector)
            except (pa.ArrowException, OSError) as exc:
                raise StorageError(f"{directory}: cannot list: {exc}") from exc
            self._names[directory] = [i.base_name for i in infos if i.type == pafs.FileType.File]
        return self._names[directory]


def _files_of(entry: TagFile, directories: _Directories) -> list[tuple[str, int]]:
    """The entry's file and the temporary files of writes of it, with their sizes."""
    directory, name = posixpath.split(entry.uri)
    temporary = f".{name}."
    found = [
        (posixpath.join(directory, n), 0)
        for n in directories.names(directory)
        if n.startswith(temporary) and n.endswith(".tmp")
    ]
    if name in directories.names(directory):
        found.insert(0, (entry.uri, 0))
    sized = []
    for uri, _ in found:
        try:
            sized.append((uri, file_size(uri)))
        except StorageError:
            continue  # deleted meanwhile
    return sized


def _delete(uris: Iterable[str]) -> None:
    for uri in uris:
        try:
            delete_file(uri)
        except StorageError:
            try:
                file_size(uri)
            except StorageError:
                continue  # already gone: another gc, or the writer's own cleanup
            raise


def _stamp(catalog: Catalog, entries: list[TagFile]) -> None:
    """Write down the retirement (and its time) of every retired entry."""
    try:
        catalog.retire_tagfiles(e.file_id for e in entries)
    except NotFoundError:  # one was forgotten meanwhile (another gc): one by one
        for entry in entries:
            try:
                catalog.retire_tagfiles([entry.file_id])
            except NotFoundError:
                continue


def collect_garbage(
    catalog: Catalog,
    *,
    grace_seconds: float,
    dataset: str | None = None,
    dry_run: bool = False,
    stale_writing_seconds: float = STALE_WRITING_SECONDS,
    now: float | None = None,
) -> GcReport:
    """Delete the files of retired entries older than ``grace_seconds`` and of stale
    ``writing`` entries, then forget those entries. ``dry_run`` only reports."""
    if grace_seconds < 0:
        raise ValueError(f"the grace time must not be negative, not {grace_seconds}")
    now = time.time() if now is None else now
    report = GcReport(dry_run=dry_run, grace_seconds=grace_seconds)
    entries = catalog.list_tagfiles(dataset=dataset, states=[FileState.RETIRED, FileState.WRITING])
    retired = [e for e in entries if e.state is FileState.RETIRED]
    if retired and not dry_run:
        _stamp(catalog, retired)
    due: list[tuple[TagFile, str]] = []
    for entry in entries:
        if entry.state is FileState.WRITING:
            if now - entry.created_at <= stale_writing_seconds:
                report.writing += 1
            else:
                due.append((entry, "stale_writing"))
            continue
        if entry.retired_at is None:
            report.stamped += 1
        elif now - entry.retired_at < grace_seconds:
            report.waiting += 1
        else:
            due.append((entry, "retired"))
    directories = _Directories()
    for entry, reason in due:
        try:
            # A writer that was only slow may have committed it since the listing.
            if (
                reason == "stale_writing"
                and not dry_run
                and catalog.get_tagfile(entry.file_id).state is not FileState.WRITING
            ):
                continue
            files = _files_of(entry, directories)
            if not dry_run:
                _delete(uri for uri, _ in files)
                catalog.remove_tagfile(entry.file_id)
        except NotFoundError:
            continue  # forgotten by another gc meanwhile
        except StorageError as exc:
            report.errors.append(f"{entry.file_id}: {exc}")
            continue
        report.removed.append(
            Removed(
                file_id=entry.file_id,
                dataset=entry.dataset,
                reason=reason,
                uri=entry.uri,
                files=tuple(uri for uri, _ in files),
                bytes=sum(size for _, size in files),
            )
        )
    return report
