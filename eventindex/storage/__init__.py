"""Map-file storage: sorted Parquet files with an in-memory key index, on pyarrow file systems."""

from eventindex.storage.filesystem import (
    checksum_algorithm,
    delete_file,
    exists,
    file_checksum,
    file_size,
    join,
    list_files,
    resolve,
)
from eventindex.storage.mapfile import (
    DEFAULT_KEY_CACHE,
    QUERY_INDEX,
    KeyCache,
    MapFileInfo,
    MapFileReader,
    MapFileWriter,
    WriteOptions,
    sort_by_key,
    write_mapfile,
)

__all__ = [
    "DEFAULT_KEY_CACHE",
    "QUERY_INDEX",
    "KeyCache",
    "MapFileInfo",
    "MapFileReader",
    "MapFileWriter",
    "WriteOptions",
    "checksum_algorithm",
    "delete_file",
    "exists",
    "file_checksum",
    "file_size",
    "join",
    "list_files",
    "resolve",
    "sort_by_key",
    "write_mapfile",
]
