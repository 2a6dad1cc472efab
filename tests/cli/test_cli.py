"""The ``eventindex`` command, run as users run it: the installed console script in a
subprocess, with the store and catalog in a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main

from catalog import SQLiteCatalog
from eventindex import __version__
from eventindex.cli.app import app
from eventindex.generator import GeneratorSpec, generate_menus, generate_run
from eventindex.records.jsonl import read_jsonl

EVENTINDEX = Path(sys.executable).parent / "eventindex"
SPEC = GeneratorSpec(runs=2, events_per_run=1500)
GENERATE = ["generate", "--runs", "2", "--events-per-run", "1500"]
TIMEOUT_S = 120


def command_paths() -> list[list[str]]:
    """Every command and subcommand of the app, so a new one gets its --help test."""

    def walk(command: Any, path: list[str]) -> Iterator[list[str]]:
        yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTINDEX_")}
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "100"})
    env.update(extra or {})
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def assert_clean_error(self, code: int = 2) -> None:
        """Failed with ``code`` and said why, with no traceback."""
        assert self.returncode == code, self
        assert "Traceback" not in self.stderr + self.stdout, self.stderr


# Commands run in a scratch folder, so a default relative path (var/...) never lands in the
# source tree, even when a bug ignores --store or --catalog.
WORKDIR: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def scratch_workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    WORKDIR.append(tmp_path_factory.mktemp("cwd"))
    yield
    WORKDIR.pop()


def run(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Result:
    done = subprocess.run(
        [str(EVENTINDEX), *args],
        capture_output=True,
        text=True,
        env=clean_environment(env),
        cwd=cwd or WORKDIR[-1],
        timeout=TIMEOUT_S,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def run_all(*commands: list[str], env: Mapping[str, str] | None = None) -> list[Result]:
    """Run independent commands side by side (each one spends most of its time importing)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run(*args, env=env), commands))


@dataclass
class Store:
    directory: Path

    @property
    def options(self) -> list[str]:
        return [
            "--store",
            str(self.directory / "store"),
            "--catalog",
            str(self.directory / "catalog.sqlite"),
        ]

    def run(self, *args: str, env: Mapping[str, str] | None = None) -> Result:
        return run(*self.options, *args, env=env)

    def run_all(self, *commands: list[str]) -> list[Result]:
        return run_all(*([*self.options, *args] for args in commands))

    def open_catalog(self) -> SQLiteCatalog:
        return SQLiteCatalog(str(self.directory / "catalog.sqlite"))


@dataclass
class Generated(Store):
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    directory = tmp_path_factory.mktemp("cli")
    result = Store(directory).run(*GENERATE, "--output", "json")
    assert result.returncode == 0, result.stderr
    return Generated(directory, result.json())


@pytest.fixture(scope="module")
def tables() -> dict[str, Any]:
    tables = {}
    for run_number in SPEC.run_numbers:
        tables.update(generate_run(SPEC, run_number))
    return tables


@pytest.fixture
def small(tmp_path: Path) -> Store:
    """A store of its own, for tests that damage it."""
    store = Store(tmp_path)
    result = store.run(
        "generate", "--runs", "1", "--events-per-run", "600", "--file-rows", "250", "-o", "json"
    )
    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["files"] > len(summary["datasets_written"]) == 4, "--file-rows cuts files"
    return store


def raw_event(tables: dict[str, Any], run_number: int, index: int = 0) -> int:
    name = SPEC.dataset_name(run_number, SPEC.processings[0])
    return int(tables[name]["event_number"][index].as_py())


# -- help and version -------------------------------------------------------------
@pytest.fixture(scope="module")
def helps() -> dict[str, Result]:
    paths = command_paths()
    results = run_all(*([*path, "--help"] for path in paths))
    return {" ".join(path): result for path, result in zip(paths, results, strict=True)}


@pytest.mark.parametrize("path", [" ".join(p) for p in command_paths()], ids=lambda p: p or "-")
def test_help(helps: dict[str, Result], path: str) -> None:
    result = helps[path]
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert f"eventindex {path}".strip() in " ".join(result.stdout.split())


def test_every_command_of_the_design_is_there() -> None:
    paths = {" ".join(p) for p in command_paths()}
    assert {
        "generate",
        "pick",
        "catalog ls",
        "catalog show",
        "catalog verify",
        "catalog gc",
        "demo",
    } <= paths


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"eventindex {__version__}"


