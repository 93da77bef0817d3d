"""Traces with OpenTelemetry: one claim, one trace, from the HTTP request to its event.

Off by default. An entry point calls :func:`configure`, which installs the SDK only when
the standard variables ask for export: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, or ``OTEL_TRACES_EXPORTER`` naming an
exporter (``otlp``, ``console``); ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` keeps it off. Everything else (sampler, batch sizes,
headers, resource attributes, ``OTEL_SERVICE_NAME``) is the SDK's own reading of
``OTEL_*``. Off, no span is made and no context travels: the hot paths ask
:func:`enabled` first, so they pay one test.

How a claim's context travels (W3C ``traceparent``):

- the gateway's server span continues a ``traceparent`` the client sent;
- sampling is decided there, once (``OTEL_TRACES_SAMPLER``), before any span is made
  (:func:`sampled`): a request that is not sampled makes no span at all, and its
  PostgreSQL and Redis calls are not instrumented (:func:`untraced`); only a sampled
  claim's context travels on;
- the claim command carries that span's context: as the ``traceparent`` header of a
  message carrying one claim, in each claim of a message carrying several (each claim
  keeps its own trace, whatever message it rides in);
- the consumer's span of a claim is a child of it; the batch span that applies it (with
  PostgreSQL's and Redis's spans under it) links to every traced claim of the batch, and
  is a child of the first one's; a batch with no traced claim makes no span;
- the outbox row of a claim's event keeps the context (``outbox.traceparent``), and the
  relay's publish of the event is a child span of it; the published event carries a
  ``traceparent`` header for its subscribers. The relay's own statements are not
  traced (a relay step serves many claims and is no claim's).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING

from opentelemetry import propagate, trace
from opentelemetry.context import Context, create_key, set_value
from opentelemetry.trace import Link, Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.sampling import Sampler, SamplingResult

TRACER = "flashclaim"
# A batch links to each claim it applies (at most BATCH_SIZE, 200 by default).
MAX_LINKS = 2_000
_state = {"enabled": False}
_tracers: list[Tracer] = []
# Set in a context by :func:`sampled`: the root span started in it is sampled.
_DECIDED = create_key("flashclaim-sampled")
_samplers: list[Sampler] = []


def _decided(configured: Sampler) -> Sampler:
    """The configured sampler, except for a root span :func:`sampled` already chose: a
    second draw would sample a ratio of the ratio. (Built here: the SDK is imported only
    when tracing is on.)"""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class Decided(Sampler):
        def __init__(self) -> None:
            self.configured = configured

        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if parent_context is not None and parent_context.get(_DECIDED):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return self.configured.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return self.configured.get_description()

    return Decided()


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces to be exported."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(service: str) -> bool:
    """Install the SDK for ``service`` if the environment asks for traces; whether it did.
    Called once per process (a gateway worker: after the fork)."""
    if not wanted():
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    named = bool(os.environ.get("OTEL_SERVICE_NAME"))  # the SDK reads it itself
    attributes = {} if named else {SERVICE_NAME: f"flashclaim-{service}"}
    provider = TracerProvider(
        resource=Resource.create(attributes), span_limits=SpanLimits(max_links=MAX_LINKS)
    )
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")
    for name in (e.strip() for e in exporters):
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    return True


def install(provider: trace.TracerProvider) -> None:
    """Trace through ``provider`` from now on, PostgreSQL and Redis calls included."""
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    _samplers.clear()
    if isinstance(provider, SdkTracerProvider):  # its sampler, asked by sampled() first
        configured = getattr(provider.sampler, "configured", provider.sampler)
        provider.sampler = _decided(configured)
        _samplers.append(configured)
    trace.set_tracer_provider(provider)
    # Looked up once: the provider builds and compares a scope at every get_tracer().
    _tracers.clear()
    if not PsycopgInstrumentor().is_instrumented_by_opentelemetry:
        PsycopgInstrumentor().instrument(skip_dep_check=True)
    if not RedisInstrumentor().is_instrumented_by_opentelemetry:
        RedisInstrumentor().instrument()
    _state["enabled"] = True


def enabled() -> bool:
    return _state["enabled"]


def sampled(headers: Mapping[str, str], name: str) -> Context | None:
    """The context to trace a request in, or ``None``: not sampled, so make no span and
    run it :func:`untraced`. The configured sampler decides, as it would for the span:
    a ``traceparent`` the client sent, or a draw for a new trace (kept: the span then
    started in the context is sampled)."""
    ctx = propagate.extract(headers) if "traceparent" in headers else Context()
    if not _samplers:  # a provider that is not the SDK's decides for itself
        return ctx
    parent = trace.get_current_span(ctx).get_span_context()
    trace_id = parent.trace_id if parent.is_valid else random.getrandbits(128)

    from opentelemetry.sdk.trace.sampling import Decision

    decision = _samplers[0].should_sample(ctx, trace_id, name).decision
    if decision is not Decision.RECORD_AND_SAMPLE:
        return None
    return ctx if parent.is_valid else set_value(_DECIDED, True, ctx)


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """No span for the database and Redis calls in this block (housekeeping: gauges read
    every few seconds would each be a trace of their own)."""
    if not _state["enabled"]:
        yield
        return
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield


def tracer() -> Tracer:
    if not _tracers:
        _tracers.append(trace.get_tracer(TRACER))
    return _tracers[0]


def current_traceparent() -> str | None:
    """The current span's context as a ``traceparent`` value, if it is sampled (``None``
    when off or not sampled: what follows a claim that is not traced makes no span)."""
    if not _state["enabled"] or not trace.get_current_span().get_span_context().trace_flags.sampled:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def context_of(traceparent: str | None) -> Context | None:
    """The remote context a ``traceparent`` names (``None`` if none, malformed or not
    sampled)."""
    if not traceparent:
        return None
    ctx = propagate.extract({"traceparent": traceparent})
    remote = trace.get_current_span(ctx).get_span_context()
    return ctx if remote.is_valid and remote.trace_flags.sampled else None


def extract(headers: Mapping[str, str]) -> Context:
    return propagate.extract(headers)


def inject(headers: MutableMapping[str, str], span: Span | None = None) -> None:
    """Put ``span``'s (default: the current span's) context in ``headers``."""
    propagate.inject(headers, trace.set_span_in_context(span) if span is not None else None)


def links(contexts: Iterable[Context | None]) -> list[Link]:
    return [Link(trace.get_current_span(c).get_span_context()) for c in contexts if c is not None]


def ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of the current span, in hex, if tracing and in one."""
    if not _state["enabled"]:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


__all__ = [
    "SpanKind",
    "StatusCode",
    "configure",
    "context_of",
    "current_traceparent",
    "enabled",
    "extract",
    "ids",
    "inject",
    "install",
    "links",
    "sampled",
    "tracer",
    "untraced",
    "wanted",
]
