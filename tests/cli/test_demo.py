"""`eventindex demo` and the produce/consume commands' refusals, through the CLI."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from eventindex.cli.app import app
from eventindex.errors import ValidationError

runner = CliRunner()


def test_demo_runs_the_chain(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["demo", "--dir", str(tmp_path / "demo"), "--runs", "1", "--events-per-run", "3000"]
    )
    assert result.exit_code == 0, result.output
    assert "every message reported stored on the status topic" in result.output
    assert "0 errors, 0 warnings" in result.output
    assert "0 invalid, 0 duplicates" in result.output
    assert "RAW" in result.output.split("pick events")[1]


def test_extract_then_refuse_memory_broker(tmp_path: Path) -> None:
    jsonl = tmp_path / "jsonl"
    result = runner.invoke(
        app, ["generate", "--runs", "1", "--events-per-run", "300", "--jsonl", str(jsonl)]
    )
    assert result.exit_code == 0, result.output
    source = sorted(jsonl.glob("*.daq.RAW.jsonl"))[0]
    output = tmp_path / "raw.ei"
    result = runner.invoke(
        app, ["produce", "extract", str(source), "-o", str(output), "--output", "json"]
    )
    assert result.exit_code == 0, result.output
    assert '"dataset": "data15_13TeV.00284484.physics_Main.daq.RAW"' in result.output
    result = runner.invoke(app, ["produce", "send", str(output), "--broker", "memory://"])
    assert result.exit_code == 2 and "memory://" in result.output
    result = runner.invoke(app, ["consume", "--broker", "memory://x"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["produce", "extract", str(source), "-o", str(output)])
    assert isinstance(result.exception, ValidationError)  # it may hold a send log
    assert "--force" in str(result.exception)
