"""`make bench`: flashclaim's figures beside the floors and ceilings of the same run.

Starts its own servers (profile ``bench``: own ports, durable settings), a consumer and
a gateway with two worker processes, then measures, each figure next to what bounds it:

1. ceilings of the database alone (pgbench on one hot coupon row): one transaction per
   claim (8 clients), and 100 claims a transaction (2 clients);
2. bursts of 10,000 claims for 100 in stock from 1,000 and from 10,000 clients at once,
   beside the same bursts of ``GET /healthz`` (the HTTP floor);
3. sustained valid claims on one hot coupon from 128 keep-alive clients (wrk), beside
   the invalid-claim ``400`` path (no pipeline) and the one-transaction-per-claim
   ceiling, with the CPU each process spent per claim;
4. open-loop claims at 1,000 and 2,000 per second (latency from the schedule), sent by
   bench/openloop, a generator compiled with Go so that the load's CPU stays small;
5. three times the sustained capacity for two minutes, open loop, through the edge
   (deploy/edge/haproxy.cfg), between two stretches at half of it: the claims beyond
   capacity refused at once, the ones let in answered within the claim wait, no queue
   growing, and how soon latency is back after (bench/overload.py);
6. one consumer draining 100,000 claims of one hot coupon queued beforehand, beside the
   batched ceiling; then one relay publishing their 100,000 events, beside the rate of
   the sustained run (it must keep up with the consumer);
7. the peak memory of every gateway, consumer and relay process;
8. the sustained run again with metrics and tracing off, then on: what observability
   costs (spans exported to a local OTLP receiver that keeps nothing, bench/otlp_sink.py).

An outbox relay runs throughout, as under ``make run`` (its CPU is in the figures), except
while the consumer drains its backlog.

Prints a table (measure, figure, bound, target) and writes ``reports/bench/results.json``
and a chart per load scenario, then ``docs/BENCHMARKS.md``: that table and the charts of
the bursts and the open-loop runs (copied to ``docs/benchmarks/``), with the notes of the
file it replaces kept as they were (everything below the notes marker, written by
people). One run on whatever machine runs it: compare figures only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import drain
import overload
import probes
import psycopg

from flashclaim.core.schema_migrations import migrate
from flashclaim.core.settings import Settings
from flashclaim.devtools import edge
from flashclaim.devtools.devstack import Stack
from flashclaim.devtools.loadreport import Report
from flashclaim.devtools.loadtest import run_scenario
from flashclaim.devtools.processes import start_service, terminate

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench"
DOC = ROOT / "docs" / "BENCHMARKS.md"
DOC_CHARTS = ROOT / "docs" / "benchmarks"


def notes_marker(command: str) -> str:
    """The line of a generated page below which people write, and ``command`` keeps."""
    return f"<!-- notes: written by people; `{command}` keeps everything below this line -->"


# The charts the page shows: (file in OUT, caption).
CHARTS = (
    ("burst-1000.png", "10,000 claims for 100 in stock, 1,000 clients at a time"),
    ("burst-10000.png", "10,000 claims for 100 in stock, 10,000 clients at a time"),
    ("sustained-1000.png", "open loop, 1,000 claims a second on one hot coupon"),
    ("sustained-2000.png", "open loop, 2,000 claims a second on one hot coupon"),
    (
        "overload.png",
        "three times the sustained capacity for two minutes, open loop, through the edge",
    ),
)
PORT = 18080
BASE = f"http://127.0.0.1:{PORT}"
EDGE_PORT, EDGE_METRICS_PORT = 18090, 18405
MEMORY_TARGET_MB = 200
# A gateway worker holding half of 10,000 clients' connections and claims at once.
BURST_MEMORY_TARGET_MB = 150
SINK_PORT = 24318
# (name, metrics on, log level, OTEL_* variables) of the observability runs; tracing
# exports to the sink whenever variables are given.
OBSERVABILITY: tuple[tuple[str, bool, str, dict[str, str]], ...] = (
    ("metrics off, tracing off", False, "WARNING", {}),
    ("metrics on, tracing off (the default)", True, "WARNING", {}),
    ("metrics on, logs at INFO as under make run (an access line a request)", True, "INFO", {}),
    (
        "metrics on, 1% of claims traced",
        True,
        "WARNING",
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    ),
    (
        "metrics on, every claim traced",
        True,
        "WARNING",
        {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    ),
)
# CPU a claim over every process (the load generator's included) in the wrk run.
CPU_TARGET_MS = 0.35
# The observability runs with a target: (name, of the bare run, of the pgbench ceiling).
OBSERVABILITY_TARGETS = {
    OBSERVABILITY[2][0]: (None, 2.5),
    OBSERVABILITY[3][0]: (0.9, None),
}


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def wait_listening(timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", PORT), 0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("gateway did not start")


async def scenario(name: str, chart: str, **params: Any) -> Report:
    report = await run_scenario(name, BASE, {"connections": 512, **params}, progress=False)
    report.write_chart(OUT / f"{chart}.png")
    say(
        f"{chart}: {report.seconds:.2f} s, {report.throughput:,.0f}/s, "
        f"p99 {report.percentiles_ms()['p99']:.1f} ms, checks {'ok' if report.ok else 'FAILED'}"
    )
    return report


class Bench:
    def __init__(self, stack: Stack, settings: Settings) -> None:
        self.stack = stack
        self.settings = settings
        self.log = OUT / "services.log"
        self.consumer: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.figures: dict[str, Any] = {}
        self.reports: dict[str, Report] = {}
        self.peaks: dict[str, float] = {}

    # -- processes -------------------------------------------------------------------

    def start_consumer(self) -> None:
        self.consumer = start_service("consumer", self.settings.environ(), self.log)

    def stop_consumer(self) -> None:
        self._stop(self.consumer)
        self.consumer = None

    def start_relay(self) -> None:
        self.relay = start_service("relay", self.settings.environ(), self.log)

    def stop_relay(self) -> None:
        self._stop(self.relay)
        self.relay = None

    def _stop(self, proc: subprocess.Popen[bytes] | None) -> None:
        """Stop ``proc`` (its peak memory noted first)."""
        if proc is not None:
            self.note_memory()
            terminate([proc], 30)

    def workers(self) -> list[int]:
        return probes.children(self.gateway.pid) if self.gateway else []

    def meter(self) -> probes.CpuMeter:
        s = self.stack
        assert s.postgres and s.rabbitmq and s.redis and s.postgres.proc and s.rabbitmq.proc
        assert s.redis.proc
        pg, mq, rd = s.postgres.proc.pid, s.rabbitmq.proc.pid, s.redis.proc.pid
        return probes.CpuMeter(
            {
                "gateway workers": self.workers,
                "consumer": lambda: [self.consumer.pid] if self.consumer else [],
                "relay": lambda: [self.relay.pid] if self.relay else [],
                "RabbitMQ": lambda: probes.group(mq),
                "PostgreSQL": lambda: probes.family(pg),
                "Redis": lambda: probes.group(rd),
            }
        )

    def note_memory(self) -> None:
        for i, pid in enumerate(self.workers()):
            self.peaks[f"gateway worker {i}"] = max(
                self.peaks.get(f"gateway worker {i}", 0.0), probes.peak_rss_mb(pid)
            )
        for name, proc in (("consumer", self.consumer), ("relay", self.relay)):
            if proc is not None:
                self.peaks[name] = max(self.peaks.get(name, 0.0), probes.peak_rss_mb(proc.pid))

    # -- measures --------------------------------------------------------------------

    def ceilings(self) -> None:
        pg = self.stack.postgres
        assert pg is not None
        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO coupons (name, amount, remaining_amount) "
                "VALUES ('PGBENCH_HOT', 2000000000, 2000000000) ON CONFLICT DO NOTHING"
            )
        say("pgbench: one transaction per claim (10 s), then 100 claims a transaction (10 s)")
        self.figures["pgbench_one_per_tx"] = probes.pgbench(
            pg.bindir, pg.port, ROOT / "bench" / "pgbench_claim.sql", 10, 8, "flashclaim"
        )
        self.figures["pgbench_batched"] = 100 * probes.pgbench(
            pg.bindir, pg.port, ROOT / "bench" / "pgbench_batch.sql", 10, 2, "flashclaim"
        )
        # The ceilings leave about half a million rows that are not the product's: gone
        # before the product's runs, so that none of them pays for vacuuming them.
        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            conn.execute("TRUNCATE claims, inbox, outbox")
            conn.execute("DELETE FROM coupons WHERE name = 'PGBENCH_HOT'")
            conn.execute("VACUUM ANALYZE coupons, claims, inbox, outbox")

    async def bursts(self) -> None:
        for clients in (1000, 10_000):
            self.reports[f"floor_{clients}"] = await scenario(
                "http-floor",
                f"http-floor-{clients}",
                requests=10_000,
                concurrency=clients,
                connections=clients,
            )
            self.reports[f"burst_{clients}"] = await scenario(
                "flash-sale",
                f"burst-{clients}",
                users=10_000,
                stock=100,
                concurrency=clients,
                connections=clients,
            )
        # The gateway workers' peaks so far (the bursts are their heaviest moment).
        self.note_memory()
        self.figures["burst_gateway_peak_mb"] = max(
            mb for name, mb in self.peaks.items() if name.startswith("gateway worker")
        )

    def sustained_wrk(self) -> None:
        coupon = self.hot_coupon("WRK")
        script = ROOT / "bench" / "claims.lua"
        say("wrk: the invalid-claim 400 path (10 s, 128 connections)")
        self.figures["wrk_invalid"] = probes.wrk(BASE, script, [coupon, "x", "invalid"], 10, 128)
        say("wrk: valid claims on one hot coupon (10 s, 128 connections)")
        meter = self.meter()
        meter.start()
        self.figures["wrk_claims"] = result = probes.wrk(BASE, script, [coupon, "w"], 10, 128)
        cpu = meter.stop()
        with psycopg.connect(self.settings.database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM claims WHERE coupon_name = %s", (coupon,)
            ).fetchone()
        granted = int(row[0]) if row else 0
        result["granted"] = granted
        # The relay's lag: events still pending when the load stopped, and how long it
        # took to publish them.
        started = time.monotonic()
        self.figures["relay_backlog"] = drain.pending_events(self.settings)
        while drain.pending_events(self.settings) and time.monotonic() - started < 120:
            time.sleep(0.1)
        self.figures["relay_catch_up_s"] = time.monotonic() - started
        self.figures["cpu_ms_per_claim"] = {
            name: 1000 * seconds / max(granted, 1) for name, seconds in cpu.items()
        }
        self.note_memory()

    def open_loop(self, rates: tuple[int, ...] = (1000, 2000)) -> None:
        """Claims at 1,000 and 2,000 a second on one hot coupon, from bench/openloop (a
        compiled open-loop generator: the load's own CPU stays small beside the system's,
        which a Python generator's was not)."""
        binary = probes.build_openloop(OUT / "openloop")
        for rate in rates:
            coupon = self.hot_coupon(f"OPEN{rate}")
            say(f"open loop: {rate:,} claims a second on one hot coupon (10 s)")
            meter = self.meter()
            meter.start()
            recorder, seconds = probes.openloop(
                binary, f"{BASE}/api/coupons/claim", coupon, rate, 10, f"ol{rate}"
            )
            cpu = meter.stop()
            params = {"rate": rate, "duration": 10, "coupons": 1, "generator": "bench/openloop"}
            report = Report("sustained", params, recorder, seconds)
            report.checks["every claim answered 200"] = recorder.statuses[200] == recorder.sent
            report.write_chart(OUT / f"sustained-{rate}.png")
            lat = report.percentiles_ms()
            say(
                f"sustained-{rate}: {report.throughput:,.0f}/s, p50 {lat['p50']:.1f} ms, "
                f"p99 {lat['p99']:.1f} ms, checks {'ok' if report.ok else 'FAILED'}"
            )
            self.reports[f"fixed_{rate}"] = report
            self.figures[f"cpu_ms_per_claim_{rate}"] = {
                name: 1000 * seconds / max(recorder.done, 1) for name, seconds in cpu.items()
            }
            self.note_memory()

    def overload(self) -> None:
        """Three times the capacity the wrk run measured, for two minutes
        (bench/overload.py), through the edge (deploy/edge/haproxy.cfg) in front of the
        gateway as it runs in every other row."""
        binary = probes.build_openloop(OUT / "openloop")
        capacity = self.figures["wrk_claims"]["rate"]
        coupon = self.hot_coupon("OVER")
        say(
            f"overload: {3 * capacity:,.0f} claims a second for {overload.OVERLOAD_S} s,"
            f" between {overload.BASELINE_S} s and {overload.RECOVERY_S} s at"
            f" {capacity / 2:,.0f}, through the edge"
        )
        with edge.running(
            EDGE_PORT, EDGE_METRICS_PORT, f"127.0.0.1:{PORT}", OUT / "edge.log", prioritized=True
        ) as front:
            answers, samples, rates = overload.run(
                binary,
                front.url,
                front.metrics_url,
                BASE,
                coupon,
                capacity,
                self.settings,
                self.workers,
            )
        f = overload.figures(answers, samples, rates, self.settings.claim_wait_seconds)
        self.figures["overload"] = f
        overload.chart(answers, samples, OUT / "overload.png")
        say(
            f"overload: {f['let_in_per_s']:,.0f}/s let in, {f['refused_share']:.0%} refused"
            f" (p99 {f['refusal_p99_ms']:.1f} ms), let in p99 {f['let_in_p99_ms']:.0f} ms,"
            f" back within {f['recovered_after_s']:.0f} s"
        )
        self.note_memory()

    def drain(self, claims: int = 100_000) -> None:
        self.stop_consumer()
        self.stop_relay()
        coupon = f"DRAIN_{uuid.uuid4().hex[:8]}"
        say(f"drain: queueing {claims:,} claims (messages of 100) with no consumer running")
        asyncio.run(drain.queue_claims(self.settings, coupon, claims, 100))
        say("drain: one consumer applies them")
        self.start_consumer()
        self.figures["drain"] = drain.wait_applied(self.settings, coupon, claims, 300)
        self.note_memory()
        say(f"relay: one relay publishes the {claims:,} events of those claims")
        self.start_relay()
        events, self.figures["relay_rate"] = drain.wait_relayed(self.settings, coupon, 300)
        self.figures["relay_events"] = events
        self.note_memory()

    def observability(self, repeats: int = 3) -> None:
        """The sustained wrk run for each configuration of OBSERVABILITY, ``repeats``
        times in turn (the medians are reported), the gateway, consumer and relay started
        with it each time."""
        sink = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "otlp_sink.py"), "--port", str(SINK_PORT)]
        )
        coupon = self.hot_coupon("OBS")
        script = ROOT / "bench" / "claims.lua"
        export = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{SINK_PORT}"}
        samples: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in OBSERVABILITY}
        try:
            for repeat in range(repeats):
                for i, (name, metrics_on, level, otel) in enumerate(OBSERVABILITY):
                    self.restart(metrics_on, {**export, **otel} if otel else {}, level)
                    say(f"wrk: sustained claims, {name} ({repeat + 1}/{repeats}, 10 s)")
                    spans = _spans_received()
                    meter = self.meter()
                    meter.start()
                    result = probes.wrk(BASE, script, [coupon, f"o{repeat}_{i}_"], 10, 128)
                    cpu = meter.stop()
                    # Spans still batched in the services are sent as they stop.
                    self.stop_services()
                    claims = max(result["requests"], 1)
                    samples[name].append(
                        {
                            "rate": result["rate"],
                            "p99_ms": result["p99_ms"],
                            "cpu_ms_per_claim": 1000 * sum(cpu.values()) / claims,
                            "spans_per_claim": (_spans_received() - spans) / claims,
                        }
                    )
        finally:
            terminate([sink], 10)
        self.figures["observability"] = [
            {"name": name, **{k: statistics.median(s[k] for s in runs) for k in runs[0]}}
            for name, runs in samples.items()
        ]
        self.figures["observability_runs"] = samples

    def stop_services(self) -> None:
        self.note_memory()
        terminate([p for p in (self.gateway, self.consumer, self.relay) if p], 30)
        self.gateway = self.consumer = self.relay = None

    def hot_coupon(self, prefix: str) -> str:
        coupon = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO coupons (name, amount, remaining_amount) VALUES (%s, %s, %s)",
                (coupon, 10_000_000, 10_000_000),
            )
        return coupon

    def restart(self, metrics_on: bool, otel: dict[str, str], log_level: str = "WARNING") -> None:
        """The gateway, the consumer and the relay again, with metrics on or off, these
        OTEL_* variables (tracing on when any is given) and this log level."""
        self.stop_services()
        settings = self.settings.replace(metrics_enabled=metrics_on, log_level=log_level).environ()
        base = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **otel}
        self.consumer = start_service("consumer", settings, self.log, base)
        self.relay = start_service("relay", settings, self.log, base)
        self.gateway = start_service("gateway", settings, self.log, base)
        wait_listening()
        time.sleep(1)

    # -- the table -------------------------------------------------------------------

    def table(self) -> list[tuple[str, str, str, str]]:
        f, r = self.figures, self.reports
        one, batched = f["pgbench_one_per_tx"], f["pgbench_batched"]
        rows = []
        for clients, bound in ((1000, 1.3), (10_000, 1.2)):
            burst, floor = r[f"burst_{clients}"], r[f"floor_{clients}"]
            statuses = burst.recorder.statuses
            ratio = burst.seconds / floor.seconds
            rows.append(
                (
                    f"burst: 10,000 claims for 100 in stock, {clients:,} clients at a time",
                    f"all answered in {burst.seconds:.2f} s = {ratio:.2f}x the floor "
                    f"({statuses[200]} winners, {statuses[202]} x 202, "
                    f"{sum(v for k, v in statuses.items() if k >= 500)} x 5xx)",
                    f"the same burst of GET /healthz: {floor.seconds:.2f} s",
                    _target(ratio <= bound, f"<= {bound}x the floor (the contract's: 1.5x)"),
                )
            )
        peak = f["burst_gateway_peak_mb"]
        rows.append(
            (
                "bursts: the largest gateway worker's peak memory",
                f"{peak:.0f} MB",
                "",
                _target(peak < BURST_MEMORY_TARGET_MB, f"< {BURST_MEMORY_TARGET_MB} MB"),
            )
        )
        claims, invalid = f["wrk_claims"], f["wrk_invalid"]
        rows.append(
            (
                "sustained, one hot coupon, 128 keep-alive clients (wrk, 10 s)",
                f"{claims['rate']:,.0f} claims/s = {claims['rate'] / one:.2f}x the ceiling "
                f"(p99 {claims['p99_ms']:.0f} ms, {claims['non_2xx']:.0f} non-2xx)",
                f"invalid-claim 400 path: {invalid['rate']:,.0f} req/s; "
                f"one transaction per claim (pgbench): {one:,.0f} tx/s",
                _target(claims["rate"] >= 3 * one, ">= 3x the pgbench ceiling"),
            )
        )
        for rate, target in ((1000, 50.0), (2000, 100.0)):
            rep = r[f"fixed_{rate}"]
            lat = rep.percentiles_ms()
            rows.append(
                (
                    f"open loop {rate:,} claims/s, one hot coupon (10 s)",
                    f"achieved {rep.throughput:,.0f}/s, p50 {lat['p50']:.1f} ms, "
                    f"p99 {lat['p99']:.1f} ms",
                    "",
                    _target(lat["p99"] <= target, f"p99 <= {target:.0f} ms"),
                )
            )
        rows.extend(overload_rows(f["overload"], claims["rate"]))
        rows.append(
            (
                "one consumer draining one hot coupon (100,000 claims queued first)",
                f"{f['drain']:,.0f} claims/s",
                f"batched SQL ceiling (pgbench, 100 claims/tx): {batched:,.0f} claims/s",
                _target(f["drain"] >= 20_000, ">= 20,000 claims/s"),
            )
        )
        rows.append(
            (
                f"one relay publishing {f['relay_events']:,} queued events (outbox to broker)",
                f"{f['relay_rate']:,.0f} events/s; in the wrk run, "
                f"{f['relay_backlog']:,} events pending when it stopped, "
                f"published {f['relay_catch_up_s']:.1f} s later",
                f"the sustained run's claims: {claims['rate']:,.0f}/s",
                _target(f["relay_rate"] >= claims["rate"], ">= the sustained claim rate"),
            )
        )
        for key, run in (("cpu_ms_per_claim", "the wrk run"), ("cpu_ms_per_claim_1000", "1,000/s")):
            cpu = f[key]
            total = sum(cpu.values())
            rows.append(
                (
                    f"CPU per claim in {run}, by process (ms)",
                    ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()) + f"; all {total:.3f}",
                    "",
                    _target(total <= CPU_TARGET_MS, f"<= {CPU_TARGET_MS} ms, all")
                    if key == "cpu_ms_per_claim"
                    else "",
                )
            )
        runs = f["observability"]
        bare = runs[0]
        for run in runs:
            of_bare, of_ceiling = OBSERVABILITY_TARGETS.get(run["name"], (None, None))
            goal = ""
            if of_bare is not None:
                goal = _target(run["rate"] >= of_bare * bare["rate"], f">= {of_bare}x the bare run")
            if of_ceiling is not None:
                goal = _target(
                    run["rate"] >= of_ceiling * one, f">= {of_ceiling}x the pgbench ceiling"
                )
            rows.append(
                (
                    f"sustained (wrk, 10 s, median of 3), {run['name']}",
                    f"{run['rate']:,.0f} claims/s = {run['rate'] / bare['rate']:.2f}x the bare run"
                    f" = {run['rate'] / one:.2f}x the pgbench ceiling"
                    f" (p99 {run['p99_ms']:.0f} ms), CPU {run['cpu_ms_per_claim']:.3f} ms a"
                    f" claim, {run['spans_per_claim']:.2f} spans exported a claim",
                    "" if run is bare else f"metrics and tracing off: {bare['rate']:,.0f}/s",
                    goal,
                )
            )
        worst = max(self.peaks.values())
        rows.append(
            (
                "peak memory per process",
                ", ".join(f"{k} {v:.0f} MB" for k, v in self.peaks.items()),
                "",
                _target(worst <= MEMORY_TARGET_MB, f"<= {MEMORY_TARGET_MB} MB each"),
            )
        )
        rows.append(
            (
                "Flash Sale (50 users, 5 in stock) / Double Dip (10 x 1 user)",
                f"{'ok' if r['flash_sale'].ok else 'FAILED'} / "
                f"{'ok' if r['double_dip'].ok else 'FAILED'}",
                "",
                "",
            )
        )
        return rows


