"""File system access by URI through ``pyarrow.fs``: local paths, file://, hdfs://, s3://."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from functools import lru_cache
from typing import Protocol
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import xxhash

from eventindex.errors import StorageError


class Digest(Protocol):
    """A running hash of bytes (hashlib's and xxhash's objects are both)."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


# New files are checksummed with XXH3-128: it catches any damage as well as a
# cryptographic hash (nothing here defends against a forger) at ~30x blake2b's
# speed, which was 8 % of a partitioning job's CPU. Catalog entries name their
# algorithm (``<algorithm>:<hex>``), so files checksummed with blake2b still verify.
CHECKSUM_ALGORITHM = "xxh3-128"
_DIGESTS: dict[str, Callable[[], Digest]] = {
    "xxh3-128": xxhash.xxh3_128,
    "blake2b": lambda: hashlib.blake2b(digest_size=16),
}
_CHUNK = 4 * 1024 * 1024
_LOCAL = pafs.LocalFileSystem()


@lru_cache(maxsize=64)
def _filesystem_for(prefix: str) -> pafs.FileSystem:
    filesystem, _ = pafs.FileSystem.from_uri(prefix)
    return filesystem


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and the path inside it for a URI or a local path.

    Local paths become absolute; ``file://`` URIs may name ``localhost`` and
    may be percent-encoded. Other file systems are cached per scheme and
    authority, so resolving is cheap on hot paths and an HDFS connection is
    opened once per process.
    """
    if not uri:
        raise StorageError("empty path")
    if "://" not in uri:
        return _LOCAL, posixpath.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(
                f"{uri}: file:// URIs must name a local path, not host {parts.netloc}"
            )
        return _LOCAL, posixpath.abspath(unquote(parts.path) or "/")
    authority = rest.split("/", 1)[0]
    try:
        filesystem = _filesystem_for(f"{scheme}://{authority}/")
        _, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"cannot open file system for {uri!r}: {exc}") from exc
    return filesystem, path


def join(root: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with '/' separators."""
    return posixpath.join(root.rstrip("/") or "/", *parts)


def _info(uri: str) -> pafs.FileInfo:
    filesystem, path = resolve(uri)
    try:
        return filesystem.get_file_info(path)
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{uri}: cannot stat: {exc}") from exc


def file_size(uri: str) -> int:
    """Size in bytes of a file; ``StorageError`` when there is no such file."""
    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise StorageError(f"no such file: {uri}")
    return int(info.size)


def exists(uri: str) -> bool:
    """Whether ``uri`` names a file (a directory does not count)."""
    return bool(_info(uri).type == pafs.FileType.File)


def new_digest(algorithm: str = CHECKSUM_ALGORITHM) -> Digest:
    """An empty running hash of a checksum algorithm (``StorageError`` if unknown)."""
    try:
        return _DIGESTS[algorithm]()
    except KeyError:
        raise StorageError(
            f"unknown checksum algorithm {algorithm!r} (known: {sorted(_DIGESTS)})"
        ) from None


def checksum_algorithm(checksum: str) -> str:
    """The algorithm a ``<algorithm>:<hex>`` checksum was made with."""
    algorithm, sep, _ = checksum.partition(":")
    if not sep or algorithm not in _DIGESTS:
        raise StorageError(f"checksum {checksum!r} does not name a known algorithm")
    return algorithm


def file_checksum(uri: str, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """``<algorithm>:<hex>`` of the file's bytes, XXH3-128 unless told otherwise."""
    filesystem, path = resolve(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise StorageError(f"no such file: {uri}")
    digest = new_digest(algorithm)
    try:
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{uri}: cannot read: {exc}") from exc
    return f"{algorithm}:{digest.hexdigest()}"


def list_files(root: str, suffix: str = "") -> list[str]:
    """Every file under ``root`` (recursively) whose name ends with ``suffix``, as URIs.

    Hidden files (a name starting with '.', such as the temporary files of
    writes in progress) are left out. A missing root lists nothing; a root
    that is a file lists itself.
    """
    filesystem, path = resolve(root)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return []
    if kind == pafs.FileType.File:
        return [root] if root.endswith(suffix) else []
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    prefix = root.rstrip("/")
    base = path.rstrip("/")
    found = []
    for info in filesystem.get_file_info(selector):
        if (
            info.type == pafs.FileType.File
            and info.path.endswith(suffix)
            and not info.base_name.startswith(".")
        ):
            found.append(prefix + info.path[len(base) :])
    return sorted(found)


def delete_file(uri: str) -> None:
    """Delete one file; ``StorageError`` when it does not exist."""
    filesystem, path = resolve(uri)
    try:
        filesystem.delete_file(path)
    except FileNotFoundError as exc:
        raise StorageError(f"no such file: {uri}") from exc
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{uri}: cannot delete: {exc}") from exc
