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
    hbase: HBaseSettings = HBaseSettings()


class MapFileSettings(Section):
    row_group_rows: int = Field(16384, ge=1024, le=4_194_304)
    compression: Literal["zstd", "lz4", "snappy", "gzip", "none"] = "zstd"
    compression_level: int | None = 3


class CodecSettings(Section):
    message_bytes: int = Field(10_000, ge=512)
    max_message_bytes: int = Field(4_000_000, ge=1024)


class BrokerSettings(Section):
    url: str = "memory://"


class WebServiceSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    tokens: list[str] = []


class SparkSettings(Section):
    master: str = "local[*]"
    app_name: str = "eventindex"
    conf: dict[str, str] = {"spark.sql.shuffle.partitions": "8"}


class Settings(Section):
    store: StoreSettings = StoreSettings()
    catalog: CatalogSettings = CatalogSettings()
    mapfile: MapFileSettings = MapFileSettings()
    codec: CodecSettings = CodecSettings()
    broker: BrokerSettings = BrokerSettings()
    webservice: WebServiceSettings = WebServiceSettings()
    spark: SparkSettings = SparkSettings()


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
