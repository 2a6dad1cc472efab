"""Runnable benchmarks: ``python -m benchmarks.NAME`` or ``eventindex bench NAME``.

Each module exposes ``run(argv: list[str]) -> dict[str, object]`` and prints one
JSON object when run as a script. Figures that depend on the machine are
compared with a baseline measured in the same run (a ratio).
"""
