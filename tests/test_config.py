"""Configuration layers: defaults file < EVENTINDEX_CONFIG < environment < flags."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pydantic
import pytest

from eventindex.config import (
    DEFAULTS_FILE,
    Settings,
    SpatialSettings,
    load_config,
    machine_memory_bytes,
    parse_value,
)
from eventindex.errors import ConfigError


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_toml(
        tmp_path / "site.toml",
        """
[store]
root = "/data/store"

[catalog]
path = "/data/catalog.sqlite"

[catalog.hbase]
host = "hbase.example.org"
port = 9095

[webservice]
tokens = ["from-file"]
""",
    )


# -- layers ---------------------------------------------------------------------
def test_defaults_are_the_defaults_file() -> None:
    settings = load_config(environ={})
    with DEFAULTS_FILE.open("rb") as handle:
        defaults = tomllib.load(handle)
    assert settings.store.root == defaults["store"]["root"] == "var/store"
    assert settings.catalog.type == "sqlite"
    assert settings.catalog.path == "var/catalog.sqlite"
    assert settings.catalog.hbase.port == 9090
    assert settings.mapfile.row_group_rows == defaults["mapfile"]["row_group_rows"]
    assert settings.webservice.tokens == []
    assert settings.spark.conf == defaults["spark"]["conf"]


def test_model_defaults_equal_the_defaults_file() -> None:
    """An installed package without conf/ must behave as the source tree does."""
    assert Settings() == load_config(environ={})


def test_config_file_overrides_defaults(config_file: Path) -> None:
    settings = load_config(environ={"EVENTINDEX_CONFIG": str(config_file)})
    assert settings.store.root == "/data/store"
    assert settings.catalog.path == "/data/catalog.sqlite"
    assert settings.catalog.hbase.host == "hbase.example.org"
    assert settings.catalog.hbase.port == 9095
    # Keys the file does not name keep their defaults, also inside a nested section.
    assert settings.catalog.hbase.table_prefix == "eventindex_"
    assert settings.catalog.type == "sqlite"
    assert settings.webservice.tokens == ["from-file"]


def test_path_argument_wins_over_environment_file(config_file: Path, tmp_path: Path) -> None:
    other = write_toml(tmp_path / "other.toml", '[store]\nroot = "/other"\n')
    settings = load_config(other, environ={"EVENTINDEX_CONFIG": str(config_file)})
    assert settings.store.root == "/other"
    assert settings.catalog.hbase.port == 9090


def test_environment_overrides_file(config_file: Path) -> None:
    environ = {
        "EVENTINDEX_CONFIG": str(config_file),
        "EVENTINDEX_STORE__ROOT": "hdfs://namenode:8020/eventindex",
        "EVENTINDEX_CATALOG__HBASE__PORT": "9091",
        "EVENTINDEX_CATALOG__TYPE": "hbase",
        "EVENTINDEX_WEBSERVICE__TOKENS": '["a", "b"]',
        "EVENTINDEX_MAPFILE__COMPRESSION_LEVEL": "7",
    }
    settings = load_config(environ=environ)
    assert settings.store.root == "hdfs://namenode:8020/eventindex"
    assert settings.catalog.hbase.port == 9091
    assert settings.catalog.hbase.host == "hbase.example.org"  # from the file, not replaced
    assert settings.catalog.type == "hbase"
    assert settings.webservice.tokens == ["a", "b"]
    assert settings.mapfile.compression_level == 7


def test_flags_override_environment(config_file: Path) -> None:
    environ = {
        "EVENTINDEX_CONFIG": str(config_file),
        "EVENTINDEX_CATALOG__HBASE__PORT": "9091",
        "EVENTINDEX_STORE__ROOT": "/from/env",
    }
    overrides: dict[str, Any] = {
        "catalog.hbase.port": 9092,
        "store.root": "/from/flag",
        "catalog.path": None,  # an unset flag changes nothing
    }
    settings = load_config(overrides=overrides, environ=environ)
    assert settings.catalog.hbase.port == 9092
    assert settings.store.root == "/from/flag"
    assert settings.catalog.path == "/data/catalog.sqlite"


def test_os_environ_is_the_default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTINDEX_BROKER__URL", "stomp://broker:61613")
    assert load_config().broker.url == "stomp://broker:61613"


def test_variables_without_a_section_separator_are_not_settings() -> None:
    environ = {"EVENTINDEX_TEST_HBASE": "localhost:9090", "EVENTINDEX_WHATEVER": "1"}
    assert load_config(environ=environ) == load_config(environ={})


def test_string_settings_keep_values_that_look_like_numbers() -> None:
    environ = {
        "EVENTINDEX_SPARK__APP_NAME": "2024",
        "EVENTINDEX_STORE__ROOT": "1e3",
        "EVENTINDEX_WEBSERVICE__HOST": "true",
    }
    settings = load_config(environ=environ)
    assert settings.spark.app_name == "2024"
    assert settings.store.root == "1e3"
    assert settings.webservice.host == "true"


def test_table_settings_take_dotted_names() -> None:
    """Spark's configuration keys hold dots: after ``spark.conf.`` the rest is one name."""
    overrides = {
        "spark.conf.spark.sql.shuffle.partitions": "2",
        "spark.conf.spark.ui.enabled": "false",
    }
    settings = load_config(overrides=overrides, environ={})
    assert settings.spark.conf == {
        "spark.sql.shuffle.partitions": "2",
        "spark.ui.enabled": "false",
    }
    assert parse_value("4", "spark.conf.spark.sql.shuffle.partitions") == "4"
    assert parse_value("4", "spark.conf") == 4


