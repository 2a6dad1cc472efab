"""``/v1/datasets/{name}/consistency``: the latest stored consistency report of a dataset.

``eventindex check`` computes and stores the reports; this route only reads the
newest one (404 naming the dataset when there is none yet).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from starlette.responses import Response

from eventindex.query.consistency import load_report
from webservice.dependencies import CatalogDep
from webservice.models import EXAMPLE_DATASET
from webservice.problems import problem_responses
from webservice.responses import json_response
from webservice.routes import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/datasets", tags=["datasets"])


@router.get(
    "/{name}/consistency",
    summary="The dataset's latest consistency report",
    responses={
        200: {
            "description": "Events per run, duplicated events with the files holding each "
            "copy, upstream events missing here, events absent upstream, missing files.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **problem_responses(404, 422),
    },
)
def dataset_consistency(
    name: Annotated[
        str,
        Path(min_length=1, max_length=512, description="Dataset name.", examples=[EXAMPLE_DATASET]),
    ],
    catalog: CatalogDep,
) -> Response:
    """The report the last `eventindex check` stored for this dataset."""
    return json_response(load_report(catalog, name))
