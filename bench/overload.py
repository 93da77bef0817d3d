"""A crowd three times too big: open-loop claims at three times the sustained capacity
for two minutes, between two stretches at half of it, sent through flashclaim's edge
(deploy/edge/haproxy.cfg, HAProxy in front of the gateways), and what becomes of them.

Phases (bench/openloop ``-phases``): 10 s at half the capacity (the baseline), 120 s at
three times it (the overload), 20 s at half again (the recovery). Every claim is for one
hot coupon that never sells out, so every claim let in goes to a consumer. Twice a second
a sampler reads the command queues' depth (RabbitMQ), the claims in flight in the
gateways (their /metrics), the requests waiting in the edge (its /metrics) and the
gateway processes' memory, so that a queue growing without bound, anywhere, shows.

The edge and the load generator run at real-time priority
(``flashclaim.devtools.edge.PRIORITY``, when the bench runs as root): they stand for an
edge and clients on machines of their own, and here share two cores with everything
else. An open loop starved of CPU sends late and counts its own lateness as the answer's
(with the generator at normal priority, its own queueing made the refusals' p99 close to
a second); an edge starved of it refuses late.

What is checked, beside its bound:

- the claims beyond capacity are refused quickly: ``503`` or ``429``, each with a
  ``Retry-After``, their p99 under 50 ms;
- the claims let in are answered within the claim wait: no ``202``, the slowest under
  ``CLAIM_WAIT_SECONDS``;
- no queue grows: the deepest command queue, the most claims in flight and the edge's
  longest queue of the overload's second minute are no more than those of its first
  (plus a margin);
- the recovery: from the load's drop, the seconds until every later second's p99 is
  within twice the baseline's (at least 10 ms over it), under 10.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import probes
from hdrh.histogram import HdrHistogram

from flashclaim.core.settings import Settings
from flashclaim.devtools.edge import PRIORITY

BASELINE_S, OVERLOAD_S, RECOVERY_S = 10, 120, 20
REFUSAL_P99_TARGET_MS = 50.0
RECOVERY_TARGET_S = 10.0


@dataclass
class Answer:
    due: float  # seconds from the start of the run
    latency: float  # seconds, from when it was due
    status: int
    retry_after: bool

    @property
    def refused(self) -> bool:
        return self.status in (429, 503)


@dataclass
class Samples:
    """Read twice a second during the run: (seconds from the start, value)."""

    queued: list[tuple[float, int]] = field(default_factory=list)
    in_flight: list[tuple[float, float]] = field(default_factory=list)
    edge_queue: list[tuple[float, float]] = field(default_factory=list)
    gateway_rss_mb: list[tuple[float, float]] = field(default_factory=list)


def _p99_ms(latencies: list[float]) -> float:
    if not latencies:
        return float("nan")
    h = HdrHistogram(1, 600_000_000, 3)
    for seconds in latencies:
        h.record_value(max(1, int(seconds * 1_000_000)))
    return float(h.get_value_at_percentile(99)) / 1000


def _gauge(metrics_url: str, name: str) -> float:
    """The sum of a gauge's series on a Prometheus page."""
    with urllib.request.urlopen(metrics_url, timeout=2) as r:
        text = r.read().decode()
    pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def _sample(
    settings: Settings,
    metrics_url: str,
    edge_metrics_url: str,
    workers: Callable[[], list[int]],
    started: float,
    stop: threading.Event,
    into: Samples,
) -> None:
    async def run() -> None:
        async with await aio_pika.connect(settings.amqp_url) as connection:
            channel = await connection.channel()
            while not stop.is_set():
                now = time.monotonic() - started
                depth = 0
                for name in settings.topology().claims_queues:
                    queue = await channel.declare_queue(name, passive=True)
                    depth += queue.declaration_result.message_count or 0
                into.queued.append((now, depth))
                with contextlib.suppress(OSError):
                    in_flight = await asyncio.to_thread(
                        _gauge, metrics_url, "flashclaim_claims_in_flight"
                    )
                    into.in_flight.append((now, in_flight))
                with contextlib.suppress(OSError):
                    waiting = await asyncio.to_thread(
                        _gauge, edge_metrics_url, "haproxy_backend_current_queue"
                    )
                    into.edge_queue.append((now, waiting))
                into.gateway_rss_mb.append(
                    (now, max((probes.memory_mb(p) for p in workers()), default=0))
                )
                await asyncio.sleep(0.5)

    asyncio.run(run())


