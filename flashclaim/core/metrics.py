"""Prometheus metrics: every figure a process exposes, named and documented once here.

Each service builds its own set (:class:`GatewayMetrics`, :class:`ConsumerMetrics`,
:class:`RelayMetrics`) on a registry of its own, and hands it to the parts that count.
With ``METRICS_ENABLED`` off every metric is a no-op object (nothing is counted, which is
what ``make bench`` compares against). Labelled counters are created with every value
they can take, so a dashboard shows 0 rather than "no data" before the first event.

The gateway runs several worker processes behind one port: prometheus-client's
multiprocess mode keeps each worker's values in a file of its own under
``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` (whichever worker answers) sums them
(:func:`use_multiprocess`, :func:`exposition`). Gauges say how they combine: ``livesum``
(in-flight claims: the sum over the live workers) or ``liveall`` (one series a worker).
The consumer and the relay are one process each and serve their registry on a port of
their own (:func:`serve`). Queue and dead-letter depths are RabbitMQ's own (its
Prometheus plugin), not counted here.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import glob
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
    multiprocess,
    values,
)
from prometheus_client.exposition import ThreadingWSGIServer

from flashclaim import __version__
from flashclaim.core import tracing
from flashclaim.core.messages import Outcome

log = logging.getLogger(__name__)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Latency buckets (seconds): a claim's round trip is a few milliseconds, a held claim or
# a slow broker up to the claim wait (5 s by default).
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
# Message age at delivery: AMQP timestamps are whole seconds.
AGES = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
# How a claim got its answer: published and answered by a consumer; answered by the
# gateway at once from an answer it already knew (a holder, a sold-out coupon); held
# back by admission control until the coupon was known sold out.
PATHS = ("round_trip", "gateway", "held")
CLAIM_OUTCOMES = (*(o.code for o in Outcome), "pending")
PUBLISH_FAILURE_REASONS = ("not_connected", "circuit_open", "broker_error", "refused")
DEAD_LETTER_REASONS = ("poison", "failed")


class _Off:
    """A metric that records nothing (metrics disabled)."""

    def labels(self, *_: object, **__: object) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


OFF = _Off()


class _Set:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        info = self._gauge("flashclaim_build_info", "Version of the running code.", ["version"])
        info.labels(__version__).set(1)
        self.pool_connections = self._gauge(
            "flashclaim_db_pool_connections",
            "Connections of the PostgreSQL pool, by state (in_use, idle).",
            ["state"],
            mode="livesum",
        )
        self.pool_waiting = self._gauge(
            "flashclaim_db_pool_waiting",
            "Requests waiting for a PostgreSQL pool connection.",
            mode="livesum",
        )

    def _counter(
        self, name: str, doc: str, labels: Sequence[str] = (), each: Iterable[Sequence[str]] = ()
    ) -> Counter:
        if not self.enabled:
            return cast(Counter, OFF)
        metric = Counter(name, doc, labels, registry=self.registry)
        for values_ in each:  # every label value known in advance shows from the start
            metric.labels(*values_)
        return metric

    def _histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        if not self.enabled:
            return cast(Histogram, OFF)
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def _gauge(
        self, name: str, doc: str, labels: Sequence[str] = (), mode: str = "liveall"
    ) -> Gauge:
        if not self.enabled:
            return cast(Gauge, OFF)
        return Gauge(name, doc, labels, registry=self.registry, multiprocess_mode=mode)  # type: ignore[arg-type]

    def sample_pool(self, stats: dict[str, int]) -> None:
        """Pool figures from ``psycopg_pool``'s ``get_stats()``."""
        size = stats.get("pool_size", 0)
        idle = stats.get("pool_available", 0)
        self.pool_connections.labels("in_use").set(size - idle)
        self.pool_connections.labels("idle").set(idle)
        self.pool_waiting.set(stats.get("requests_waiting", 0))


