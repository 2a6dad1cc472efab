"""Typed configuration: defaults file, then EVENTINDEX_CONFIG, then environment, then flags.

Every section is a pydantic model that forbids unknown keys, so a typo in a file
or a variable fails loudly, naming the key and where it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from eventindex.errors import ConfigError

ENV_PREFIX = "EVENTINDEX_"
ENV_CONFIG_FILE = "EVENTINDEX_CONFIG"
DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "conf" / "eventindex.toml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreSettings(Section):
    root: str = Field("var/store", description="Root URI of the map-file store.")


class HBaseSettings(Section):
    host: str = "localhost"
    port: int = Field(9090, ge=1, le=65535)
    table_prefix: str = "eventindex_"
    timeout_ms: int = Field(10000, gt=0)


class CatalogSettings(Section):
    type: Literal["sqlite", "hbase"] = "sqlite"
    path: str = Field("var/catalog.sqlite", description="SQLite file, or ':memory:'.")
    gc_grace_seconds: float = Field(
        21_600.0,
        ge=0,
        description="`catalog gc` deletes a retired file this long after its retirement: "
        "queries and scans that listed it before may still read it.",
    )
    hbase: HBaseSettings = HBaseSettings()


class MapFileSettings(Section):
    row_group_rows: int = Field(16384, ge=1024, le=4_194_304)
    compression: Literal["zstd", "lz4", "snappy", "gzip", "none"] = "zstd"
    compression_level: int | None = 3


class CodecSettings(Section):
    message_bytes: int = Field(10_000, ge=512)
    max_message_bytes: int = Field(4_000_000, ge=1024)


class BrokerSettings(Section):
    """Where producers and consumers connect, and how ``eventindex broker start`` runs ActiveMQ."""

    url: str = "memory://"
    user: str = ""
    password: str = ""
    heartbeat_ms: int = Field(10_000, ge=0, description="STOMP heart-beat period; 0 is off.")
    receipt_timeout_s: float = Field(30.0, gt=0, description="Wait for a send's RECEIPT.")
    reconnect_attempts: int = Field(60, ge=1, description="Connection tries per broker.")
    reconnect_delay_s: float = Field(0.5, gt=0, description="First wait between tries.")
    reconnect_delay_max_s: float = Field(5.0, gt=0, description="Longest wait between tries.")
    ssl_key_file: str = ""
    ssl_cert_file: str = ""
    ssl_ca_file: str = ""
    max_redeliveries: int = Field(5, ge=0, description="Nacks redelivered before the DLQ.")
    redelivery_delay_ms: int = Field(
        2000, ge=1000, description="First wait before a nacked message returns (ActiveMQ: >= 1 s)."
    )
    # The broker `eventindex broker start` runs.
    activemq_home: str = "/usr/share/activemq"
    data_dir: str = "var/activemq"
    listen_host: str = "127.0.0.1"
    stomp_port: int = Field(61613, ge=1, le=65535)
    stomp_ssl_port: int = Field(61614, ge=1, le=65535)
    openwire_port: int = Field(61616, ge=1, le=65535)
    heap_mb: int = Field(1024, ge=128)
    memory_limit_mb: int = Field(256, ge=16, description="Broker memory for pending messages.")
    store_limit_mb: int = Field(16_384, ge=64, description="KahaDB disk limit.")
    temp_limit_mb: int = Field(4096, ge=64)
    journal_sync: Literal["always", "periodic", "never"] = Field(
        "always", description="KahaDB journal sync: before each confirmation, or each second."
    )
    start_timeout_s: float = Field(90.0, gt=0)


class ProducerSettings(Section):
    transaction_messages: int = Field(
        1000, ge=1, description="Messages sent in one broker transaction (confirmed together)."
    )
    wait_seconds: float = Field(300.0, gt=0, description="Longest wait for stored confirmations.")


class ConsumerSettings(Section):
    workers: int = Field(1, ge=1, le=64)
    prefetch: int = Field(
        3000, ge=1, description="Unacknowledged messages a worker holds; a flush comes first."
    )
    flush_rows: int = Field(200_000, ge=1, description="Flush once this many events are pending.")
    flush_bytes: int = Field(
        128 * 2**20, ge=1, description="Flush once this many message bytes are pending."
    )
    flush_seconds: float = Field(5.0, gt=0, description="Flush pending events at least this often.")
    flush_idle_seconds: float = Field(
        0.25, gt=0, description="Flush when no message came for this long."
    )


class WebServiceSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    tokens: list[str] = []
    # Request limits: crossing one is a 4xx problem naming the field and the limit.
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest request body; larger ones get 413 unparsed."
    )
    max_lookup_events: int = Field(
        100_000, ge=1, description="Most (run, event) pairs in one POST /events/lookup (413)."
    )
    max_select_rows: int = Field(
        0, ge=0, description="Cap on the rows one POST /events/select streams; 0: no cap."
    )
    select_chunk_bytes: int = Field(
        64 * 1024, ge=1, description="NDJSON bytes gathered before each streamed chunk."
    )
    reader_max_open_files: int = Field(1024, ge=1, description="Map-file readers kept open.")
    reader_key_cache_bytes: int = Field(
        2**30, ge=0, description="Budget of the in-memory cache of row-group keys (bytes)."
    )
    reader_refresh_seconds: float = Field(
        1.0, ge=0, description="How stale the Reader's view of the catalog may be."
    )


class SparkSettings(Section):
    master: str = "local[*]"
    app_name: str = "eventindex"
    conf: dict[str, str] = {"spark.sql.shuffle.partitions": "8"}


class QuerySettings(Section):
    registry: str = Field("var/queries.sqlite", description="SQLite file of the query registry.")
    results_dir: str = Field("var/query-results", description="Where results are written.")
    result_expiry_seconds: float = Field(86400.0, gt=0)
    max_result_rows: int = Field(1_000_000, ge=1)
    max_queries_per_walk: int = Field(64, ge=1)
    direct_max_units: int = Field(4, ge=0, description="Fewer units: no scan, answer at once.")
    poll_seconds: float = Field(0.5, gt=0)
    lease_seconds: float = Field(120.0, gt=0)
    executor: Literal["pyarrow", "spark"] = Field(
        "pyarrow", description="Who evaluates the scan worker's walks: this process or Spark."
    )
    spark_units_per_step: int = Field(
        8, ge=1, description="Units one Spark job of a walk reads (queries join between jobs)."
    )
    prefetch: bool = Field(True, description="Decode the next unit while evaluating this one.")
    worker_nice: int = Field(
        10, ge=0, le=19, description="Niceness the scan worker adds to itself (0: none)."
    )
    worker_threads: int = Field(
        0, ge=0, description="Arrow decoding threads of the scan worker (0: one per core)."
    )


class SpatialSettings(Section):
    """The Qserv grid new object catalogs are partitioned with (Qserv's defaults)."""

    num_stripes: int = Field(85, ge=1, le=2048, description="Declination stripes (S).")
    num_sub_stripes: int = Field(12, ge=1, le=256, description="Sub-stripes per stripe (s).")
    overlap_arcsec: float = Field(60.0, ge=0.0, le=36000.0, description="Overlap radius (R).")
    row_group_rows: int = Field(4096, ge=256, le=1_048_576, description="Rows per row group.")
    compression: Literal["zstd", "lz4", "snappy", "gzip", "none"] = Field(
        "lz4", description="Of chunk files: positions compress as well with lz4 as with zstd."
    )
    partition_memory_mb: int = Field(
        0,
        ge=0,
        description=(
            "MiB of assigned rows held in memory before buckets spill to disk "
            "(0: a third of the machine's memory)."
        ),
    )
    chunks_per_file: int = Field(
        32,
        ge=1,
        le=1 << 20,
        description="Neighbouring chunks per file of a new object table (child tables "
        "take their director's).",
    )

    @property
    def partition_memory_bytes(self) -> int:
        """The partitioner's in-memory budget in bytes, ``partition_memory_mb`` resolved."""
        if self.partition_memory_mb:
            return self.partition_memory_mb << 20
        return max(machine_memory_bytes() // 3, 256 << 20)


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when this process runs under a lower one."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return int(total)
    return min(int(total), int(limit)) if limit.isdigit() else int(total)


class CompactionSettings(Section):
    """How ``eventindex spark compact`` groups small TagFiles into large ones."""

    target_rows: int = Field(
        4_000_000, ge=2, description="Most rows of one compacted file (a group stops below it)."
    )
    target_bytes: int = Field(
        1_073_741_824, ge=1024, description="Most input bytes merged into one compacted file."
    )
    small_file_rows: int = Field(
        1_000_000, ge=1, description="Files with fewer rows than this are compacted."
    )


class Settings(Section):
    store: StoreSettings = StoreSettings()
    catalog: CatalogSettings = CatalogSettings()
    mapfile: MapFileSettings = MapFileSettings()
    codec: CodecSettings = CodecSettings()
    broker: BrokerSettings = BrokerSettings()
    producer: ProducerSettings = ProducerSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    webservice: WebServiceSettings = WebServiceSettings()
    spark: SparkSettings = SparkSettings()
    queries: QuerySettings = QuerySettings()
    spatial: SpatialSettings = SpatialSettings()
    compaction: CompactionSettings = CompactionSettings()


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _split_key(key: str) -> list[str]:
    """The parts of a dotted key; inside a table setting (``spark.conf``) the rest of the
    key is one name, since Spark's own keys hold dots."""
    parts = key.split(".")
    model: type[BaseModel] = Settings
    for position, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part)
        if field is None:
            break
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        if get_origin(annotation) is dict:
            return [*parts[: position + 1], ".".join(parts[position + 1 :])]
        break
    return parts


def _expects_text(key: str) -> bool:
    """Whether the setting at dotted ``key`` is a string, or a value of a str-to-str table."""
    model: type[BaseModel] = Settings
    parts = _split_key(key)
    for position, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        if position == len(parts) - 1:
            return annotation in (str, str | None)
        return bool(annotation == dict[str, str] and position == len(parts) - 2)
    return False


def parse_value(raw: str, key: str | None = None) -> Any:
    """A TOML literal if it parses as one (numbers, booleans, lists), else the plain string.

    With the dotted ``key`` of a string setting the text is kept as it is, so a
    host, path or name that looks like a number (``2024``, ``1e3``) stays text.
    """
    if key is not None and _expects_text(key):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = _split_key(key)
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return nested


def _env_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """Dotted key -> variable name of every EVENTINDEX_<SECTION>__<KEY> variable."""
    return {
        name[len(ENV_PREFIX) :].lower().replace("__", "."): name
        for name in environ
        if name.startswith(ENV_PREFIX) and "__" in name[len(ENV_PREFIX) :]
    }


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """EVENTINDEX_<SECTION>__<KEY>[__<KEY>] variables as a nested mapping."""
    return _nest(
        {key: parse_value(environ[name], key) for key, name in _env_variables(environ).items()}
    )


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{dotted}.")
        else:
            yield dotted


def _origin(origins: Mapping[str, str], key: str) -> str:
    """Where the value at ``key`` (or the keys under it, or the key above it) was set."""
    if key in origins:
        return origins[key]
    below = sorted({o for k, o in origins.items() if k.startswith(f"{key}.")})
    if below:
        return ", ".join(below)
    above = [k for k in origins if key.startswith(f"{k}.")]
    return origins[max(above, key=len)] if above else ""


def _validate(data: dict[str, Any], origins: Mapping[str, str]) -> Settings:
    try:
        return Settings.model_validate(data)
    except PydanticValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            origin = _origin(origins, key)
            message = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}{f' (from {origin})' if origin else ''}: {message}")
        raise ConfigError(f"bad configuration: {'; '.join(problems)}") from exc


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Load settings in order: defaults file, config file, environment, then flag overrides.

    ``path`` wins over ``$EVENTINDEX_CONFIG``; ``overrides`` maps dotted keys
    (``"catalog.type"``) to values, as command-line flags give them.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    # Dotted key -> where its value came from, so an error can say what to fix.
    origins: dict[str, str] = {}

    def layer(update: dict[str, Any], origin: Callable[[str], str]) -> None:
        nonlocal data
        data = _merge(data, update)
        origins.update({key: origin(key) for key in _leaves(update)})

    if DEFAULTS_FILE.exists():
        layer(_read_toml(DEFAULTS_FILE), lambda _key: str(DEFAULTS_FILE))
    chosen = path if path is not None else environ.get(ENV_CONFIG_FILE)
    if chosen:
        layer(_read_toml(Path(chosen)), lambda _key: str(chosen))
    variables = _env_variables(environ)
    layer(env_overrides(environ), lambda key: variables.get(key, "environment"))
    if overrides:
        flags = {k: v for k, v in overrides.items() if v is not None}
        layer(_nest(flags), lambda key: f"flag {key}" if key in flags else "flags")
    return _validate(data, origins)
