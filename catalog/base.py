"""The Catalog contract: every backend implements these methods with these semantics."""

from __future__ import annotations

import abc
from collections.abc import Hashable, Iterable, Sequence
from types import TracebackType

from catalog.model import Collection, Dataset, FileKind, FileState, TagFile
from catalog.rules import check_batch
from eventindex.records.schema import TriggerMenu


class Catalog(abc.ABC):
    """Registry of collections, datasets, TagFiles and trigger menus.

    Errors are the project's own (``eventindex.errors``): ``NotFoundError``,
    ``AlreadyExistsError``, ``CatalogError``; a backend translates its driver's
    exceptions at this boundary.
    """

    # -- collections -------------------------------------------------------
    @abc.abstractmethod
    def create_collection(self, collection: Collection) -> None:
        """Add a collection; ``AlreadyExistsError`` if the name is taken."""

    @abc.abstractmethod
    def get_collection(self, name: str) -> Collection:
        """The named collection; ``NotFoundError`` if there is none."""

    @abc.abstractmethod
    def list_collections(self) -> list[Collection]:
        """All collections, sorted by name."""

    # -- datasets ----------------------------------------------------------
    @abc.abstractmethod
    def create_dataset(self, dataset: Dataset) -> None:
        """Add a dataset to an existing collection (``NotFoundError`` if it is
        missing, ``AlreadyExistsError`` if the dataset name is taken)."""

    @abc.abstractmethod
    def get_dataset(self, name: str) -> Dataset:
        """The named dataset; ``NotFoundError`` if there is none."""

    @abc.abstractmethod
    def list_datasets(self, collection: str | None = None) -> list[Dataset]:
        """Datasets, of one collection or all, sorted by name."""

    # -- TagFiles ----------------------------------------------------------
    @abc.abstractmethod
    def add_tagfiles(self, tagfiles: Sequence[TagFile]) -> None:
        """Register new TagFiles in one batch, in the state they carry (usually
        ``WRITING``). ``AlreadyExistsError`` if a file id is taken; the dataset
        must exist."""

    def add_tagfile(self, tagfile: TagFile) -> None:
        self.add_tagfiles([tagfile])

    @abc.abstractmethod
    def commit_tagfile(self, tagfile: TagFile) -> TagFile:
        """Store the complete entry as ``COMMITTED`` (stamping ``committed_at``),
        with its message ids and GUIDs, and retire every file it supersedes.

        The file must be new or in state ``WRITING``; committing a committed or
        retired file raises ``CatalogError``. Returns the stored entry. Readers
        never see both the new file and the files it supersedes as live.
        """

    def commit_tagfiles(self, tagfiles: Sequence[TagFile]) -> list[TagFile]:
        """Commit several entries as ``commit_tagfile`` does, in the given order.

        A transactional backend (SQLite) commits them in one transaction: readers
        see all or none. A backend atomic per row only (HBase) commits them one
        after the other, so callers order them such that every prefix is a state
        readers may see (extension files before the master that makes them live).
        """
        tagfiles = list(tagfiles)
        check_batch(tagfiles)
        return [self.commit_tagfile(tagfile) for tagfile in tagfiles]

    @abc.abstractmethod
    def retire_tagfiles(self, file_ids: Iterable[str]) -> None:
        """Mark committed files retired (readers stop seeing them)."""

    @abc.abstractmethod
    def remove_tagfile(self, file_id: str) -> None:
        """Forget a ``WRITING`` or ``RETIRED`` entry (crash debris, garbage
        collection). Removing a committed file raises ``CatalogError``."""

    @abc.abstractmethod
    def get_tagfile(self, file_id: str) -> TagFile:
        """One TagFile in any state; ``NotFoundError`` if unknown."""

    @abc.abstractmethod
    def list_tagfiles(
        self,
        *,
        dataset: str | None = None,
        collection: str | None = None,
        kinds: Iterable[FileKind] | None = None,
        states: Iterable[FileState] | None = (FileState.COMMITTED,),
        first_key_range: tuple[int, int] | None = None,
    ) -> list[TagFile]:
        """TagFiles matching every given filter, sorted by (dataset, key_min, file_id).

        ``first_key_range=(lo, hi)`` keeps files whose first key component range
        (the run number for events) intersects ``[lo, hi]``. ``states=None``
        means every state. A committed file superseded by another committed file
        is reported as ``RETIRED``.
        """

    @abc.abstractmethod
    def files_with_guid(self, guid: str) -> list[TagFile]:
        """Committed TagFiles whose rows reference the file GUID."""

    @abc.abstractmethod
    def absorbed_message_ids(self, message_ids: Iterable[str]) -> set[str]:
        """The subset of ``message_ids`` already absorbed by committed files."""

    # -- trigger menus -----------------------------------------------------
    @abc.abstractmethod
    def put_trigger_menu(self, menu: TriggerMenu) -> None:
        """Store a menu; replacing an identical one is a no-op, a different one
        under the same (key, level) raises ``AlreadyExistsError``."""

    @abc.abstractmethod
    def get_trigger_menu(self, key: int, level: str) -> TriggerMenu:
        """The menu of a configuration key and level; ``NotFoundError`` if missing."""

    @abc.abstractmethod
    def list_trigger_menus(self) -> list[TriggerMenu]:
        """All menus, sorted by (key, level)."""

    # -- change detection --------------------------------------------------
    @abc.abstractmethod
    def change_token(self) -> Hashable:
        """An opaque value that differs whenever the catalog has changed since it was read.

        Cheap (microseconds to one round trip), so that a cache of listings can ask
        it every second and list again only when it differs. The contract:

        * Any write that changes what a listing returns, through this object or
          any other (another connection, another process), makes later tokens
          differ from earlier ones: collections and datasets created; TagFiles
          added, committed, retired (or superseded), removed; menus stored.
        * The change is visible to listings made after the token that shows it
          was read. So a cache reads the token FIRST, then lists, and keeps the
          token with what it listed: an equal token later means the listing is
          still current.
        * Tokens may change without a visible change (spurious changes cost a
          listing, nothing else). Compare tokens of the same catalog object
          only, with ``==``; their values mean nothing else.
        """

    # -- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the object is unusable afterwards."""

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
