"""The gateway's tally: figures added up in the worker and handed to prometheus-client
once a second read exactly as if each had been written at once."""

from __future__ import annotations

import random

from prometheus_client import generate_latest

from flashclaim.core.metrics import LATENCY, GatewayMetrics


def exposition(m: GatewayMetrics) -> list[str]:
    """The text format, without the creation timestamps (they differ by construction)."""
    text = generate_latest(m.registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_a_flushed_tally_reads_as_the_same_figures_written_one_by_one() -> None:
    tallied, direct = GatewayMetrics(), GatewayMetrics()
    rng = random.Random(7)
    # Values on the buckets' bounds too: a bound's value falls in that bucket.
    values = [rng.choice([*LATENCY, 0.0, 30.0]) for _ in range(50)]
    values += [rng.uniform(0, 12) for _ in range(500)]
    for i, seconds in enumerate(values):
        status = 200 if i % 3 else 400
        tallied.request_done("/api/coupons/claim", "POST", status, seconds)
        tallied.claim_answered("claimed" if i % 2 else "out_of_stock", "round_trip")
        tallied.result_waited(seconds)
        tallied.published(seconds, 1 + i % 7)
        direct.http_requests.labels("/api/coupons/claim", "POST", str(status)).inc()
        direct.http_duration.labels("/api/coupons/claim", "POST").observe(seconds)
        direct.claims.labels("claimed" if i % 2 else "out_of_stock", "round_trip").inc()
        direct.result_wait.observe(seconds)
        direct.publish_confirm.observe(seconds)
        direct.publish_claims.observe(1 + i % 7)
    assert exposition(tallied) != exposition(direct)  # nothing is written before a flush
    tallied.flush()
    assert exposition(tallied) == exposition(direct)
    tallied.flush()  # a second flush adds nothing
    assert exposition(tallied) == exposition(direct)


def test_figures_turned_off_are_not_tallied() -> None:
    off = GatewayMetrics(enabled=False)
    off.request_done("/api/coupons/claim", "POST", 200, 0.01)
    off.result_waited(0.01)
    off.published(0.01, 3)
    off.claim_answered("claimed", "round_trip")
    off.flush()
    assert generate_latest(off.registry) == b""