def overload_rows(o: dict[str, Any], capacity: float) -> list[tuple[str, str, str, str]]:
    checks = overload.met(o)
    return [
        (
            f"overload: {o['offered']:,.0f} claims/s (3x the wrk run) for"
            f" {overload.OVERLOAD_S} s, open loop, one hot coupon, through the edge",
            f"{o['let_in_per_s']:,.0f}/s let in, p99 {o['let_in_p99_ms']:.0f} ms, slowest"
            f" {o['let_in_max_ms']:,.0f} ms, {o['pending_202']} x 202, {o['other_errors']} other"
            f" errors; {o['refused']:,} refused ({o['refused_share']:.0%}), p99"
            f" {o['refusal_p99_ms']:.1f} ms, {o['refusals_without_retry_after']} without"
            " Retry-After",
            f"the sustained capacity (wrk): {capacity:,.0f} claims/s; the claim wait:"
            f" {o['claim_wait_ms']:,.0f} ms; the edge: HAProxy, deploy/edge/haproxy.cfg as"
            " shipped (120 requests on their way to the gateways at most)",
            _target(checks["refused quickly"], "refusals p99 < 50 ms, each with Retry-After")
            + "; "
            + _target(
                checks["let in answered within the claim wait"],
                "let in: answered within the claim wait, no 202",
            ),
        ),
        (
            "overload: queues (peak of the first minute / of the second)",
            f"command queues {o['queued_first_minute']:,.0f} / {o['queued_second_minute']:,.0f}"
            f" messages; claims in flight in the gateways {o['in_flight_first_minute']:,.0f} /"
            f" {o['in_flight_second_minute']:,.0f}; requests waiting in the edge"
            f" {o['edge_queue_first_minute']:,.0f} / {o['edge_queue_second_minute']:,.0f};"
            " gateway process"
            f" {o['gateway_rss_first_minute_mb']:.0f} / {o['gateway_rss_second_minute_mb']:.0f}"
            " MB",
            "",
            _target(checks["no queue grows"], "the second minute no higher than the first"),
        ),
        (
            f"overload: recovery at {o['recovery_rate']:,.0f} claims/s after the drop",
            f"every second's p99 within 2x the baseline's after {o['recovered_after_s']:.0f} s",
            f"the same rate before the overload: p99 {o['baseline_p99_ms']:.1f} ms",
            _target(checks["recovered"], f"<= {overload.RECOVERY_TARGET_S:.0f} s"),
        ),
    ]


