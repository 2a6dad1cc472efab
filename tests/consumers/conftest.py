"""The producer tests' generated run, shared."""

from tests.producers.conftest import run_tables

__all__ = ["run_tables"]