def test_help_imports_no_heavy_module() -> None:
    """`eventindex --help` must not start Spark, nor load Arrow or NumPy: it stays instant."""
    probe = (
        "import json, sys\n"
        "sys.argv = ['eventindex', '--help']\n"
        "from eventindex.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = ('pyspark', 'py4j', 'pyarrow', 'numpy', 'pandas', 'happybase')\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "sys.stderr.write(json.dumps(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=TIMEOUT_S,
        check=True,
    )
    assert json.loads(done.stderr) == []


def test_no_arguments_shows_help() -> None:
    result = run()
    assert "Usage:" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# -- generate ---------------------------------------------------------------------
def test_generate_text(generated: Generated, tables: dict[str, Any]) -> None:
    # The module fixture generated already: running again resumes and skips everything.
    result = generated.run(*GENERATE)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert lines["collection"] == SPEC.collection
    assert lines["datasets_written"] == "0"
    assert lines["datasets_skipped"] == str(len(tables))


def test_generate_json(generated: Generated, tables: dict[str, Any]) -> None:
    summary = generated.summary
    assert summary["collection"] == SPEC.collection
    assert sorted(summary["datasets_written"]) == sorted(tables)
    assert summary["datasets_skipped"] == []
    assert summary["rows"] == sum(t.num_rows for t in tables.values())
    assert summary["files"] == len(tables)
    assert summary["store"] == str(generated.directory / "store")


def test_generate_bad_spec_is_a_usage_error(tmp_path: Path) -> None:
    result = Store(tmp_path).run("generate", "--first-run", str(2**32 - 1), "--runs", "2")
    result.assert_clean_error(2)
    assert "first_run" in result.stderr
    assert not (tmp_path / "store").exists()


def test_generate_jsonl(tmp_path: Path) -> None:
    target = tmp_path / "jsonl"
    result = run(
        "generate", "--runs", "1", "--events-per-run", "400", "--jsonl", str(target), "-o", "json"
    )
    assert result.returncode == 0, result.stderr
    summary = result.json()
    spec = GeneratorSpec(runs=1, events_per_run=400)
    expected = generate_run(spec, spec.first_run)
    assert sorted(Path(f).name for f in summary["files"]) == sorted(f"{n}.jsonl" for n in expected)
    for name, table in expected.items():
        read = read_jsonl(target / f"{name}.jsonl")
        assert read.equals(table), name
    assert summary["rows"] == sum(t.num_rows for t in expected.values())
    menus = json.loads(Path(summary["menus"]).read_text())
    assert menus == [m.model_dump(mode="json") for m in generate_menus(spec)]
    assert not (tmp_path / "store").exists()


# -- catalog ls / show ------------------------------------------------------------
def test_catalog_ls(generated: Generated, tables: dict[str, Any]) -> None:
    text, as_json, one_text, one_json, unknown = generated.run_all(
        ["catalog", "ls"],
        ["catalog", "ls", "-o", "json"],
        ["catalog", "ls", SPEC.collection],
        ["catalog", "ls", SPEC.collection, "--output", "json"],
        ["catalog", "ls", "mc16_13TeV.nothing"],
    )
    assert text.returncode == 0, text.stderr
    assert SPEC.collection in text.stdout
    (row,) = as_json.json()
    assert row["collection"] == SPEC.collection
    assert row["kind"] == "events"
    assert row["datasets"] == len(tables)
    assert row["files"] == len(tables)
    assert row["rows"] == sum(t.num_rows for t in tables.values())

    rows = one_json.json()
    assert sorted(r["dataset"] for r in rows) == sorted(tables)
    for row in rows:
        table = tables[row["dataset"]]
        assert row["rows"] == table.num_rows
        assert row["key_min"] == [table["run_number"][0].as_py(), table["event_number"][0].as_py()]
    assert one_text.returncode == 0
    assert all(name in one_text.stdout for name in tables), "names are never cut short"

    unknown.assert_clean_error(2)
    assert "mc16_13TeV.nothing" in unknown.stderr


def test_catalog_show(generated: Generated, tables: dict[str, Any]) -> None:
    name = SPEC.dataset_name(SPEC.first_run, SPEC.processings[1])
    with generated.open_catalog() as catalog:
        (entry,) = catalog.list_tagfiles(dataset=name)
    dataset_json, dataset_text, file_json, collection_text, unknown = generated.run_all(
        ["catalog", "show", name, "-o", "json"],
        ["catalog", "show", name],
        ["catalog", "show", entry.file_id, "-o", "json"],
        ["catalog", "show", SPEC.collection],
        ["catalog", "show", "no-such-thing"],
    )
    shown = dataset_json.json()
    assert shown["dataset"]["name"] == name
    assert shown["dataset"]["processing_tag"] == "r7562_p2521"
    (file,) = shown["files"]
    assert file["file_id"] == entry.file_id
    assert file["rows"] == tables[name].num_rows
    assert file["state"] == "committed"
    assert dataset_text.returncode == 0
    assert entry.file_id in dataset_text.stdout

    assert file_json.json()["file"] == file

    assert collection_text.returncode == 0
    assert "run_number" in collection_text.stdout, "the collection's key"
    assert all(name in collection_text.stdout for name in tables), "and its datasets"

    unknown.assert_clean_error(2)
    (line,) = unknown.stderr.strip().splitlines()
    assert line.startswith("error:") and "no-such-thing" in line
    assert unknown.stdout == ""


# -- catalog verify ---------------------------------------------------------------
def test_catalog_verify(small: Store) -> None:
    clean = small.run("catalog", "verify", "-o", "json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    report = clean.json()
    assert report["ok"] is True and report["files_checked"] > 4

    (small.directory / "store" / ".left.parquet.0.tmp").write_bytes(b"")
    dataset = SPEC.dataset_name(SPEC.first_run, SPEC.processings[0])
    warned, strict, one_dataset = small.run_all(
        ["catalog", "verify"],
        ["catalog", "verify", "--strict"],
        ["catalog", "verify", "--dataset", dataset, "--strict", "-o", "json"],
    )
    assert warned.returncode == 0 and "0 errors, 1 warnings" in warned.stdout
    assert "temporary_file" in warned.stdout
    assert strict.returncode == 1
    assert one_dataset.returncode == 0
    with small.open_catalog() as catalog:
        assert one_dataset.json()["files_checked"] == len(catalog.list_tagfiles(dataset=dataset))

    victim = next((small.directory / "store").rglob("*.parquet"))
    victim.unlink()
    broken, broken_json = small.run_all(
        ["catalog", "verify"], ["catalog", "verify", "--output", "json"]
    )
    assert broken.returncode == 1
    assert "missing_file" in broken.stdout
    report = broken_json.json()
    assert broken_json.returncode == 1
    assert report["ok"] is False
    assert {p["kind"] for p in report["problems"]} == {"missing_file", "temporary_file"}
    assert str(victim) in {p["uri"] for p in report["problems"]}


# -- catalog gc -------------------------------------------------------------------
def test_catalog_gc(small: Store) -> None:
    with small.open_catalog() as catalog:
        victim = catalog.list_tagfiles()[0]
        catalog.retire_tagfiles([victim.file_id])
        live = [f.uri for f in catalog.list_tagfiles()]

    # One after the other: run_all runs its commands at the same time.
    dry = small.run("catalog", "gc", "--grace", "0", "--dry-run", "-o", "json")
    waiting = small.run("catalog", "gc", "-o", "json")  # the configured grace: hours
    text = small.run("catalog", "gc", "--grace", "0")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    planned = dry.json()
    assert planned["dry_run"] is True and planned["files"] == 1
    assert planned["bytes"] == victim.bytes and planned["removed"][0]["file_id"] == victim.file_id
    assert waiting.json()["waiting"] == 1 and waiting.json()["files"] == 0
    assert text.returncode == 0 and "removed 1 entries, 1 files" in text.stdout
    assert not Path(victim.uri).exists() and all(Path(uri).exists() for uri in live)
    assert small.run("catalog", "verify").returncode == 0
    bad = small.run("catalog", "gc", "--grace", "-5")
    assert bad.returncode == 2


def test_pick_found(generated: Generated, tables: dict[str, Any]) -> None:
    run_number = SPEC.first_run + 1
    event = [str(run_number), str(raw_event(tables, run_number, 10))]
    as_json, text, only_raw, only_aod = generated.run_all(
        ["pick", *event, "-o", "json"],
        ["pick", *event],
        ["pick", *event, "--format", "RAW", "-o", "json"],
        ["pick", *event, "--dataset", "*.r7562_p2521", "-o", "json"],
    )
    assert as_json.returncode == 0, as_json.stderr
    picked = as_json.json()
    assert [picked["run_number"], picked["event_number"]] == [int(e) for e in event]
    assert picked["collection"] == SPEC.collection
    formats = sorted(loc["format"] for loc in picked["locations"])
    assert formats in (["AOD", "AOD", "DAOD_PHYS", "RAW"], ["AOD", "AOD", "RAW"])
    assert all(loc["guid"] and loc["dataset"] for loc in picked["locations"])
    assert picked["attributes"]["lumi_block"] >= 1

    assert text.returncode == 0
    assert all(loc["guid"] in text.stdout for loc in picked["locations"])
    assert [loc["format"] for loc in only_raw.json()["locations"]] == ["RAW"]
    assert [loc["processing_tag"] for loc in only_aod.json()["locations"]] == ["r7562_p2521"]


def test_pick_not_found(generated: Generated, tables: dict[str, Any]) -> None:
    first = raw_event(tables, SPEC.first_run)
    missing, as_json, unknown = generated.run_all(
        ["pick", str(SPEC.first_run), str(first - 1)],
        ["pick", "1", "1", "-o", "json"],
        ["pick", "284484", "1", "--collection", "mc16_13TeV.nothing"],
    )
    assert missing.returncode == 1
    assert "not found" in missing.stdout
    assert as_json.returncode == 1
    assert as_json.json() is None
    unknown.assert_clean_error(2)
    assert "mc16_13TeV.nothing" in unknown.stderr


@pytest.mark.parametrize(
    "arguments",
    [["--", "-1", "5"], ["abc", "5"], ["284484", "x"], [str(2**32), "1"], ["284484", str(2**64)]],
    ids=["negative run", "non-numeric run", "non-numeric event", "run too big", "event too big"],
)
def test_pick_bad_arguments(generated: Generated, arguments: list[str]) -> None:
    result = generated.run("pick", *arguments)
    result.assert_clean_error(2)
    assert "Usage:" in result.stderr


# -- config -----------------------------------------------------------------------
def test_config_show_defaults() -> None:
    result = run("config", "show")
    assert result.returncode == 0, result.stderr
    shown = result.json()
    assert shown["store"]["root"] == "var/store"  # relative to the working directory
    assert shown["catalog"]["type"] == "sqlite"


def test_config_show_layers(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('[catalog]\npath = "/from/file.sqlite"\n')
    env = {"EVENTINDEX_STORE__ROOT": "/from/env", "EVENTINDEX_CATALOG__HBASE__PORT": "9091"}
    sets = ["--set", 'webservice.tokens=["t1", "t2"]', "--set", "spark.app_name=2024"]
    from_env, from_set, from_flag, typed, from_file = (
        result.json()
        for result in run_all(
            ["config", "show"],
            ["--set", "store.root=/from/set", "config", "show"],
            ["--store", "/from/flag", "config", "show"],
            [*sets, "config", "show"],
            ["--config", str(config), "config", "show"],
            env=env,
        )
    )
    assert from_env["store"]["root"] == "/from/env"
    assert from_env["catalog"]["hbase"]["port"] == 9091
    assert from_set["store"]["root"] == "/from/set"
    assert from_flag["store"]["root"] == "/from/flag"
    assert typed["webservice"]["tokens"] == ["t1", "t2"]
    assert typed["spark"]["app_name"] == "2024"
    assert from_file["catalog"]["path"] == "/from/file.sqlite"
    assert from_file["store"]["root"] == "/from/env"


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("webservice.port=70000", "webservice.port"),
        ("catalog.type=mysql", "catalog.type"),
        ("catalog.hbase.prot=9091", "catalog.hbase.prot"),
    ],
)
def test_config_bad_setting(setting: str, key: str) -> None:
    result = run("--set", setting, "config", "show")
    result.assert_clean_error(2)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and key in line


def test_config_set_without_a_value() -> None:
    result = run("--set", "store.root", "config", "show")
    result.assert_clean_error(2)
    assert "SECTION.KEY=VALUE" in result.stderr


def test_config_bad_environment(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = run("config", "show", env={"EVENTINDEX_CONFIG": str(missing)})
    result.assert_clean_error(2)
    assert str(missing) in result.stderr
    result = run("config", "show", env={"EVENTINDEX_STORE__ROTO": "x"})
    result.assert_clean_error(2)
    assert "EVENTINDEX_STORE__ROTO" in result.stderr


# -- demo -------------------------------------------------------------------------
def test_demo(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    result = run("demo", "--dir", str(directory), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not found" not in result.stdout
    assert (directory / "catalog.sqlite").exists()
    assert "0 errors, 0 warnings" in result.stdout