def _spans_received() -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{SINK_PORT}/spans", timeout=10) as r:
        return int(json.loads(r.read())["spans"])


def _target(met: bool, text: str) -> str:
    return f"{text}: {'met' if met else 'NOT met'}"


def render(rows: list[tuple[str, str, str, str]]) -> str:
    lines = []
    for measure, figure, bound, target in rows:
        lines.append(measure)
        lines.append(f"    {figure}")
        if bound:
            lines.append(f"    bound:  {bound}")
        if target:
            lines.append(f"    target: {target}")
    return "\n".join(lines)


def write_page(
    doc: Path,
    title: str,
    intro: str,
    table: str,
    out: Path,
    charts: tuple[tuple[str, str], ...],
    command: str,
) -> None:
    """``doc``: ``intro`` (``{day}`` replaced by today's date), the table, and the charts
    found in ``out`` (copied to docs/benchmarks/); the notes below the marker of the page
    it replaces (written by ``command``) are kept."""
    notes = ""
    if doc.exists():
        _, marker, after = doc.read_text().partition(notes_marker(command))
        notes = after if marker else ""
    DOC_CHARTS.mkdir(parents=True, exist_ok=True)
    shown = []
    for name, caption in charts:
        if (out / name).exists():
            shutil.copyfile(out / name, DOC_CHARTS / name)
            shown.append(f"![{caption}](benchmarks/{name})\n\n*{caption}*\n")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    page = [
        f"# {title}",
        "",
        intro.replace("{day}", day),
        "",
        "```",
        table,
        "```",
        "",
        *shown,
        notes_marker(command),
    ]
    doc.write_text("\n".join(page) + (notes if notes else "\n"))