class Tally:
    """A gateway worker's counts and observations since the last :meth:`flush`.

    In multiprocess mode each increment prometheus-client makes is a locked write to the
    worker's memory-mapped file: the figures of one claim cost 18 µs that way, against
    under 2 here. The gateway adds them up in the worker and hands the sums over once a
    second, before it answers a scrape and at exit: a figure is at most a second late
    on ``/metrics``, and never lost by a worker that stops. (An event loop's own: not
    thread-safe.) The histograms' sums and buckets are written as prometheus-client's
    ``Histogram.observe`` writes them; ``tests/unit/test_metrics.py`` holds the two to
    the same exposition."""

    def __init__(self) -> None:
        self._counts: dict[Counter, float] = {}
        self._observed: dict[Histogram, tuple[list[float], list[int]]] = {}

    def inc(self, child: Counter, amount: float = 1.0) -> None:
        self._counts[child] = self._counts.get(child, 0.0) + amount

    def observe(self, child: Histogram, value: float) -> None:
        seen = self._observed.get(child)
        bounds: list[float] = child._upper_bounds
        if seen is None:
            seen = self._observed[child] = ([0.0], [0] * len(bounds))
        seen[0][0] += value
        # The first bucket whose bound is at least the value (the last is +Inf).
        seen[1][bisect.bisect_left(bounds, value)] += 1

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        observed, self._observed = self._observed, {}
        for histogram, (total, buckets) in observed.items():
            histogram._sum.inc(total[0])
            for value, count in zip(histogram._buckets, buckets, strict=True):
                if count:
                    value.inc(count)


class GatewayMetrics(_Set):
    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled)
        self.tally = Tally()
        self.http_requests = self._counter(
            "flashclaim_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
        )
        self.http_duration = self._histogram(
            "flashclaim_http_request_duration_seconds",
            "Time to answer an HTTP request, by route and method.",
            LATENCY,
            ["route", "method"],
        )
        self.http_errors = self._counter(
            "flashclaim_http_errors",
            "Error answers, by the code of their JSON body (overloaded, service_unavailable...).",
            ["code"],
            # Shown at 0 before the first: a dashboard (and the console) reads refusals
            # as none rather than unknown.
            [("overloaded",), ("service_unavailable",)],
        )
        self.claims = self._counter(
            "flashclaim_claims",
            "Claims answered, by outcome (pending: answered 202) and by path.",
            ["outcome", "path"],
            [(o, p) for o in CLAIM_OUTCOMES for p in PATHS],
        )
        self.in_flight = self._gauge(
            "flashclaim_claims_in_flight",
            "Claims being handled now (read every second).",
            mode="livesum",
        )
        self.held = self._gauge(
            "flashclaim_claims_held",
            "Claims held back now while the claims in flight could take all the stock.",
            mode="livesum",
        )
        self.result_wait = self._histogram(
            "flashclaim_claim_result_wait_seconds",
            "Time from a claim's publish to its result (or to its 202).",
            LATENCY,
        )
        self.publish_confirm = self._histogram(
            "flashclaim_publish_confirm_seconds",
            "Time from a command's publish to the broker's confirm.",
            LATENCY,
        )
        self.publish_claims = self._histogram(
            "flashclaim_publish_claims", "Claims carried by one published command.", SIZES
        )
        self.publish_failures = self._counter(
            "flashclaim_publish_failures",
            "Publishes that failed (the claim was answered 503), by reason.",
            ["reason"],
            [(r,) for r in PUBLISH_FAILURE_REASONS],
        )
        self.breaker_open = self._gauge(
            "flashclaim_broker_breaker_open",
            "1 while the broker circuit breaker of a gateway worker is open.",
            mode="liveall",
        )
        # Children by label values, looked up once: a request records a few figures,
        # and prometheus-client's labels() takes a lock and builds a tuple each time.
        self._claims = {(o, p): self.claims.labels(o, p) for o in CLAIM_OUTCOMES for p in PATHS}
        self._requests: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def claim_answered(self, outcome: str, path: str) -> None:
        child = self._claims.get((outcome, path))
        if child is not None:
            self.tally.inc(child)

    def result_waited(self, seconds: float) -> None:
        if self.enabled:
            self.tally.observe(self.result_wait, seconds)

    def published(self, seconds: float, claims: int) -> None:
        if self.enabled:
            self.tally.observe(self.publish_confirm, seconds)
            self.tally.observe(self.publish_claims, claims)

    def flush(self) -> None:
        """The figures counted since the last flush, handed to prometheus-client."""
        self.tally.flush()

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        if not self.enabled:
            return
        key = (route, method, status)
        children = self._requests.get(key)
        if children is None:
            children = self._requests[key] = (
                self.http_requests.labels(route, method, str(status)),
                self.http_duration.labels(route, method),
            )
        self.tally.inc(children[0])
        self.tally.observe(children[1], seconds)


