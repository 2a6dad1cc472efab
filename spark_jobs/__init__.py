"""Spark jobs: compaction, conversion, indexing, consistency checks, spatial partitioning.

Only this package imports pyspark, and only inside the jobs, so that importing
the rest of the platform never starts a JVM.
"""
