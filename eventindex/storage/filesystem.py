"""File system access by URI through ``pyarrow.fs``: local paths, file://, hdfs://, s3://."""

from __future__ import annotations

import hashlib
import posixpath
from functools import lru_cache
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from eventindex.errors import StorageError

CHECKSUM_ALGORITHM = "blake2b"
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


def file_checksum(uri: str) -> str:
    """``blake2b:<hex>`` of the file's bytes (fast, and strong enough to catch any damage)."""
    filesystem, path = resolve(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise StorageError(f"no such file: {uri}")
    digest = hashlib.blake2b(digest_size=16)
    try:
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{uri}: cannot read: {exc}") from exc
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


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
