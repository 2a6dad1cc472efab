"""Schemathesis over the service's own OpenAPI schema: whatever it sends, no server error,
and every answer matches what the schema documents (status, content type, body)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import positive_data_acceptance

from eventindex.config import Settings
from tests.generated_store import GeneratedStore
from tests.webservice.conftest import TOKEN, service_settings
from webservice.app import create_app
from webservice.options import MAX_EVENT_NUMBER

_DOCUMENT = create_app(Settings()).openapi()  # the schema needs no catalog: no store here
OPERATIONS = [
    pytest.param(method.upper(), path, mode, id=f"{mode.value}-{method.upper()}-{path}")
    for path, operations in _DOCUMENT["paths"].items()
    for method, operation in operations.items()
    for mode in GenerationMode
    # Negative data needs something to get wrong: parameters or a body.
    if mode is GenerationMode.POSITIVE
    or operation.get("parameters")
    or operation.get("requestBody")
]


# Schemathesis's default expected statuses, plus 413: how the service refuses lists and
# bodies over its limits, valid or not.
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "413", "429"]
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "negative_data_rejection": {"expected-statuses": REJECTED},
            "positive_data_acceptance": {"expected-statuses": ACCEPTED},
        }
    }
)


@pytest.fixture(scope="module")
def api_schema(store: GeneratedStore) -> BaseSchema:
    # Limits small enough that generated lists cross them now and then.
    settings = service_settings(store, max_body_bytes=16 * 1024, max_lookup_events=20)
    app = create_app(settings, catalog=store.catalog)
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)


def _event_numbers(case: schemathesis.Case[Any]) -> list[Any]:
    body = case.body if isinstance(case.body, dict) else {}
    events = body.get("events")
    pairs = events if isinstance(events, list) else []
    found = [pair[1] for pair in pairs if isinstance(pair, list) and len(pair) == 2]
    return [*found, (case.path_parameters or {}).get("event")]


def _refused_on_purpose(case: schemathesis.Case[Any]) -> bool:
    """Schema-valid data the service rightly refuses with 422.

    ``run_max`` below ``run_min`` is the one rule a JSON schema cannot state. And
    JSON-schema validators compare numbers as doubles, where 2**64 - 1 and 2**64 + 383
    are equal, so they take event numbers just past uint64 for valid. A submitted
    query is any string to the schema, and SQL outside the supported subset (or naming
    no table the catalog has) is refused with 422 by design.
    """
    if case.method.upper() == "POST" and case.path == "/v1/queries":
        return True
    body = case.body if isinstance(case.body, dict) else {}
    low, high = body.get("run_min"), body.get("run_max")
    if isinstance(low, int | float) and isinstance(high, int | float) and high < low:
        return True
    return any(
        isinstance(n, int | float) and not isinstance(n, bool) and n > MAX_EVENT_NUMBER
        for n in _event_numbers(case)
    )


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_operation_conforms_to_its_schema(
    api_schema: BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    """Valid requests (positive) and invalid ones (negative: wrong types, out of range,
    missing fields), each checked with schemathesis's default checks."""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode), with_token=st.booleans())
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case: schemathesis.Case[Any], with_token: bool) -> None:
        if with_token and mode is GenerationMode.POSITIVE:
            # Half the time, so admin routes are exercised past their guard too.
            case.headers["Authorization"] = f"Bearer {TOKEN}"
        if mode is GenerationMode.POSITIVE and _refused_on_purpose(case):
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            assert response.status_code in {202, 401, 403, 422}, response.text
            return
        response = case.call_and_validate()
        assert response.status_code < 500, response.text

    check()