def quick(bench: Bench) -> int:
    """``--quick``: the sustained wrk run and the open loop at 1,000/s, with their CPU a
    claim, beside the pgbench ceiling, printed; no page written (for trying a change:
    about a minute and a half)."""
    bench.sustained_wrk()
    bench.open_loop(rates=(1000,))
    f = bench.figures
    claims, one, cpu = f["wrk_claims"], f["pgbench_one_per_tx"], f["cpu_ms_per_claim"]
    print(
        f"sustained (wrk, 10 s): {claims['rate']:,.0f} claims/s = "
        f"{claims['rate'] / one:.2f}x the pgbench ceiling ({one:,.0f} tx/s), "
        f"p99 {claims['p99_ms']:.0f} ms; invalid-claim path {f['wrk_invalid']['rate']:,.0f} req/s"
    )
    print(
        "CPU a claim (ms): "
        + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items())
        + f"; all {sum(cpu.values()):.3f}"
    )
    lat = bench.reports["fixed_1000"].percentiles_ms()
    cpu = f["cpu_ms_per_claim_1000"]
    print(
        f"open loop 1,000/s: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms; CPU a claim (ms): "
        + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items())
        + f"; all {sum(cpu.values()):.3f}"
    )
    return 0


def bursts_only(bench: Bench) -> int:
    """``--bursts``: the two bursts beside their floors, and every process's peak memory
    after them (for trying a change to what a connection costs)."""
    asyncio.run(bench.bursts())
    for clients in (1000, 10_000):
        burst, floor = bench.reports[f"burst_{clients}"], bench.reports[f"floor_{clients}"]
        print(
            f"burst, {clients:,} clients: {burst.seconds:.2f} s = "
            f"{burst.seconds / floor.seconds:.2f}x the floor ({floor.seconds:.2f} s)"
        )
    print("peak memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in bench.peaks.items()))
    return 0 if all(r.ok for r in bench.reports.values()) else 1


def overload_only(bench: Bench) -> int:
    """``--overload``: the sustained wrk run (the capacity), then the overload row and
    its chart, printed; no page written (about three minutes)."""
    bench.sustained_wrk()
    bench.overload()
    print(render(overload_rows(bench.figures["overload"], bench.figures["wrk_claims"]["rate"])))
    print(f"chart: {OUT / 'overload.png'}")
    return 0 if all(overload.met(bench.figures["overload"]).values()) else 1


def drain_only(bench: Bench) -> int:
    """``--drain``: one consumer draining 100,000 queued claims, then one relay publishing
    their events, beside the batched ceiling, printed; no page written."""
    bench.drain()
    f = bench.figures
    print(
        f"one consumer draining: {f['drain']:,.0f} claims/s (batched SQL ceiling "
        f"{f['pgbench_batched']:,.0f} claims/s); one relay: {f['relay_rate']:,.0f} events/s"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only the ceilings and the sustained wrk run with its CPU a claim; no page",
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="only the ceilings, the consumer draining a backlog and the relay; no page",
    )
    parser.add_argument(
        "--bursts",
        action="store_true",
        help="only the ceilings, the two bursts and the peak memory after them; no page",
    )
    parser.add_argument(
        "--overload",
        action="store_true",
        help="only the ceilings, the sustained wrk run and the overload row; no page",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    stack = Stack("bench", root=ROOT / ".stack", fresh=True)
    say("starting servers")
    stack.start()
    bench: Bench | None = None
    try:
        urls = stack.urls()
        # Settings of the shell (FLASHCLAIM_*) apply, for experiments; the servers are ours.
        settings = Settings.from_env({**os.environ, **urls}).replace(
            http_port=PORT, log_level="WARNING", gateway_workers=2
        )
        migrate(settings.database_url)
        bench = Bench(stack, settings)
        bench.ceilings()
        bench.log.unlink(missing_ok=True)
        bench.start_consumer()
        bench.start_relay()
        bench.gateway = start_service("gateway", settings.environ(), bench.log)
        wait_listening()
        time.sleep(1)
        if args.quick:
            return quick(bench)
        if args.drain:
            return drain_only(bench)
        if args.bursts:
            return bursts_only(bench)
        if args.overload:
            return overload_only(bench)

        async def http_runs() -> None:
            assert bench is not None
            bench.reports["flash_sale"] = await scenario(
                "flash-sale", "flash-sale", users=50, stock=5, concurrency=50
            )
            bench.reports["double_dip"] = await scenario(
                "double-dip", "double-dip", attempts=10, stock=100
            )
            await bench.bursts()

        asyncio.run(http_runs())
        bench.sustained_wrk()
        bench.open_loop()
        bench.overload()
        bench.drain()
        bench.observability()
        machine = (
            f"{os.cpu_count()} cores, Python {platform.python_version()},"
            " every server and the load on the same machine"
        )
        table = render(bench.table())
        print()
        print(f"flashclaim bench on {platform.node()}: {machine}")
        print(table)
        write_page(
            DOC,
            "Benchmarks",
            "Written by `make bench` on {day} (" + machine + "); `bench/run.py` says what"
            " each row measures and how. Each figure stands beside what bounds it on the same"
            " machine in the same run: compare figures within one run only (run to run, the"
            " day's machine moves them by a tenth or more). A run of hours, with faults:"
            " [SOAK.md](SOAK.md) (`make soak`).",
            table,
            OUT,
            CHARTS,
            "make bench",
        )
        results = {
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "figures": bench.figures,
            "memory_peak_mb": bench.peaks,
            "scenarios": {k: v.as_dict() for k, v in bench.reports.items()},
        }
        for scenario_result in results["scenarios"].values():
            scenario_result.pop("timeline", None)
        (OUT / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\nreport: {OUT / 'results.json'}, charts: {OUT}/*.png, page: {DOC}")
        return 0 if all(rep.ok for rep in bench.reports.values()) else 1
    finally:
        if bench is not None:
            terminate([p for p in (bench.gateway, bench.consumer, bench.relay) if p], 30)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
