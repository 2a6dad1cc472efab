"""The dependency rules of the layout (DESIGN.md §2), checked on every import statement."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("eventindex", "catalog", "producers", "consumers", "spark_jobs", "webservice")

# package -> top-level modules it must never import
FORBIDDEN: dict[str, set[str]] = {
    "eventindex": {"pyspark", "webservice", "consumers", "producers", "spark_jobs"},
    "catalog": {"pyspark", "webservice", "consumers", "producers", "spark_jobs"},
    "producers": {"pyspark", "consumers", "webservice", "spark_jobs", "catalog"},
    "consumers": {"pyspark", "producers", "webservice", "spark_jobs"},
    "webservice": {"pyspark", "consumers", "producers", "spark_jobs"},
    "spark_jobs": {"webservice", "consumers", "producers"},
}
# The command line is the front door: it may import everything, but lazily.
FRONT_DOOR = ROOT / "eventindex" / "cli"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str) -> None:
    violations = []
    for path in _sources(package):
        if FRONT_DOOR in path.parents:
            continue
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "\n".join(violations)


def test_the_rule_checker_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import pyspark.sql\nfrom consumers.daemon import run\nfrom . import x\n")
    assert _imports(sample) == {"pyspark", "consumers"}


def test_help_starts_no_jvm_and_imports_no_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from eventindex.cli import app\n"
        "heavy = [m for m in ('pyspark', 'py4j', 'happybase', 'duckdb') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == ""