class ConsumerMetrics(_Set):
    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled)
        self.messages = self._counter(
            "flashclaim_consumer_messages", "Command messages delivered to this consumer."
        )
        self.redeliveries = self._counter(
            "flashclaim_consumer_redeliveries",
            "Command messages delivered again (redelivered by the broker).",
        )
        self.message_age = self._histogram(
            "flashclaim_consumer_message_age_seconds",
            "Age of a command message when it is delivered (from its timestamp).",
            AGES,
        )
        self.batch_claims = self._histogram(
            "flashclaim_consumer_batch_claims", "Claims applied in one transaction.", SIZES
        )
        self.apply_seconds = self._histogram(
            "flashclaim_consumer_apply_seconds",
            "Time to apply a batch in PostgreSQL, commit included.",
            LATENCY,
        )
        self.claims = self._counter(
            "flashclaim_consumer_claims",
            "Claims applied (first delivery), by outcome.",
            ["outcome"],
            [(o.code,) for o in Outcome],
        )
        self.inbox_duplicates = self._counter(
            "flashclaim_inbox_duplicates",
            "Claims delivered again after they were applied (answered from the inbox).",
        )
        self.retries = self._counter(
            "flashclaim_consumer_retries",
            "Failed attempts of a command, sent back to its queue to be tried again.",
        )
        self.dead_letters = self._counter(
            "flashclaim_dead_letters",
            "Claims moved to the dead-letter queue by the consumer, by reason.",
            ["reason"],
            [(r,) for r in DEAD_LETTER_REASONS],
        )
        self.holding = self._gauge(
            "flashclaim_consumer_holding",
            "1 while the database is unreachable and the consumer holds its messages.",
        )
        self.partitions = self._gauge(
            "flashclaim_consumer_partitions",
            "Command queues this consumer subscribes to, by role (active, standby).",
            ["role"],
        )
        self.inbox_failed = self._gauge(
            "flashclaim_inbox_failed",
            "Inbox rows FAILED (dead-lettered, waiting for an operator's replay).",
        )


class RelayMetrics(_Set):
    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled)
        self.published = self._counter(
            "flashclaim_outbox_published", "Events published and confirmed by the broker."
        )
        self.refused = self._counter(
            "flashclaim_outbox_refused", "Event publishes the broker refused (basic.nack)."
        )
        self.step_seconds = self._histogram(
            "flashclaim_outbox_step_seconds",
            "Time of one relay step (take, publish, confirm, mark sent).",
            LATENCY,
        )
        self.event_lag = self._histogram(
            "flashclaim_outbox_event_lag_seconds",
            "Time from an event's commit to the broker's confirm of its publish.",
            LATENCY,
        )
        self.pending = self._gauge("flashclaim_outbox_pending", "Outbox rows PENDING.")
        self.failed = self._gauge("flashclaim_outbox_failed", "Outbox rows FAILED.")
        self.oldest_pending = self._gauge(
            "flashclaim_outbox_oldest_pending_seconds",
            "Age of the oldest PENDING outbox row (0 when none): the relay's lag.",
        )


def use_multiprocess(directory: str | None = None) -> str:
    """Put this process (and the processes it forks next) in multiprocess mode, with
    their files in ``directory`` (default: ``PROMETHEUS_MULTIPROC_DIR``, or a new
    temporary folder), emptied first: what a gateway that ran before left there would
    be counted again."""
    import tempfile

    path = (
        directory
        or os.environ.get(MULTIPROC_VARIABLE)
        or tempfile.mkdtemp(prefix="flashclaim-metrics-")
    )
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)
    os.environ[MULTIPROC_VARIABLE] = path
    # prometheus-client picks its value class at import; metrics made from now on
    # (in the workers, after the fork) write to the folder.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return path


