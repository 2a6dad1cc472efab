"""Rules every catalog backend enforces the same way, so the contract suite sees one behaviour."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from catalog.model import FileState, TagFile
from eventindex.errors import AlreadyExistsError, CatalogError, NotFoundError

KEY_VALUE_MIN = -(2**63)
KEY_VALUE_LIMIT = 2**64  # key components are int64 or uint64


class SupersededError(CatalogError):
    """A commit supersedes a file that another commit has already replaced or retired.

    Two jobs that compacted the same input: the second one must drop its output.
    """


def check_tagfile(tagfile: TagFile) -> None:
    """Reject entries whose key range cannot be indexed or compared."""
    if bool(tagfile.key_min) != bool(tagfile.key_max):
        raise CatalogError(
            f"TagFile {tagfile.file_id}: key_min and key_max must both be set or both be empty"
        )
    if tagfile.key_min > tagfile.key_max:
        raise CatalogError(
            f"TagFile {tagfile.file_id}: key_min {tagfile.key_min} > key_max {tagfile.key_max}"
        )
    if tagfile.file_id in tagfile.supersedes:
        raise CatalogError(f"TagFile {tagfile.file_id} cannot supersede itself")
    for value in (*tagfile.key_min, *tagfile.key_max):
        if not KEY_VALUE_MIN <= value < KEY_VALUE_LIMIT:
            raise CatalogError(f"TagFile {tagfile.file_id}: key value {value} exceeds 64 bits")


def check_batch_supersedes(tagfiles: Sequence[TagFile], known: set[str]) -> None:
    """Committed entries of a batch may supersede files already registered or earlier in it."""
    seen = set(known)
    taken: set[str] = set()
    for tagfile in tagfiles:
        if tagfile.state is FileState.COMMITTED:
            missing = sorted(set(tagfile.supersedes) - seen)
            if missing:
                raise NotFoundError(
                    f"TagFile {tagfile.file_id} supersedes unknown files: {', '.join(missing)}"
                )
            twice = sorted(taken.intersection(tagfile.supersedes))
            if twice:
                raise SupersededError(
                    f"TagFile {tagfile.file_id} supersedes {', '.join(twice)}, which an "
                    "earlier entry of the batch supersedes"
                )
            taken.update(tagfile.supersedes)
        seen.add(tagfile.file_id)


def check_supersedes_live(tagfile: TagFile, states: Mapping[str, FileState]) -> None:
    """Refuse to commit ``tagfile`` if a file it supersedes is already retired.

    ``states`` are the current (effective) states of the superseded files.
    """
    retired = sorted(s for s in tagfile.supersedes if states.get(s) is FileState.RETIRED)
    if retired:
        raise SupersededError(
            f"TagFile {tagfile.file_id} supersedes {', '.join(retired)}, already retired "
            "(replaced by another commit): drop this file"
        )


def in_first_key_range(tagfile: TagFile, lo: int, hi: int) -> bool:
    """Whether the file's first-key-component range intersects ``[lo, hi]``."""
    return bool(tagfile.key_min) and tagfile.key_min[0] <= hi and tagfile.key_max[0] >= lo


def listing_order(tagfile: TagFile) -> tuple[str, tuple[int, ...], str]:
    """The order ``list_tagfiles`` returns: dataset, first key, file id."""
    return (tagfile.dataset, tagfile.key_min, tagfile.file_id)


def check_batch(tagfiles: Sequence[TagFile]) -> list[str]:
    """Check every entry of a batch and that no file id appears twice; returns the ids."""
    ids = [t.file_id for t in tagfiles]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise AlreadyExistsError(f"file ids given twice in one batch: {', '.join(twice)}")
    for tagfile in tagfiles:
        check_tagfile(tagfile)
    return ids
