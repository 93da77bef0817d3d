"""The gateway and the admin API answer as their OpenAPI descriptions say
(gateway/openapi.json, flashclaim/ops/openapi-admin.json), for requests Schemathesis
generates from them, valid and invalid: never a ``5xx``, only the statuses described,
bodies and headers as described, and invalid input refused."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.generation.case import Case

import gateway
from flashclaim.core.messages import ClaimCommand
from flashclaim.ops import dlq_api
from tests.acceptance.conftest import Services, free_port

PUBLIC = Path(gateway.__file__).parent / "openapi.json"
ADMIN = Path(dlq_api.__file__).parent / "openapi-admin.json"
TOKEN = "t" * 40
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
async def admin_url(api: Services) -> AsyncIterator[str]:
    """The admin API of the module's services, with two dead letters to show."""
    admin = Services(api.settings)
    port = free_port()
    await admin.start_admin(port, admin_token=TOKEN)
    topology = api.settings.topology()
    async with await aio_pika.connect(api.settings.amqp_url) as connection:
        channel = await connection.channel()
        await topology.declare(channel)
        dlx = await channel.get_exchange(topology.dead_letter_exchange)
        for user in ("a", "b"):
            message_id = str(uuid.uuid4())
            await dlx.publish(
                aio_pika.Message(
                    ClaimCommand(uuid.UUID(message_id), user, "OPENAPI").body(),
                    message_id=message_id,
                    headers={"x-flashclaim-reason": "failed", "x-flashclaim-error-type": "Test"},
                ),
                "claim",
            )
    yield f"http://127.0.0.1:{port}"
    admin.stop()


def check(description: Path, base_url: str, mode: GenerationMode, **headers: str) -> None:
    """Each operation of ``description`` in turn, with requests of ``mode``."""
    schema = schemathesis.openapi.from_path(description)
    schema.config.update(base_url=base_url, request_timeout=30, headers=headers or None)
    document = json.loads(description.read_text())
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 6
    for operation in operations:
        described = document["paths"][operation.path][operation.method.lower()]
        invalid_possible = "requestBody" in described or any(
            p.get("in") == "query" for p in described.get("parameters", [])
        )
        if mode is GenerationMode.NEGATIVE and not invalid_possible:
            continue  # nothing to make invalid (any text is a path segment or a header)

        @given(case=operation.as_strategy(mode))
        # The same examples on every run (CI's verdict is the code's, not the draw's);
        # a new finding comes with a change of the descriptions or of max_examples.
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def answers_as_described(case: Case[Any]) -> None:
            case.call_and_validate(checks=CHECKS)

        answers_as_described()


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_the_gateway_answers_as_described(api: Services, mode: GenerationMode) -> None:
    check(PUBLIC, api.base_url, mode)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_the_admin_api_answers_as_described(admin_url: str, mode: GenerationMode) -> None:
    check(ADMIN, admin_url, mode, Authorization=f"Bearer {TOKEN}")
