"""The Creator's last step: write a table as a TagFile in the store and register it.

Order of operations, so that a crash at any point loses nothing committed and
leaves nothing that looks committed: register the entry as ``writing``, write
the map-file atomically (temporary name, flush, rename), then commit the full
entry (rows, bytes, checksum, key range, message ids, GUIDs) in one catalog
transaction. Debris of a crash is a ``writing`` entry or a temporary file,
which ``eventindex catalog verify`` reports.

Every writer of map-files ends the same way, so the two steps are here once:
``committed_entry`` is a registered ``writing`` entry as it is committed, with
what its writer learned; ``forget_files`` removes the files and entries of
outputs that will not be committed.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from catalog.base import Catalog
from catalog.model import Dataset, FileKind, FileState, TagFile, new_file_id
from eventindex.errors import EventIndexError
from eventindex.storage import WriteOptions, exists, join, write_mapfile
from eventindex.storage.filesystem import delete_file


def absolute_uri(root: str) -> str:
    """Local paths made absolute and normal (so catalog URIs do not depend on the
    working directory, and one store has one spelling); URIs with a scheme are
    kept as they are."""
    return root if "://" in root else posixpath.abspath(root)


def referenced_guids(table: pa.Table) -> tuple[str, ...]:
    """Distinct file GUIDs in an event table's references, sorted."""
    if "references" not in table.column_names or table.num_rows == 0:
        return ()
    guids = pc.list_flatten(table.column("references")).combine_chunks().field("guid")
    return tuple(sorted(pc.unique(guids).to_pylist()))


class WrittenFile(Protocol):
    """What a writer learned about the file it wrote (``MapFileInfo``, ``LocationsInfo``)."""

    @property
    def rows(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def checksum(self) -> str: ...
    @property
    def key_min(self) -> tuple[int, ...]: ...
    @property
    def key_max(self) -> tuple[int, ...]: ...


def committed_entry(
    entry: TagFile,
    info: WrittenFile,
    *,
    supersedes: Iterable[str] = (),
    message_ids: Iterable[str] = (),
    guids: Iterable[str] = (),
    stamp: bool = True,
) -> TagFile:
    """A registered ``writing`` entry as it is committed: what its writer learned (rows,
    bytes, checksum, key range), the files it supersedes, and the message ids and GUIDs
    it takes over, in state ``COMMITTED`` with ``committed_at`` now. With ``stamp``
    false ``committed_at`` is left to the commit itself (``FilesetWriter.prepare``
    builds the entry well before ``commit`` stores it)."""
    learned = replace(
        entry,
        rows=info.rows,
        bytes=info.bytes,
        checksum=info.checksum,
        key_min=info.key_min,
        key_max=info.key_max,
        state=FileState.COMMITTED,
        message_ids=tuple(message_ids),
        guids=tuple(guids),
        supersedes=tuple(supersedes),
    )
    return replace(learned, committed_at=time.time()) if stamp else learned


def forget_files(
    catalog: Catalog, entries: Sequence[TagFile], *, writing_only: bool = True
) -> None:
    """Remove each entry, and its file if it got renamed into place (best effort, entry by
    entry: what a failing catalog keeps, ``eventindex catalog verify`` reports).

    With ``writing_only`` an entry no longer ``writing`` stays, file and all: it was
    committed meanwhile (a backend that commits row by row). Without it every entry
    goes, whatever its state (a run undoing the files it committed and retired)."""
    for entry in entries:
        try:
            if writing_only and catalog.get_tagfile(entry.file_id).state is not FileState.WRITING:
                continue
            if exists(entry.uri):
                delete_file(entry.uri)
            catalog.remove_tagfile(entry.file_id)
        except (EventIndexError, OSError):
            pass


class FilesetWriter:
    """Writes TagFiles of datasets under ``<root>/<collection>/<dataset>/<kind>/``."""

    def __init__(self, catalog: Catalog, store_root: str, options: WriteOptions | None = None):
        self.catalog = catalog
        self.root = absolute_uri(store_root)
        self.options = options or WriteOptions()

    def uri_for(self, dataset: Dataset, kind: FileKind, file_id: str, part: str = "") -> str:
        name = f"{part}.{file_id}.parquet" if part else f"{file_id}.parquet"
        return join(self.root, dataset.collection, dataset.name, kind.value, name)

    def write(
        self,
        table: pa.Table,
        dataset: Dataset,
        *,
        kind: FileKind = FileKind.MASTER,
        part: str = "",
        message_ids: Iterable[str] = (),
        supersedes: Iterable[str] = (),
        attributes: Mapping[str, str] | None = None,
    ) -> TagFile:
        """Write ``table`` (sorted by the collection key on the way) and commit its entry."""
        prepared = self.prepare(
            table,
            dataset,
            kind=kind,
            part=part,
            message_ids=message_ids,
            supersedes=supersedes,
            attributes=attributes,
        )
        return self.commit(prepared)

    def prepare(
        self,
        table: pa.Table,
        dataset: Dataset,
        *,
        kind: FileKind = FileKind.MASTER,
        part: str = "",
        message_ids: Iterable[str] = (),
        supersedes: Iterable[str] = (),
        attributes: Mapping[str, str] | None = None,
    ) -> TagFile:
        """``write`` up to the commit: the file is in place, its entry ``writing``. Returns
        the entry to give ``commit`` (or ``discard``): writers that must decide under a
        lock whether to commit keep the writing itself out of it."""
        collection = self.catalog.get_collection(dataset.collection)
        file_id = new_file_id()
        entry = TagFile(
            file_id=file_id,
            dataset=dataset.name,
            collection=dataset.collection,
            kind=kind,
            uri=self.uri_for(dataset, kind, file_id, part),
            part=part,
            state=FileState.WRITING,
            attributes=dict(attributes or {}),
        )
        self.catalog.add_tagfile(entry)
        try:
            info = write_mapfile(
                table,
                entry.uri,
                collection.key,
                self.options,
                metadata={"dataset": dataset.name, "file_id": file_id, "kind": kind.value},
            )
            guids = referenced_guids(table)
        except BaseException:
            self._forget(entry)
            raise
        return committed_entry(
            entry, info, supersedes=supersedes, message_ids=message_ids, guids=guids, stamp=False
        )

    def commit(self, prepared: TagFile) -> TagFile:
        """Commit an entry ``prepare`` returned; on failure the file and entry are undone."""
        try:
            return self.catalog.commit_tagfile(replace(prepared, committed_at=time.time()))
        except BaseException:
            self._forget(prepared)
            raise

    def discard(self, prepared: TagFile) -> None:
        """Drop what ``prepare`` wrote, instead of committing it."""
        self._forget(prepared)

    def _forget(self, entry: TagFile) -> None:
        """Undo a failed write (the file and its ``writing`` entry)."""
        forget_files(self.catalog, [entry])