def run(
    binary: Path,
    edge_url: str,
    edge_metrics_url: str,
    gateway_url: str,
    coupon: str,
    capacity: float,
    settings: Settings,
    workers: Callable[[], list[int]],
) -> tuple[list[Answer], Samples, dict[str, float]]:
    """The three phases through the edge at ``edge_url``, in front of the gateways at
    ``gateway_url``; every answer, the samples, and the rates."""
    low, high = max(1, round(capacity / 2)), max(1, round(3 * capacity))
    phases = f"{low}:{BASELINE_S}s,{high}:{OVERLOAD_S}s,{low}:{RECOVERY_S}s"
    samples = Samples()
    stop = threading.Event()
    started = time.monotonic()
    sampler = threading.Thread(
        target=_sample,
        args=(
            settings,
            f"{gateway_url}/metrics",
            edge_metrics_url,
            workers,
            started,
            stop,
            samples,
        ),
        daemon=True,
    )
    sampler.start()
    try:
        done = subprocess.run(
            [
                *PRIORITY,
                str(binary),
                f"-url={edge_url}/api/coupons/claim",
                f"-coupon={coupon}",
                f"-phases={phases}",
                "-users=over",
                # Enough that a refusal never waits for a connection: the claims let in
                # hold theirs for up to a second, the refused for a few milliseconds.
                "-connections=6000",
                "-max-outstanding=30000",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        stop.set()
        sampler.join(10)
    for line in done.stderr.splitlines():
        print(f"bench: {line}", file=sys.stderr)
    answers = []
    for line in done.stdout.splitlines():
        due_us, latency_us, status, retry_after = (int(x) for x in line.split())
        answers.append(Answer(due_us / 1e6, latency_us / 1e6, status, bool(retry_after)))
    answers.sort(key=lambda a: a.due)
    return answers, samples, {"low": low, "high": high}


def figures(
    answers: list[Answer], samples: Samples, rates: dict[str, float], claim_wait: float
) -> dict[str, Any]:
    """The figures of the row, each with what it is checked against."""
    start, end = BASELINE_S, BASELINE_S + OVERLOAD_S
    over = [a for a in answers if start <= a.due < end]
    baseline = [a for a in answers if a.due < start]
    refused = [a for a in over if a.refused]
    let_in = [a for a in over if not a.refused]
    baseline_p99 = _p99_ms([a.latency for a in baseline])
    # Recovery: by the second the claims were due in, after the drop.
    bound = max(2 * baseline_p99, baseline_p99 + 10)
    after: dict[int, list[float]] = {}
    for a in answers:
        if a.due >= end:
            after.setdefault(int(a.due - end), []).append(a.latency)
    recovered = None
    for second in sorted(after):
        if all(_p99_ms(after[s]) <= bound for s in after if s >= second):
            recovered = float(second)
            break

    def peak(series: list[tuple[float, Any]], lo: float, hi: float) -> float:
        return max((v for t, v in series if lo <= t < hi), default=0.0)

    middle_of = start + OVERLOAD_S / 2
    return {
        "offered": rates["high"],
        "recovery_rate": rates["low"],
        "let_in_per_s": len(let_in) / OVERLOAD_S,
        "refused": len(refused),
        "refused_share": len(refused) / max(len(over), 1),
        "refusals_without_retry_after": sum(1 for a in refused if not a.retry_after),
        "refusal_p99_ms": _p99_ms([a.latency for a in refused]),
        "let_in_p99_ms": _p99_ms([a.latency for a in let_in]),
        "let_in_max_ms": 1000 * max((a.latency for a in let_in), default=0.0),
        "pending_202": sum(1 for a in over if a.status == 202),
        "other_errors": sum(1 for a in answers if a.status >= 500 and a.status != 503)
        + sum(1 for a in answers if a.status == 0),
        "claim_wait_ms": 1000 * claim_wait,
        "baseline_p99_ms": baseline_p99,
        "recovered_after_s": recovered if recovered is not None else float("inf"),
        "queued_first_minute": peak(samples.queued, start, middle_of),
        "queued_second_minute": peak(samples.queued, middle_of, end),
        "in_flight_first_minute": peak(samples.in_flight, start, middle_of),
        "in_flight_second_minute": peak(samples.in_flight, middle_of, end),
        "edge_queue_first_minute": peak(samples.edge_queue, start, middle_of),
        "edge_queue_second_minute": peak(samples.edge_queue, middle_of, end),
        "gateway_rss_first_minute_mb": peak(samples.gateway_rss_mb, start, middle_of),
        "gateway_rss_second_minute_mb": peak(samples.gateway_rss_mb, middle_of, end),
    }


def bounded(first: float, second: float, margin: float) -> bool:
    """The second minute's peak no more than the first's, give or take ``margin``."""
    return second <= first * 1.25 + margin


def met(f: dict[str, Any]) -> dict[str, bool]:
    return {
        "refused quickly": f["refusal_p99_ms"] < REFUSAL_P99_TARGET_MS
        and f["refusals_without_retry_after"] == 0,
        "let in answered within the claim wait": f["pending_202"] == 0
        and f["let_in_max_ms"] < f["claim_wait_ms"]
        and f["other_errors"] == 0,
        "no queue grows": bounded(f["queued_first_minute"], f["queued_second_minute"], 200)
        and bounded(f["in_flight_first_minute"], f["in_flight_second_minute"], 200)
        and bounded(f["edge_queue_first_minute"], f["edge_queue_second_minute"], 200)
        and bounded(f["gateway_rss_first_minute_mb"], f["gateway_rss_second_minute_mb"], 10),
        "recovered": f["recovered_after_s"] <= RECOVERY_TARGET_S,
    }


def chart(answers: list[Answer], samples: Samples, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = int(max((a.due for a in answers), default=0)) + 1
    offered = [0] * seconds
    let_in = [0] * seconds
    refused = [0] * seconds
    lat_in: list[list[float]] = [[] for _ in range(seconds)]
    lat_refused: list[list[float]] = [[] for _ in range(seconds)]
    for a in answers:
        s = int(a.due)
        offered[s] += 1
        if a.refused:
            refused[s] += 1
            lat_refused[s].append(a.latency)
        else:
            let_in[s] += 1
            lat_in[s].append(a.latency)
    xs = list(range(seconds))
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    top.plot(xs, offered, color="grey", linestyle="--", label="offered")
    top.plot(xs, let_in, label="let in (answered)")
    top.plot(xs, refused, label="refused (503/429)")
    top.set_ylabel("claims per second")
    top.legend(loc="upper right")
    top.set_title("overload: three times the sustained capacity for two minutes, through the edge")
    middle.plot(
        xs, [max(_p99_ms(v), 0.01) if v else float("nan") for v in lat_in], label="p99, let in"
    )
    middle.plot(
        xs,
        [max(_p99_ms(v), 0.01) if v else float("nan") for v in lat_refused],
        label="p99, refused",
    )
    middle.axhline(REFUSAL_P99_TARGET_MS, color="grey", linestyle=":", label="50 ms")
    middle.set_yscale("log")
    middle.set_ylabel("latency from due (ms)")
    middle.legend(loc="upper right")
    bottom.plot(
        [t for t, _ in samples.queued],
        [v for _, v in samples.queued],
        label="messages in the command queues",
    )
    bottom.plot(
        [t for t, _ in samples.in_flight],
        [v for _, v in samples.in_flight],
        label="claims in flight, gateways",
    )
    bottom.plot(
        [t for t, _ in samples.edge_queue],
        [v for _, v in samples.edge_queue],
        label="requests waiting in the edge",
    )
    bottom.set_ylabel("count")
    bottom.set_xlabel("second of the run (by when each claim was due)")
    bottom.legend(loc="upper right")
    for axis in (top, middle, bottom):
        axis.axvspan(BASELINE_S, BASELINE_S + OVERLOAD_S, color="red", alpha=0.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
