"""The one SparkSession the Spark tests share (DESIGN §10: local[2], no UI, few partitions).

Import the ``spark`` fixture from here in a test package's ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from eventindex.config import SparkSettings


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    pytest.importorskip("pyspark")
    from spark_jobs.session import spark_session

    settings = SparkSettings(
        master="local[2]",
        app_name="eventindex-tests",
        conf={
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "2",
            "spark.driver.memory": "2g",
            "spark.sql.session.timeZone": "UTC",
        },
    )
    session = spark_session(settings)
    yield session
    session.stop()
