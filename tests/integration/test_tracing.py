"""One claim, one trace: the gateway, the consumer, PostgreSQL, Redis and the relay's
publish, in this process with an in-memory exporter, against the real servers."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from consumer import service as consumer_service
from flashclaim.core import logs, tracing
from flashclaim.core.events import decode
from flashclaim.core.settings import Settings
from flashclaim.ops.claim_story import tell
from gateway.app import create_app
from relay import service as relay_service

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """This process traces into memory from now on (a provider is installed once per
    process: the tests that run after this one are traced too, which they never see)."""
    if not tracing.enabled():
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        tracing.install(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
async def stack(
    own_settings: Settings, spans: InMemorySpanExporter
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], Settings]]:
    """Gateway (in-process), consumer and relay tasks, all traced."""
    settings = own_settings.replace(claim_hold_seconds=0)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(consumer_service.run(settings, stop)),
        asyncio.create_task(relay_service.run(settings.replace(outbox_linger_ms=0), stop)),
    ]
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    yield client, settings
    await client.close()
    stop.set()
    await asyncio.gather(*tasks)


def hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def in_trace(spans: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if hex_trace(s) == trace_id]


async def until_spans(spans: InMemorySpanExporter, trace_id: str, *names: str) -> None:
    """Until spans of all ``names`` are in the trace (exported as they end: polled)."""
    async with asyncio.timeout(20):
        while True:
            if set(names) <= {s.name for s in in_trace(spans, trace_id)}:
                return
            await asyncio.sleep(0.05)


async def test_a_claim_is_one_trace_from_the_client_to_its_event(
    stack: tuple[TestClient, Settings],  # type: ignore[type-arg]
    spans: InMemorySpanExporter,
    coupon_name: str,
) -> None:
    client, settings = stack
    topology = settings.topology()
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    await topology.declare_events(channel)
    events = await channel.declare_queue(exclusive=True)
    await events.bind(topology.events_exchange, "coupon.#")

    created_trace = uuid.uuid4().hex
    r = await client.post(
        "/api/coupons",
        json={"name": coupon_name, "amount": 1},
        headers={"traceparent": f"00-{created_trace}-{'a' * 16}-01"},
    )
    assert r.status == 201
    # The client's trace: its traceparent is honoured.
    trace_id, parent = uuid.uuid4().hex, "b" * 16
    r = await client.post(
        "/api/coupons/claim",
        json={"user_id": "alice", "coupon_name": coupon_name},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert r.status == 200
    request_id = (await r.json())["request_id"]

    await until_spans(
        spans,
        trace_id,
        "POST /api/coupons/claim",
        "claim process",
        "claims apply",
        "results report",
        f"{topology.events_exchange} publish",
    )
    trace = in_trace(spans, trace_id)
    by_name = {s.name: s for s in trace}
    server = by_name["POST /api/coupons/claim"]
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None and format(server.parent.span_id, "016x") == parent
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["flashclaim.request_id"] == request_id
    publish = by_name[f"{topology.commands_exchange} publish"]
    assert publish.kind is SpanKind.PRODUCER
    claim = by_name["claim process"]
    assert claim.kind is SpanKind.CONSUMER
    assert claim.attributes is not None and claim.attributes["flashclaim.outcome"] == "claimed"
    assert claim.attributes["flashclaim.request_id"] == request_id
    batch = by_name["claims apply"]
    # The batch links to the claim, and PostgreSQL's statements are its children.
    assert any(format(link.context.trace_id, "032x") == trace_id for link in batch.links)
    database = [s for s in trace if (s.attributes or {}).get("db.system") == "postgresql"]
    applied = [
        str((s.attributes or {}).get("db.statement", ""))
        for s in database
        if s.parent is not None and s.parent.span_id == batch.context.span_id
    ]
    assert any(statement.startswith("INSERT INTO inbox") for statement in applied), applied
    assert any(statement.startswith("INSERT INTO outbox") for statement in applied), applied
    report = by_name["results report"]
    redis = [s for s in trace if (s.attributes or {}).get("db.system") == "redis"]
    assert any(s.parent is not None and s.parent.span_id == report.context.span_id for s in redis)

    # The events, with the trace of their change for the subscribers.
    seen: dict[str, str] = {}
    async with asyncio.timeout(20):
        while len(seen) < 3:
            message = await events.get(timeout=20, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            (body,) = decode(message.content_type, message.body)  # a traced event is alone
            header = (message.headers or {}).get("traceparent")
            assert isinstance(header, str), message.headers
            seen[body["type"]] = header.split("-")[1]
    assert seen == {
        "coupon.created": created_trace,
        "coupon.claimed": trace_id,
        "coupon.sold_out": trace_id,
    }
    await connection.close()

    # `flashclaim claim show` names the trace.
    told = await tell(settings, uuid.UUID(request_id))
    assert told.trace_id == trace_id
    assert f"trace        {trace_id}" in told.render()


async def test_without_a_traceparent_each_claim_starts_its_own_trace(
    stack: tuple[TestClient, Settings],  # type: ignore[type-arg]
    spans: InMemorySpanExporter,
    coupon_name: str,
) -> None:
    client, _ = stack
    r = await client.post("/api/coupons", json={"name": coupon_name, "amount": 5})
    assert r.status == 201
    answers = await asyncio.gather(
        *(
            client.post("/api/coupons/claim", json={"user_id": f"u{i}", "coupon_name": coupon_name})
            for i in range(3)
        )
    )
    ids = [(await a.json())["request_id"] for a in answers]
    servers = {
        (s.attributes or {}).get("flashclaim.request_id"): hex_trace(s)
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.SERVER
    }
    assert len({servers[i] for i in ids}) == 3
    for request_id in ids:
        await until_spans(spans, servers[request_id], "claim process")
        processed = [s for s in in_trace(spans, servers[request_id]) if s.name == "claim process"]
        assert [(s.attributes or {}).get("flashclaim.request_id") for s in processed] == [
            request_id
        ]


async def test_a_claim_not_sampled_makes_no_span_anywhere(
    stack: tuple[TestClient, Settings],  # type: ignore[type-arg]
    spans: InMemorySpanExporter,
    coupon_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half the claims sampled (OTEL_TRACES_SAMPLER=parentbased_traceidratio, 0.5): the
    gateway decides before any span, so about half the claims have a trace (not a
    quarter: the span is not drawn for again) and every span of the run, PostgreSQL's,
    Redis's and the relay's included, is in one of theirs."""
    client, settings = stack
    r = await client.post("/api/coupons", json={"name": coupon_name, "amount": 1000})
    assert r.status == 201
    created = next(hex_trace(s) for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER)
    await until_spans(spans, created, f"{settings.topology().events_exchange} publish")
    half = ParentBased(TraceIdRatioBased(0.5))
    monkeypatch.setattr(tracing, "_samplers", [half])  # as configure() would set it
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    monkeypatch.setattr(provider.sampler, "configured", half)
    spans.clear()
    claims = 400
    for start in range(0, claims, 50):
        answers = await asyncio.gather(
            *(
                client.post(
                    "/api/coupons/claim", json={"user_id": f"u{i}", "coupon_name": coupon_name}
                )
                for i in range(start, start + 50)
            )
        )
        assert {a.status for a in answers} == {200}
    servers = {
        hex_trace(s): (s.attributes or {}).get("flashclaim.request_id")
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.SERVER
    }
    assert 150 <= len(servers) <= 250, len(servers)
    async with asyncio.timeout(20):
        while True:
            done = [s for s in spans.get_finished_spans() if s.name == "claim process"]
            if len(done) >= len(servers):
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the relay's publishes of their events
    outside = [s.name for s in spans.get_finished_spans() if hex_trace(s) not in servers]
    assert outside == []
    processed = [s for s in spans.get_finished_spans() if s.name == "claim process"]
    assert sorted(str((s.attributes or {})["flashclaim.request_id"]) for s in processed) == sorted(
        str(r) for r in servers.values()
    )


def test_a_line_logged_in_a_span_carries_its_trace_and_span_ids(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.tracer().start_as_current_span("work") as span:
        record = logging.LogRecord("flashclaim.test", logging.INFO, __file__, 1, "done", (), None)
        line = orjson.loads(logs.formatter("consumer").format(record))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")
    outside = orjson.loads(logs.formatter("consumer").format(record))
    assert "trace_id" not in outside


def test_the_standard_variables_turn_export_on_and_off() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})
