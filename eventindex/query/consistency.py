"""Consistency reports: how they are stored, found again, and told to a shift crew.

``eventindex check`` (a Spark job in ``spark_jobs.consistency``) writes, for every
dataset it checked, one small map-file (kind ``index``, part ``consistency``):
its rows are the dataset's event count per run, and its footer carries the
dataset's whole report as JSON. A new check supersedes the previous report
file in one catalog commit, so readers always find exactly one.
"""

from __future__ import annotations

import json
from typing import Any

from catalog.base import Catalog
from catalog.model import FileKind, TagFile
from eventindex.errors import NotFoundError
from eventindex.storage import MapFileReader

REPORT_PART = "consistency"
REPORT_METADATA = "consistency"
# Lists in a report (missing events, duplicates) stop after this many entries.
MAX_LISTED = 1000


def report_entries(catalog: Catalog, dataset: str) -> list[TagFile]:
    """Committed consistency report files of a dataset (one, once a check has run)."""
    return [
        e
        for e in catalog.list_tagfiles(dataset=dataset, kinds=[FileKind.INDEX])
        if e.part == REPORT_PART
    ]


def load_report(catalog: Catalog, dataset: str) -> dict[str, Any]:
    """The latest consistency report of a dataset; ``NotFoundError`` if none exists."""
    catalog.get_dataset(dataset)  # NotFoundError naming the dataset
    entries = report_entries(catalog, dataset)
    if not entries:
        raise NotFoundError(
            f"dataset {dataset} has no consistency report: run eventindex check --collection "
            "<its collection>"
        )
    latest = max(entries, key=lambda e: e.committed_at or e.created_at)
    with MapFileReader(latest.uri) as reader:
        report: dict[str, Any] = json.loads(reader.metadata[REPORT_METADATA])
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A collection report as lines a shift crew can read: verdict first, then details."""
    problems = report["problems"]
    lines = [
        f"Consistency of {report['collection']} runs {report['run_min']}-{report['run_max']}: "
        + ("OK" if not problems else f"{problems} problem(s)"),
        f"  {report['events']:,} event records in {len(report['datasets'])} datasets, "
        f"{report['files']} files checked in {report['seconds']:.1f} s",
    ]
    for name, dataset in sorted(report["datasets"].items()):
        notes = []
        if dataset["missing_files"]:
            notes.append(f"{len(dataset['missing_files'])} missing file(s)")
        if dataset["duplicates"]["events"]:
            notes.append(f"{dataset['duplicates']['events']:,} duplicated event(s)")
        missing = dataset.get("missing_from_this", {}).get("events", 0)
        if missing:
            notes.append(f"{missing:,} upstream event(s) missing here")
        orphans = dataset.get("missing_upstream", {}).get("events", 0)
        if orphans:
            notes.append(f"{orphans:,} event(s) absent from upstream")
        status = "; ".join(notes) if notes else "ok"
        lines.append(f"  {name}: {dataset['events']:,} events, {status}")
    for name, dataset in sorted(report["datasets"].items()):
        for uri in dataset["missing_files"][:5]:
            lines.append(f"  MISSING FILE {name}: {uri}")
        for item in dataset["duplicates"]["listed"][:5]:
            lines.append(
                f"  DUPLICATE {name}: run {item['run_number']} event {item['event_number']} "
                f"x{item['copies']} in files {', '.join(item['files'])}"
            )
        for item in dataset.get("missing_from_this", {}).get("listed", [])[:5]:
            lines.append(
                f"  MISSING {name}: run {item['run_number']} event {item['event_number']} "
                f"(in {dataset['upstream']})"
            )
        for item in dataset.get("missing_upstream", {}).get("listed", [])[:5]:
            lines.append(
                f"  NOT UPSTREAM {name}: run {item['run_number']} event {item['event_number']} "
                f"(absent from {dataset['upstream']})"
            )
    return lines