def test_settings_are_frozen() -> None:
    settings = load_config(environ={})
    with pytest.raises(pydantic.ValidationError):
        settings.store.root = "/elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "value"),
    [("9091", 9091), ("true", True), ("1.5", 1.5), ('["a", "b"]', ["a", "b"])]
    + [(text, text) for text in ("var/store", "stomp://h:61613", ":memory:", "127.0.0.1")],
)
def test_parse_value(raw: str, value: object) -> None:
    assert parse_value(raw) == value


# -- errors ---------------------------------------------------------------------
def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "typo.toml", '[catalog]\nptah = "x.sqlite"\n')
    with pytest.raises(ConfigError, match=r"catalog\.ptah") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_unknown_key_in_nested_section_of_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "typo.toml", "[catalog.hbase]\nprot = 9091\n")
    with pytest.raises(ConfigError, match=r"catalog\.hbase\.prot"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("EVENTINDEX_STORE__ROOTS", "store.roots"),
        ("EVENTINDEX_CATALOG__HBASE__HOTS", "catalog.hbase.hots"),
        ("EVENTINDEX_NOPE__KEY", "nope"),
    ],
)
def test_unknown_key_in_environment(variable: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(environ={variable: "1"})
    assert variable in str(info.value), "the message names the variable to fix"


def test_unknown_key_in_flags() -> None:
    with pytest.raises(ConfigError, match=r"catalog\.hbase\.hots") as info:
        load_config(overrides={"catalog.hbase.hots": "x"}, environ={})
    assert "flag" in str(info.value)


@pytest.mark.parametrize(
    ("environ", "overrides", "key"),
    [
        ({"EVENTINDEX_CATALOG__HBASE__PORT": "70000"}, {}, "catalog.hbase.port"),
        ({}, {"catalog.hbase.port": 70000}, "catalog.hbase.port"),
        ({}, {"webservice.port": 0}, "webservice.port"),
        ({"EVENTINDEX_CATALOG__TYPE": "mysql"}, {}, "catalog.type"),
        ({}, {"catalog.type": "mysql"}, "catalog.type"),
        ({}, {"mapfile.compression": "brotli"}, "mapfile.compression"),
        ({}, {"mapfile.row_group_rows": "many"}, "mapfile.row_group_rows"),
        ({"EVENTINDEX_WEBSERVICE__TOKENS": "secret"}, {}, "webservice.tokens"),
    ],
)
def test_bad_value_names_the_key(
    environ: dict[str, str], overrides: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides, environ=environ)


def test_bad_value_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "bad.toml", '[catalog]\ntype = "mysql"\n')
    with pytest.raises(ConfigError, match=r"catalog\.type") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_later_layer_fixes_an_earlier_bad_value(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "bad.toml", "[webservice]\nport = 70000\n")
    settings = load_config(path, overrides={"webservice.port": 8081}, environ={})
    assert settings.webservice.port == 8081


def test_invalid_toml_names_the_path(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "broken.toml", "[store\nroot = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(environ={"EVENTINDEX_CONFIG": str(path)})
    assert str(path) in str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(environ={"EVENTINDEX_CONFIG": str(path)})
    assert str(path) in str(info.value)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert str(tmp_path) in str(info.value)


def test_flag_that_sets_a_section_to_a_value() -> None:
    with pytest.raises(ConfigError, match="store"):
        load_config(overrides={"store": "x", "store.root": "y"}, environ={})
    with pytest.raises(ConfigError, match="store"):
        load_config(overrides={"store": 5}, environ={})


def test_partition_memory_defaults_to_a_third_of_the_machine() -> None:
    assert load_config().spatial.partition_memory_mb == 0
    third = SpatialSettings().partition_memory_bytes
    assert third == max(machine_memory_bytes() // 3, 256 << 20)
    assert 0 < machine_memory_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert SpatialSettings(partition_memory_mb=64).partition_memory_bytes == 64 << 20
    with pytest.raises(pydantic.ValidationError):
        SpatialSettings(partition_memory_mb=-1)
