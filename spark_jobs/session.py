"""The one place a SparkSession is made, from the ``[spark]`` configuration."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from eventindex.config import SparkSettings
from eventindex.errors import MissingExtraError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def python_for_workers() -> None:
    """Spark's Python workers run this interpreter (it has the project and pyarrow
    installed) unless the user chose another with ``PYSPARK_PYTHON``."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def spark_session(settings: SparkSettings) -> SparkSession:
    """Get or create the session for ``settings.master`` (``local[*]`` by default, or
    any cluster URL), with every ``settings.conf`` entry passed through to Spark."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise MissingExtraError("pyspark", "spark", "Spark jobs") from exc
    python_for_workers()
    builder = SparkSession.builder.master(settings.master).appName(settings.app_name)
    for key, value in settings.conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
