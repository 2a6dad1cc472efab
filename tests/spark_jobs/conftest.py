"""Spark job tests share the one session-scoped SparkSession of the test run.

Python workers must run this interpreter (the one with the project installed):
set before any session starts, which collection time is.
"""

from spark_jobs.session import python_for_workers
from tests.spark_session import spark

python_for_workers()

__all__ = ["spark"]