def refuse_multiprocess(service: str) -> None:
    """A consumer or a relay is one process with a registry of its own: with
    ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client would write every value to a file
    in that folder (and fail at the first metric when the folder is missing). The
    variable is the gateway's business (:func:`use_multiprocess`), so a deployment that
    sets it for every process is told so at start, not left to crash on a file."""
    if os.environ.get(MULTIPROC_VARIABLE):
        from flashclaim.core.errors import ConfigError

        raise ConfigError(
            f"{MULTIPROC_VARIABLE} is set ({os.environ[MULTIPROC_VARIABLE]!r}): only the "
            f"gateway's worker processes share a metrics folder; unset it for "
            f"`flashclaim {service}`"
        )


def worker_exited(pid: int) -> None:
    """A gateway worker is gone: its live gauges stop counting."""
    if os.environ.get(MULTIPROC_VARIABLE):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def exposition(metrics: _Set) -> bytes:
    """The text format of ``metrics``, summed over the gateway's workers in
    multiprocess mode."""
    if not metrics.enabled:
        return b""
    if os.environ.get(MULTIPROC_VARIABLE):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(metrics.registry)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes and probes are not worth a log line each


class Endpoint:
    """``/metrics`` and ``/healthz`` of a single process on a port of its own, served by
    a thread (a busy event loop does not delay a scrape).

    ``/healthz`` is the liveness of the process's **event loop**, which the thread alone
    could not show: a task of the loop beats every second, and ``/healthz`` answers
    ``503`` once no beat has come for ``stall_after`` seconds (a loop blocked by a
    synchronous call, a deadlock, a runaway computation). A server being away does not
    stop the beat: waiting for it is the loop's ordinary work. ``flashclaim/healthcheck.py``
    (the image's health check) and the Kubernetes probes ask it.

    Construct it inside the running loop; :meth:`close` stops both.
    """

    BEAT_SECONDS = 1.0

    def __init__(self, metrics: _Set, host: str, port: int, stall_after: float = 10.0) -> None:
        self._server: WSGIServer | None = None
        self._stall_after = stall_after
        self._last_beat = time.monotonic()
        self._beating: asyncio.Task[None] | None = None
        if not port:
            return
        self._beating = asyncio.get_running_loop().create_task(self._beat(), name="heartbeat")
        scrape = make_wsgi_app(metrics.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                return self._health(start_response)
            return cast(Iterable[bytes], scrape(environ, start_response))

        server_class = type(
            "Server",
            (ThreadingWSGIServer,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        self._server = make_server(host, port, app, server_class, handler_class=_Quiet)
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics served", extra={"url": f"http://{host}:{port}/metrics"})

    async def _beat(self) -> None:
        while True:
            self._last_beat = time.monotonic()
            await asyncio.sleep(self.BEAT_SECONDS)

    def _health(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        silent = time.monotonic() - self._last_beat
        alive = silent < self._stall_after
        body = json.dumps(
            {"status": "ok" if alive else "stalled", "loop_silent_seconds": round(silent, 3)}
        ).encode()
        start_response(
            "200 OK" if alive else "503 Service Unavailable",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def close(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            self._beating = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


async def sample_every(
    seconds: float, stop: asyncio.Event, *samplers: Callable[[], Awaitable[None] | None]
) -> None:
    """Call each sampler every ``seconds`` until ``stop``; a failing sampler is logged
    (once per failure streak) and tried again next time."""
    failing: set[int] = set()
    while not stop.is_set():
        for i, sampler in enumerate(samplers):
            try:
                with tracing.untraced():
                    done = sampler()
                    if done is not None:
                        await done
            except Exception as exc:  # a figure not read this time is read the next
                if i not in failing:
                    log.warning("metrics sample failed", extra={"error": repr(exc)})
                failing.add(i)
            else:
                failing.discard(i)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
