"""File system access by URI through ``pyarrow.fs``: local paths, hdfs://, s3://."""

from __future__ import annotations

import hashlib
import posixpath
from functools import lru_cache

import pyarrow.fs as pafs

from eventindex.errors import StorageError

CHECKSUM_ALGORITHM = "blake2b"
_CHUNK = 4 * 1024 * 1024


@lru_cache(maxsize=64)
def _filesystem_for(prefix: str) -> pafs.FileSystem:
    filesystem, _ = pafs.FileSystem.from_uri(prefix)
    return filesystem


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and the path inside it for a URI or a local path.

    File systems are cached per scheme and authority, so resolving is cheap on
    hot paths and an HDFS connection is opened once per process.
    """
    if "://" not in uri:
        return pafs.LocalFileSystem(), posixpath.abspath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    authority = rest.split("/", 1)[0]
    try:
        filesystem = _filesystem_for(f"{scheme}://{authority}/")
        _, path = pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, OSError) as exc:  # type: ignore[attr-defined]
        raise StorageError(f"cannot open file system for {uri!r}: {exc}") from exc
    return filesystem, path


def join(root: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with '/' separators."""
    return posixpath.join(root.rstrip("/") or "/", *parts)


def file_size(uri: str) -> int:
    filesystem, path = resolve(uri)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise StorageError(f"no such file: {uri}")
    return int(info.size)


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return bool(filesystem.get_file_info(path).type == pafs.FileType.File)


def file_checksum(uri: str) -> str:
    """``blake2b:<hex>`` of the file's bytes (fast, and strong enough to catch any damage)."""
    filesystem, path = resolve(uri)
    digest = hashlib.blake2b(digest_size=16)
    try:
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise StorageError(f"no such file: {uri}") from exc
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def list_files(root: str, suffix: str = "") -> list[str]:
    """Every file under ``root`` (recursively) whose name ends with ``suffix``, as URIs."""
    filesystem, path = resolve(root)
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    prefix = root.rstrip("/")
    base = path.rstrip("/")
    found = []
    for info in filesystem.get_file_info(selector):
        if info.type == pafs.FileType.File and info.path.endswith(suffix):
            found.append(prefix + info.path[len(base) :])
    return sorted(found)


def delete_file(uri: str) -> None:
    filesystem, path = resolve(uri)
    filesystem.delete_file(path)
