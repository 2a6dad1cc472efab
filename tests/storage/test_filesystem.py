"""URIs and local paths through pyarrow.fs: resolving, listing, sizes and checksums."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import xxhash

from eventindex.errors import StorageError
from eventindex.storage import (
    checksum_algorithm,
    delete_file,
    exists,
    file_checksum,
    file_size,
    join,
    list_files,
    resolve,
)


def test_local_paths_resolve_to_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    filesystem, path = resolve("var/store/a.parquet")
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert path == f"{tmp_path}/var/store/a.parquet"
    assert resolve("/x/../y/a.parquet")[1] == "/y/a.parquet"


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("file:///data/store/a.parquet", "/data/store/a.parquet"),
        ("file://localhost/data/store/a.parquet", "/data/store/a.parquet"),
        ("file:///data/with%20space/a.parquet", "/data/with space/a.parquet"),
        ("file:///", "/"),
    ],
)
def test_file_uris_resolve_to_local_paths(uri: str, path: str) -> None:
    filesystem, resolved = resolve(uri)
    assert isinstance(filesystem, pafs.LocalFileSystem)
    assert resolved == path


def test_file_uris_on_other_hosts_and_empty_paths_are_refused() -> None:
    with pytest.raises(StorageError, match="elsewhere"):
        resolve("file://elsewhere/data/a.parquet")
    with pytest.raises(StorageError, match="empty path"):
        resolve("")


def test_unknown_schemes_are_storage_errors() -> None:
    with pytest.raises(StorageError, match="nosuchfs://host/a"):
        resolve("nosuchfs://host/a")


def test_join_keeps_the_scheme() -> None:
    assert join("hdfs://nn:8020/ei/", "c", "d", "f.parquet") == "hdfs://nn:8020/ei/c/d/f.parquet"
    assert join("var", "c") == "var/c"
    assert join("/", "c") == "/c"


def test_size_existence_and_checksum(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = os.urandom(9 * 2**20 + 17)  # more than two read chunks
    path.write_bytes(data)
    for name in (str(path), f"file://{path}"):
        assert exists(name)
        assert file_size(name) == len(data)
        assert file_checksum(name) == f"xxh3-128:{xxhash.xxh3_128(data).hexdigest()}"
        expected = hashlib.blake2b(data, digest_size=16).hexdigest()
        assert file_checksum(name, "blake2b") == f"blake2b:{expected}"
        assert checksum_algorithm(file_checksum(name, "blake2b")) == "blake2b"
    assert not exists(str(tmp_path))  # a directory is not a file


def test_missing_files_are_storage_errors_naming_them(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.parquet")
    assert not exists(missing)
    for call in (file_size, file_checksum, delete_file):
        with pytest.raises(StorageError, match=missing):
            call(missing)
    with pytest.raises(StorageError, match=str(tmp_path)):
        file_checksum(str(tmp_path))


def test_delete_file(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    path.write_bytes(b"x")
    delete_file(f"file://{path}")
    assert not path.exists()


def test_list_files_recursive_with_suffix_and_no_hidden_files(tmp_path: Path) -> None:
    for name in (
        "c/d/master/1.parquet",
        "c/d/master/2.parquet",
        "c/e/index/3.parquet",
        "c/notes.txt",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "c/d/master/.4.parquet.abc.tmp").write_bytes(b"partial")
    (tmp_path / "c/d/master/.5.parquet").write_bytes(b"hidden")

    root = str(tmp_path / "c")
    assert list_files(root, ".parquet") == [
        f"{root}/d/master/1.parquet",
        f"{root}/d/master/2.parquet",
        f"{root}/e/index/3.parquet",
    ]
    assert list_files(root + "/", ".txt") == [f"{root}/notes.txt"]
    assert len(list_files(root)) == 4
    assert list_files(f"file://{root}/e", ".parquet") == [f"file://{root}/e/index/3.parquet"]
    assert list_files(str(tmp_path / "nowhere")) == []
    assert list_files(f"{root}/notes.txt", ".txt") == [f"{root}/notes.txt"]
    assert list_files(f"{root}/notes.txt", ".parquet") == []
