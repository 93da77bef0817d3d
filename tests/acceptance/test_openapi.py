"""The gateway answers as its OpenAPI description (gateway/openapi.json) says, for
requests Schemathesis generates from that description, valid and invalid: never a
``5xx``, only the statuses described, bodies and headers as their schemas say, and
invalid input refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.generation.case import Case

import gateway
from tests.acceptance.conftest import Services

DESCRIPTION = Path(gateway.__file__).parent / "openapi.json"
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_the_gateway_answers_as_described(api: Services, mode: GenerationMode) -> None:
    """Each operation in turn, with valid requests, then with invalid ones."""
    schema = schemathesis.openapi.from_path(DESCRIPTION)
    schema.config.update(base_url=api.base_url, request_timeout=30)
    document = json.loads(DESCRIPTION.read_text())
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 8
    for operation in operations:
        described = document["paths"][operation.path][operation.method.lower()]
        if mode is GenerationMode.NEGATIVE and "requestBody" not in described:
            continue  # nothing to make invalid (any text is a path segment)

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers_as_described(case: Case[Any]) -> None:
            case.call_and_validate(checks=CHECKS)

        answers_as_described()
