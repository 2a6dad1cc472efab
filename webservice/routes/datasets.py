"""``/v1/datasets``: what the catalog holds, dataset by dataset."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from starlette.responses import Response

from catalog.model import Dataset, FileState, TagFile
from webservice.dependencies import CatalogDep, CollectionsDep
from webservice.models import (
    EXAMPLE_COLLECTION,
    EXAMPLE_DATASET,
    CollectionName,
    DatasetDetail,
    DatasetSummary,
)
from webservice.problems import problem_responses
from webservice.responses import json_response
from webservice.routes import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/datasets", tags=["datasets"])


def _summary(dataset: Dataset, files: list[TagFile]) -> dict[str, Any]:
    keys = [f.key_min for f in files if f.key_min] + [f.key_max for f in files if f.key_max]
    return {
        "name": dataset.name,
        "collection": dataset.collection,
        "format": dataset.format,
        "processing_tag": dataset.processing_tag,
        "project": dataset.project,
        "stream": dataset.stream,
        "upstream": dataset.upstream,
        "files": len(files),
        "rows": sum(f.rows for f in files),
        "bytes": sum(f.bytes for f in files),
        "key_min": list(min(keys)) if keys else None,
        "key_max": list(max(keys)) if keys else None,
        "created_at": dataset.created_at,
    }


def _file(entry: TagFile) -> dict[str, Any]:
    return {
        "file_id": entry.file_id,
        "kind": entry.kind.value,
        "part": entry.part,
        "uri": entry.uri,
        "rows": entry.rows,
        "bytes": entry.bytes,
        "checksum": entry.checksum,
        "key_min": list(entry.key_min),
        "key_max": list(entry.key_max),
        "state": entry.state.value,
        "created_at": entry.created_at,
        "committed_at": entry.committed_at,
        "supersedes": list(entry.supersedes),
    }


@router.get(
    "",
    response_model=list[DatasetSummary],
    summary="List datasets",
    responses=problem_responses(404, 422),
)
def list_datasets(
    catalog: CatalogDep,
    collections: CollectionsDep,
    collection: Annotated[
        CollectionName | None,
        Query(
            description="Only this collection's datasets (default: every collection).",
            examples=[EXAMPLE_COLLECTION],
        ),
    ] = None,
) -> Response:
    """Datasets sorted by name, each with the count, rows and bytes of its committed files."""
    if collection is not None:
        collections.resolve(collection, "query")
    by_dataset: dict[str, list[TagFile]] = defaultdict(list)
    for entry in catalog.list_tagfiles(collection=collection):
        by_dataset[entry.dataset].append(entry)
    return json_response(
        [_summary(d, by_dataset[d.name]) for d in catalog.list_datasets(collection)]
    )


@router.get(
    "/{name}",
    response_model=DatasetDetail,
    summary="One dataset and its files",
    responses=problem_responses(404, 422),
)
def get_dataset(
    name: Annotated[
        str,
        Path(min_length=1, max_length=512, description="Dataset name.", examples=[EXAMPLE_DATASET]),
    ],
    catalog: CatalogDep,
) -> Response:
    """The dataset with its totals, and every file of it in any state (writing, committed,
    retired). 404 if the catalog has no such dataset."""
    dataset = catalog.get_dataset(name)  # NotFoundError -> 404
    files = catalog.list_tagfiles(dataset=name, states=None)
    committed = [f for f in files if f.state is FileState.COMMITTED]
    return json_response(
        {"dataset": _summary(dataset, committed), "files": [_file(f) for f in files]}
    )
