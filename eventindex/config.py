"""Typed configuration: defaults file, then EVENTINDEX_CONFIG, then environment, then flags.

Every section is a pydantic model that forbids unknown keys, so a typo in a file
or a variable fails loudly, naming the key and where it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

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
    row_group_rows: int = Field(32768, ge=1024, le=4_194_304)
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
    conf: dict[str, str] = {}


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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def parse_value(raw: str) -> Any:
    """A TOML literal if it parses as one (numbers, booleans, lists), else the plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return nested


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """EVENTINDEX_<SECTION>__<KEY>[__<KEY>] variables as a nested mapping."""
    dotted = {
        name[len(ENV_PREFIX) :].lower().replace("__", "."): parse_value(value)
        for name, value in environ.items()
        if name.startswith(ENV_PREFIX) and "__" in name[len(ENV_PREFIX) :]
    }
    return _nest(dotted)


def _validate(data: dict[str, Any], sources: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"bad configuration ({sources}): {problems}") from exc


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
    sources = []
    if DEFAULTS_FILE.exists():
        data = _read_toml(DEFAULTS_FILE)
        sources.append(str(DEFAULTS_FILE))
    chosen = path if path is not None else environ.get(ENV_CONFIG_FILE)
    if chosen:
        data = _merge(data, _read_toml(Path(chosen)))
        sources.append(str(chosen))
    env = env_overrides(environ)
    if env:
        data = _merge(data, env)
        sources.append("environment")
    if overrides:
        data = _merge(data, _nest({k: v for k, v in overrides.items() if v is not None}))
        sources.append("flags")
    return _validate(data, ", ".join(sources) or "built-in defaults")
