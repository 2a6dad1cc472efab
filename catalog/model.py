"""Catalog entities: collections, datasets, TagFiles (one per immutable map-file)."""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field

from eventindex.records.schema import RecordKind, key_columns


class FileKind(enum.StrEnum):
    MASTER = "master"
    EXTENSION = "extension"
    INDEX = "index"
    CHUNK = "chunk"
    OVERLAP = "overlap"
    DIRECTOR = "director"


class FileState(enum.StrEnum):
    WRITING = "writing"
    COMMITTED = "committed"
    RETIRED = "retired"


Key = tuple[int, ...]


@dataclass(frozen=True)
class Collection:
    """A set of records with one key: an event project+stream, or an object catalog."""

    name: str
    kind: RecordKind
    description: str = ""
    created_at: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, ...]:
        return key_columns(self.kind)


@dataclass(frozen=True)
class Dataset:
    """One processing output of a collection (a TagSet), e.g. the AOD of ``r7562_p2521``.

    ``upstream`` names the dataset this one was derived from, so consistency
    checks can compare stages; ``run_min``/``run_max`` is filled for event data.
    """

    name: str
    collection: str
    format: str = ""
    processing_tag: str = ""
    project: str = ""
    stream: str = ""
    upstream: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)


def new_file_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class TagFile:
    """One immutable Parquet map-file and everything the catalog knows about it.

    ``part`` names the vertical part (extension name), the index name, or the
    chunk id; it is ``""`` for master files. ``key_min``/``key_max`` are the
    first and last collection keys in the file. ``message_ids`` are the producer
    messages whose records the file absorbed (idempotent redelivery);
    ``guids`` the file GUIDs its rows reference; ``supersedes`` the file ids it
    replaces (compaction): once it is committed those count as retired.
    ``retired_at`` is when the file stopped being live (its successor's commit
    time, or the retirement), ``None`` while it is live or when the catalog
    does not know (entries retired before the catalog recorded it).
    """

    file_id: str
    dataset: str
    collection: str
    kind: FileKind
    uri: str
    part: str = ""
    rows: int = 0
    bytes: int = 0
    checksum: str = ""
    key_min: Key = ()
    key_max: Key = ()
    state: FileState = FileState.WRITING
    created_at: float = field(default_factory=time.time)
    committed_at: float | None = None
    retired_at: float | None = None
    message_ids: tuple[str, ...] = ()
    guids: tuple[str, ...] = ()
    supersedes: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)
