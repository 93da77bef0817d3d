"""`make soak`: a sale that lasts, with a fault every few minutes, and whether anything
drifts, leaks or is lost.

On servers of its own (the bench's: same ports, durable settings), with a consumer, a
relay and a gateway of two worker processes, it first measures the machine's ceilings
(pgbench, one transaction a claim), flashclaim's sustained capacity on one hot coupon
(wrk, 10 s, the bench's run) and that of the sale's own mix (below: steps of 20 s from a
sixteenth of wrk's rate, a quarter more each, until a claim is left without its answer
or the claims' p99 is more than twice the first step's, the bound of the verdict's
third check), then sends, for ``--minutes`` (30), half the mix's capacity, open loop,
mixed like a sale:

- claims (about 85%), with an ``Idempotency-Key`` each, retried with it after a ``503``,
  a ``429`` or a lost connection, and a ``202`` followed (flashclaim/devtools/client.py):
  65% on 200 coupons whose stock outlasts the run, 35% on the minute's three hot coupons
  (a new drop each minute, sold out within about twenty seconds), users drawn from
  20,000 so that some claim twice (``409``);
- coupon reads (10%), ``GET /api/coupons/{name}``;
- keyed retries (3%): a claim answered a moment before, sent again with its key, which
  must get the very same answer;
- follow-ups (2%): ``GET /api/claims/{id}`` of a claim granted a moment before, which
  must answer the same.

A fault every ``--fault-every`` minutes (5), half a minute into the minute, in turn:
the consumer killed (``kill -9``; started again two seconds later, as its supervisor
would), RabbitMQ restarted, Redis restarted (its results are gone: the inbox answers),
PostgreSQL restarted, a gateway worker killed (``kill -9``; gunicorn starts another).

Every ten seconds it reads each process's memory (flashclaim's: RSS; the servers':
PSS over their processes), the command queues and the dead-letter queue, the inbox,
outbox and claims rows, and Redis's memory; each minute it prints a line of them with
the minute's claims a second and latency (from when each claim was due to its final
answer). At the end, the verdict:

1. the audit holds: every claim has its final answer (``200``, ``400`` or ``409``);
   the claims table holds exactly the claims told ``200``, none twice; each ``409``'s
   user holds the coupon and each ``400``'s coupon is sold out; every answer is the one
   the inbox recorded; every retry and follow-up answered as the first time; stock
   adds up; ``flashclaim audit`` passes;
2. each flashclaim process's memory grows by less than 1 MB a minute after the first
   five (the least-squares slope of its readings from its fifth minute of life, or the
   run's, whichever is later; a process younger than five minutes of readings is not
   judged);
3. outside the fault windows (a minute that a fault touched, from the injection to 30 s
   after it is over), each minute's p99 stays within twice that of the first five
   minutes (and at least 10 ms over it).

Writes ``reports/soak/`` (the minutes, ``results.json``, charts) and ``docs/SOAK.md``
with the machine's ceilings, the minutes, the verdict and the charts (copied to
``docs/benchmarks/``), keeping the notes below the marker of the page it replaces.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import probes
import psycopg
import redis
import run as bench
from hdrh.histogram import HdrHistogram

from flashclaim.core.messages import ClaimResult, Outcome
from flashclaim.core.schema_migrations import migrate
from flashclaim.core.settings import Settings
from flashclaim.devtools import processes
from flashclaim.devtools.devstack import Stack
from flashclaim.devtools.loadreport import Recorder
from flashclaim.devtools.processes import service_env, start_service, terminate
from gateway import http_answers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "soak"
DOC = ROOT / "docs" / "SOAK.md"
CHARTS = (
    ("soak-load.png", "claims a second and latency, minute by minute, the faults marked"),
    ("soak-memory.png", "each process's memory"),
    ("soak-state.png", "rows in the tables, messages in the queues, Redis's memory"),
)
WARM_COUPONS, HOT_PER_DROP, USERS = 200, 3, 20_000
READ, RETRY, FOLLOW = 0.10, 0.03, 0.02  # shares of the arrivals; the rest are claims
HOT_SHARE = 0.35  # of the claims
SAMPLE_S = 10
# The capacity probe: steps of this many seconds, claims given up after the deadline.
PROBE_STEP_S, PROBE_DEADLINE_S = 20, 10
FINAL = frozenset((200, 400, 404, 409, 422))
GROWTH_MB_PER_MIN = 1.0
AFTER_FAULT_S = 30


def say(text: str) -> None:
    print(f"soak: {text}", file=sys.stderr, flush=True)


@dataclass
class Fault:
    name: str
    start: float  # seconds from the start of the load
    end: float = float("inf")

    def touches(self, minute: int) -> bool:
        return self.start < 60 * (minute + 1) and 60 * minute < self.end + AFTER_FAULT_S


@dataclass
class Sample:
    at: float  # seconds from the start of the load
    rss_mb: dict[str, float]  # flashclaim's processes, by "role pid"
    servers_mb: dict[str, float]
    queued: int | None
    dead_lettered: int | None
    rows: dict[str, int] | None
    redis_mb: float | None


@dataclass
class Tally:
    """What bench/soakload reported, line by line."""

    tag: str
    # Claims (keyed retries included), by when they were due: latency to the final
    # answer; coupon reads and follow-ups apart.
    claims: Recorder = field(default_factory=Recorder)
    others: Recorder = field(default_factory=Recorder)
    # Every claim's final answer: (user, coupon, status, request id).
    answers: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    stocks: dict[str, int] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    retried: int = 0  # claims that met a 503, a 429 or a lost connection on the way
    dropped: int = 0

    def feed(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        f = rest.split(" ")
        if kind == "coupon":
            self.stocks[f[0]] = int(f[1])
            return
        if kind == "mismatch":
            self.mismatches.append(rest)
            return
        if kind == "done":
            self.dropped = int(f[2])
            return
        self.kinds[kind] += 1
        due, latency, status = int(f[0]) / 1e6, int(f[1]) / 1e6, int(f[2])
        into = self.claims if kind in ("claim", "retry") else self.others
        into.record_at(due, status, latency)
        if kind == "claim":
            self.retried += int(f[3]) > 0
            self.answers.append((f[4], f[5], status, None if f[6] == "-" else f[6]))


# The faults, in the order they come: as announced, and as done.
FAULTS = (
    ("consumer kill -9", "consumer killed (kill -9)"),
    ("RabbitMQ restart", "RabbitMQ restarted"),
    ("Redis restart", "Redis restarted"),
    ("PostgreSQL restart", "PostgreSQL restarted"),
    ("gateway worker kill -9", "gateway worker killed (kill -9)"),
)


class Soak:
    def __init__(self, b: bench.Bench, minutes: float, fault_every: float) -> None:
        self.b = b
        self.minutes = minutes
        self.fault_every = fault_every
        self.faults: list[Fault] = []
        self.samples: list[Sample] = []
        self.lines: list[str] = []
        self.unexpected: list[str] = []
        self.started = time.monotonic()
        self.generator: int | None = None  # bench/soakload's pid, while it runs

    # -- what is read every ten seconds ----------------------------------------------

    def processes(self) -> dict[str, int]:
        b = self.b
        found = {f"gateway worker {pid}": pid for pid in b.workers()}
        for role, proc in (("consumer", b.consumer), ("relay", b.relay)):
            if proc is not None and proc.poll() is None:
                found[f"{role} {proc.pid}"] = proc.pid
        return found

    def servers(self) -> dict[str, float]:
        s = self.b.stack
        out = {}
        for name, server, pids in (
            ("PostgreSQL", s.postgres, probes.family),
            ("RabbitMQ", s.rabbitmq, probes.group),
            ("Redis", s.redis, probes.group),
        ):
            if server is not None and server.proc is not None and server.proc.poll() is None:
                out[name] = probes.pss_mb(pids(server.proc.pid))
        return out

    def queues(self) -> tuple[int | None, int | None]:
        s = self.b.settings
        assert self.b.stack.rabbitmq is not None
        request = urllib.request.Request(
            f"{self.b.stack.rabbitmq.management_url}api/queues/%2F?columns=name,messages",
            headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                depth = {q["name"]: q.get("messages", 0) or 0 for q in json.loads(r.read())}
        except (OSError, ValueError):
            return None, None
        topology = s.topology()
        queued = sum(depth.get(name, 0) for name in topology.claims_queues)
        return queued, depth.get(topology.claims_dlq)

    def rows(self) -> dict[str, int] | None:
        try:
            with psycopg.connect(self.b.settings.database_url, connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM inbox), (SELECT count(*) FROM outbox),"
                    " (SELECT count(*) FROM claims)"
                ).fetchone()
        except psycopg.Error:
            return None
        assert row is not None
        return {"inbox": row[0], "outbox": row[1], "claims": row[2]}

    def redis_mb(self) -> float | None:
        client = redis.Redis.from_url(self.b.settings.redis_url, socket_timeout=5)
        try:
            return float(client.info("memory")["used_memory"]) / 2**20
        except redis.RedisError:
            return None
        finally:
            client.close()

    def sample(self) -> Sample:
        self.supervise()
        queued, dead = self.queues()
        return Sample(
            time.monotonic() - self.started,
            {name: probes.memory_mb(pid) for name, pid in self.processes().items()},
            self.servers(),
            queued,
            dead,
            self.rows(),
            self.redis_mb(),
        )

    def supervise(self) -> None:
        """A consumer or relay that exited by itself is noted and started again."""
        b = self.b
        for role, proc, start in (
            ("consumer", b.consumer, b.start_consumer),
            ("relay", b.relay, b.start_relay),
        ):
            if proc is not None and proc.poll() is not None and not self.faulting(role):
                self.unexpected.append(f"{role} exited with {proc.returncode}")
                start()

    def faulting(self, role: str) -> bool:
        return any(f.end == float("inf") and role in f.name for f in self.faults)

    # -- the faults ------------------------------------------------------------------

    def inject(self, kind: int) -> Fault:
        b, s = self.b, self.b.stack
        fault = Fault(FAULTS[kind][1], time.monotonic() - self.started)
        self.faults.append(fault)
        if kind == 0:
            assert b.consumer is not None
            b.consumer.send_signal(signal.SIGKILL)
            b.consumer.wait()
            time.sleep(2)
            b.start_consumer()
        elif kind == 1:
            assert s.rabbitmq is not None
            s.rabbitmq.stop()
            s.rabbitmq.start()
        elif kind == 2:
            assert s.redis is not None
            s.redis.stop()
            s.redis.start()
        elif kind == 3:
            assert s.postgres is not None
            s.postgres.stop()
            s.postgres.start()
        else:
            os.kill(b.workers()[0], signal.SIGKILL)
        fault.end = time.monotonic() - self.started
        return fault

    # -- the run ---------------------------------------------------------------------

    async def watch(self, sale: Tally, stop: asyncio.Event) -> None:
        """A sample every ten seconds, a line every minute, a fault when due."""
        next_fault = 60 * self.fault_every + 30
        kind, minute = 0, 0
        fault: asyncio.Task[Fault] | None = None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)
            now = time.monotonic() - self.started
            if fault is None and now >= next_fault and now < 60 * self.minutes - 60:
                say(f"fault at {now / 60:.1f} min: {FAULTS[kind][0]}")
                fault = asyncio.create_task(asyncio.to_thread(self.inject, kind))
                kind = (kind + 1) % len(FAULTS)
                next_fault += 60 * self.fault_every
            if fault is not None and fault.done():
                done = fault.result()
                say(f"{done.name}: over after {done.end - done.start:.1f} s")
                fault = None
            self.samples.append(await asyncio.to_thread(self.sample))
            say(self.progress(sale, now))
            while now >= 60 * (minute + 1):
                line = self.line(sale, minute)
                self.lines.append(line)
                print(line, flush=True)
                minute += 1
        if fault is not None:
            await fault

    def progress(self, sale: Tally, now: float) -> str:
        """The claims due in the ten seconds before the last five (most have their
        answer by now), and what is queued."""
        h = sale.claims.merged(range(int(now) - 15, int(now) - 5))
        last = self.samples[-1]
        state = f"queued {last.queued}, claims rows {(last.rows or {}).get('claims', '?')}"
        if h is None:
            return f"[{now / 60:5.1f} min] no claims due yet; {state}"
        return (
            f"[{now / 60:5.1f} min] {h.get_total_count() / 10:5.0f} claims/s,"
            f" p50 {h.get_value_at_percentile(50) / 1000:.1f} ms,"
            f" p99 {h.get_value_at_percentile(99) / 1000:.1f} ms; {state}"
        )

    @staticmethod
    def minute(sale: Tally, minute: int) -> HdrHistogram | None:
        return sale.claims.merged(range(60 * minute, 60 * (minute + 1)))

    def line(self, sale: Tally, minute: int) -> str:
        """The minute's figures (its claims are those due in it: the latest may still
        be on their way) and the last sample's."""
        h = self.minute(sale, minute)
        count = h.get_total_count() if h else 0
        p50 = h.get_value_at_percentile(50) / 1000 if h else 0.0
        p99 = h.get_value_at_percentile(99) / 1000 if h else 0.0
        last = self.samples[-1]
        memory = " ".join(
            f"{name.rsplit(' ', 1)[0].replace('gateway worker', 'gw')} {mb:.0f}"
            for name, mb in sorted(last.rss_mb.items())
        )
        servers = " ".join(f"{k} {v:.0f}" for k, v in last.servers_mb.items())
        rows = last.rows or {}
        faults = [f.name for f in self.faults if f.touches(minute)]
        return (
            f"[{minute + 1:3d} min] {count / 60:6.0f} claims/s p50 {p50:6.1f} ms"
            f" p99 {p99:7.1f} ms | MB: {memory}; {servers}; Redis used {last.redis_mb or 0:.0f}"
            f" | queued {last.queued} DLQ {last.dead_lettered}"
            f" | inbox {rows.get('inbox', '?')} outbox {rows.get('outbox', '?')}"
            f" claims {rows.get('claims', '?')}"
            + (f" | fault: {', '.join(faults)}" if faults else "")
        )


async def soakload(
    binary: Path, tag: str, rate: float, seconds: float, deadline: float = 300
) -> asyncio.subprocess.Process:
    """bench/soakload started with the sale's mix at ``rate`` arrivals a second, each
    request given up ``deadline`` seconds after it was due; its lines on stdout."""
    claims_a_minute = rate * (1 - READ - RETRY - FOLLOW) * 60
    # Each hot coupon sold out about twenty seconds into its minute.
    hot_stock = max(50, round(claims_a_minute * HOT_SHARE / HOT_PER_DROP / 3))
    return await asyncio.create_subprocess_exec(
        str(binary),
        f"-base={bench.BASE}",
        f"-tag={tag}",
        f"-rate={rate}",
        f"-duration={seconds}s",
        f"-deadline={deadline}s",
        f"-warm={WARM_COUPONS}",
        f"-hot={HOT_PER_DROP}",
        f"-hot-stock={hot_stock}",
        f"-users={USERS}",
        f"-read={READ}",
        f"-retry={RETRY}",
        f"-follow={FOLLOW}",
        f"-hot-share={HOT_SHARE}",
        stdout=asyncio.subprocess.PIPE,
        limit=2**20,
    )


@dataclass
class Step:
    """One rate of the capacity probe: its claims from the fifth second on."""

    rate: float
    p99_ms: float
    unanswered: int  # claims without a final answer within PROBE_DEADLINE_S
    kept_up: bool = False

    def __str__(self) -> str:
        return (
            f"{self.rate:,.0f}/s: p99 {self.p99_ms:,.0f} ms, {self.unanswered} unanswered"
            f" ({'kept up' if self.kept_up else 'fell behind'})"
        )


def latency_bound(base_ms: float) -> float:
    """What a p99 may be beside ``base_ms``: twice it, and at least 10 ms over it (the
    verdict's bound over the minutes, and the probe's over the rates)."""
    return max(2 * base_ms, base_ms + 10)


async def mix_capacity(binary: Path, start: float) -> tuple[float, list[Step]]:
    """The sale's own mix at rising rates, PROBE_STEP_S each, from ``start`` up by a
    quarter each step, until one falls behind: a claim without its final answer within
    PROBE_DEADLINE_S, or the claims' p99 past :func:`latency_bound` of the first
    step's. The capacity is the last rate kept up with: the most this mix takes with
    its latency as the verdict will hold it to, so that half of it leaves room for the
    faults and the hours. (A single coupon's capacity, which wrk measures, is several
    times more: its claims share messages and transactions, this mix's mostly do not.)"""
    steps: list[Step] = []
    rate = start
    while True:
        tally = Tally(uuid.uuid4().hex[:8])
        proc = await soakload(binary, tally.tag, rate, PROBE_STEP_S, PROBE_DEADLINE_S)
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode().rstrip("\n")
            if line != "start":
                tally.feed(line)
        await proc.wait()
        h = tally.claims.merged(range(5, PROBE_STEP_S))
        p99 = h.get_value_at_percentile(99) / 1000 if h else float("inf")
        unanswered = sum(1 for *_, status, _ in tally.answers if status not in FINAL)
        bound = latency_bound(steps[0].p99_ms) if steps else float("inf")
        step = Step(rate, p99, unanswered, unanswered == 0 and p99 <= bound)
        steps.append(step)
        say(f"capacity of the mix: {step}")
        if not step.kept_up:
            break
        rate = round(rate * 1.25)
    # The loop stops at the first step behind: the one before it is the last kept up.
    return (steps[-2].rate if len(steps) > 1 else 0.0), steps


def build_soakload() -> Path:
    """Compile bench/soakload (Go, standard library only)."""
    binary = OUT / "soakload"
    source = Path(__file__).parent / "soakload" / "main.go"
    subprocess.run(["go", "build", "-o", str(binary), str(source)], check=True)
    return binary


# -- the verdict ----------------------------------------------------------------------


def audit(settings: Settings, sale: Tally) -> dict[str, Any]:
    """What the claims were told against what the database holds."""
    statuses = Counter(status for _, _, status, _ in sale.answers)
    unanswered = sum(n for s, n in statuses.items() if s not in (200, 400, 409))
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT coupon_name, user_id, message_id::text FROM claims WHERE coupon_name LIKE %s",
            (f"SOAK_{sale.tag}_%",),
        ).fetchall()
        remaining: dict[str, int] = dict(
            conn.execute(
                "SELECT name, remaining_amount FROM coupons WHERE name LIKE %s",
                (f"SOAK_{sale.tag}_%",),
            ).fetchall()
        )
        recorded: dict[str, int] = {}
        with conn.cursor(name="inbox") as cursor:
            cursor.execute(
                "SELECT message_id::text, outcome, payload ->> 'user_id',"
                " payload ->> 'coupon_name' FROM inbox WHERE status = 'PROCESSED'"
            )
            for request_id, outcome, user, coupon in cursor:
                result = ClaimResult(request_id, Outcome.of_code(outcome), user, coupon)
                recorded[request_id] = http_answers.status(result)
    granted = sorted(str(rid) for _, _, s, rid in sale.answers if s == 200)
    holders = {(coupon, user) for coupon, user, _ in rows}
    wrong_409 = sum(1 for u, c, s, _ in sale.answers if s == 409 and (c, u) not in holders)
    wrong_400 = sum(
        1
        for u, c, s, _ in sale.answers
        if s == 400 and (remaining.get(c) != 0 or (c, u) in holders)
    )
    disagree = sum(
        1
        for _, _, s, rid in sale.answers
        if rid is not None and rid in recorded and recorded[rid] != s
    )
    per_coupon = Counter(coupon for coupon, _, _ in rows)
    stock_ok = all(
        remaining.get(name) == amount - per_coupon[name] >= 0
        for name, amount in sale.stocks.items()
    )
    # The soak's coupons: the ceilings' and the capacity's were written by SQL, without
    # the events the audit looks for.
    audited = processes.audit(service_env(settings.environ()), sorted(sale.stocks))
    rows_per_id = Counter(rid for _, _, rid in rows)
    claim_ids = set(rows_per_id)
    told = set(granted)
    # A claim left without an answer (none within the generator's deadline) may have
    # been granted all the same: it is unanswered, not lost, and its row has no id
    # that any answer carries. Rows beyond the 200s and the unanswered are phantoms.
    beyond = len(claim_ids - told)
    # A retry or follow-up that got no answer at all is unanswered; one that got
    # another answer is wrong.
    differing = [m for m in sale.mismatches if not m.split(": ", 1)[1].startswith("0 ")]
    checks = {
        "every claim answered finally (200, 400 or 409)": unanswered == 0,
        "every claim told 200 is in the claims table, once": all(
            rows_per_id[rid] == 1 for rid in told
        )
        and len(told) == len(granted),
        "no claim in the table beyond those told 200 and those left unanswered": beyond
        <= unanswered,
        "nobody holds a coupon twice": len(holders) == len(rows),
        "each 409's user holds the coupon": wrong_409 == 0,
        "each 400's coupon is sold out, not to its user": wrong_400 == 0,
        "every answer is the one the inbox recorded": disagree == 0,
        "every retry and follow-up answered, as the first time": not sale.mismatches,
        "no retry or follow-up answered otherwise than the first time": not differing,
        "remaining_amount = amount - claims, never negative": stock_ok,
        "flashclaim audit passes": audited.returncode == 0,
    }
    return {
        "checks": checks,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "granted": len(granted),
        "rows_beyond_the_200s": beyond,
        "unanswered": unanswered,
        "claims_rows": len(rows),
        "wrong_409": wrong_409,
        "wrong_400": wrong_400,
        "disagreeing_with_inbox": disagree,
        "mismatches": sale.mismatches[:20],
        "audit_output": audited.stdout + audited.stderr,
    }


@dataclass
class Growth:
    """How a process's memory moved, in MB a minute, from its fifth minute of life or
    the run's, whichever is later."""

    # Pooled least-squares slope within the stretches between faults (each stretch its
    # own level): the creep, what the verdict judges. A step while a fault lasts (a
    # gateway holding claims while the broker is away, memory the allocator keeps) is
    # not creep, and is seen in ``overall`` and in the chart.
    creep: float | None
    # One line through every reading.
    overall: float | None


def growth(
    samples: list[Sample], faults: Sequence[Fault] = (), minutes_in: float = 5.0
) -> dict[str, Growth]:
    """Each flashclaim process's :class:`Growth`; ``None`` figures when it was read over
    less than five minutes past its start (outside the fault windows, for ``creep``)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for name, mb in s.rss_mb.items():
            if mb == mb:  # not NaN: the process was there
                series.setdefault(name, []).append((s.at, mb))
    out: dict[str, Growth] = {}
    for name, points in series.items():
        born = points[0][0] / 60
        kept = [(t / 60, mb) for t, mb in points if t / 60 >= max(minutes_in, born + minutes_in)]
        overall = None
        if len(kept) >= 2 and kept[-1][0] - kept[0][0] >= 5:
            overall, _ = statistics.linear_regression([t for t, _ in kept], [m for _, m in kept])
        stretches: dict[int, list[tuple[float, float]]] = {}
        for t, mb in kept:
            if any(f.start <= 60 * t <= f.end + AFTER_FAULT_S for f in faults):
                continue
            after = sum(1 for f in faults if f.start <= 60 * t)
            stretches.setdefault(after, []).append((t, mb))
        covariance = variance = span = 0.0
        for readings in stretches.values():
            if len(readings) < 2:
                continue
            mean_t = statistics.fmean(t for t, _ in readings)
            mean_mb = statistics.fmean(mb for _, mb in readings)
            covariance += sum((t - mean_t) * (mb - mean_mb) for t, mb in readings)
            variance += sum((t - mean_t) ** 2 for t, _ in readings)
            span += readings[-1][0] - readings[0][0]
        creep = covariance / variance if variance > 0 and span >= 5 else None
        out[name] = Growth(creep, overall)
    return out


def latency(soak: Soak, sale: Tally) -> dict[str, Any]:
    """Each minute's p99 beside the first five minutes' (those a fault touched left
    out); the minutes a fault touched are shown, not judged."""
    clean = [m for m in range(5) if not any(f.touches(m) for f in soak.faults)]
    first = sale.claims.merged(s for m in clean for s in range(60 * m, 60 * (m + 1)))
    base = first.get_value_at_percentile(99) / 1000 if first else float("nan")
    bound = latency_bound(base)
    minutes = []
    for m in range(int(soak.minutes)):
        h = soak.minute(sale, m)
        if h is None:
            continue
        faulted = [f.name for f in soak.faults if f.touches(m)]
        p99 = h.get_value_at_percentile(99) / 1000
        minutes.append(
            {
                "minute": m + 1,
                "claims_per_s": h.get_total_count() / 60,
                "p50_ms": h.get_value_at_percentile(50) / 1000,
                "p99_ms": p99,
                "faults": faulted,
                "within": None if faulted else p99 <= bound,
            }
        )
    return {"first_five_p99_ms": base, "bound_ms": bound, "minutes": minutes}


# -- charts and page ------------------------------------------------------------------


def charts(soak: Soak, lat: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def faults(axis: Any) -> None:
        for f in soak.faults:
            axis.axvspan(f.start / 60, (f.end + AFTER_FAULT_S) / 60, color="red", alpha=0.12)

    def series(axis: Any, values: Sequence[float | None], label: str) -> None:
        """A reading of each sample (``None``: not read) against the minute."""
        points = [
            (s.at / 60, v) for s, v in zip(soak.samples, values, strict=True) if v is not None
        ]
        axis.plot([t for t, _ in points], [v for _, v in points], label=label)

    minutes = lat["minutes"]
    xs = [m["minute"] - 0.5 for m in minutes]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(xs, [m["claims_per_s"] for m in minutes], marker="o", label="claims/s (due)")
    top.set_ylabel("claims per second")
    top.set_title("flashclaim soak: the faults shaded (from injection to 30 s after)")
    top.legend(loc="lower right")
    bottom.plot(xs, [m["p50_ms"] for m in minutes], marker="o", label="p50")
    bottom.plot(xs, [m["p99_ms"] for m in minutes], marker="o", label="p99")
    bottom.axhline(lat["bound_ms"], color="grey", linestyle=":", label="bound (p99)")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency, due to final answer (ms)")
    bottom.set_xlabel("minute of the run")
    bottom.legend(loc="upper left")
    for axis in (top, bottom):
        faults(axis)
    _save(fig, OUT / "soak-load.png")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    names = sorted({n for s in soak.samples for n in s.rss_mb})
    for name in names:
        series(top, [s.rss_mb.get(name) for s in soak.samples], name)
    top.set_ylabel("RSS (MB)")
    top.set_title("flashclaim's processes (a process killed by a fault ends, another starts)")
    top.legend(loc="lower right", fontsize="small")
    for server in ("PostgreSQL", "RabbitMQ", "Redis"):
        series(bottom, [s.servers_mb.get(server) for s in soak.samples], f"{server} (PSS)")
    bottom.set_ylabel("MB")
    bottom.set_xlabel("minute of the run")
    bottom.legend(loc="upper left")
    for axis in (top, bottom):
        faults(axis)
    _save(fig, OUT / "soak-memory.png")

    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for table in ("inbox", "claims", "outbox"):
        series(top, [(s.rows or {}).get(table) for s in soak.samples], table)
    top.set_ylabel("rows")
    top.legend(loc="upper left")
    series(middle, [s.queued for s in soak.samples], "command queues")
    series(middle, [s.dead_lettered for s in soak.samples], "dead-letter queue")
    middle.set_ylabel("messages")
    middle.legend(loc="upper left")
    series(bottom, [s.redis_mb for s in soak.samples], "Redis used_memory")
    bottom.set_ylabel("MB")
    bottom.set_xlabel("minute of the run")
    bottom.legend(loc="upper left")
    for axis in (top, middle, bottom):
        faults(axis)
    _save(fig, OUT / "soak-state.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict_lines(
    checks: dict[str, bool], grow: dict[str, Growth], lat: dict[str, Any]
) -> list[str]:
    lines = [f"{'ok    ' if ok else 'FAILED'} {name}" for name, ok in checks.items()]
    for name, g in grow.items():
        overall = "-" if g.overall is None else f"{g.overall:+.3f}"
        if g.creep is None:
            lines.append(
                f"   -   {name}: read over less than five minutes past its fifth outside the"
                f" fault windows, not judged (every reading: {overall} MB a minute)"
            )
        else:
            ok = g.creep < GROWTH_MB_PER_MIN
            lines.append(
                f"{'ok    ' if ok else 'FAILED'} {name}: {g.creep:+.3f} MB a minute between"
                f" faults (every reading, steps included: {overall})"
            )
    judged = [m for m in lat["minutes"] if m["within"] is not None]
    over = [m for m in judged if not m["within"]]
    lines.append(
        f"{'ok    ' if not over else 'FAILED'} p99 of each minute outside the fault windows"
        f" <= {lat['bound_ms']:.1f} ms (twice the first five minutes'"
        f" {lat['first_five_p99_ms']:.1f} ms): {len(judged) - len(over)} of {len(judged)}"
        + (f"; over: {', '.join(str(m['minute']) for m in over)}" if over else "")
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30, help="how long the load lasts")
    parser.add_argument(
        "--fault-every", type=float, default=5, help="minutes between faults (0: none)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0,
        help="arrivals a second (default: half the capacity measured for the mix)",
    )
    parser.add_argument("--no-page", action="store_true", help="do not write docs/SOAK.md")
    args = parser.parse_args()
    # SIGTERM as Ctrl-C: the services and the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    OUT.mkdir(parents=True, exist_ok=True)
    stack = Stack("bench", root=ROOT / ".stack", fresh=True)
    say("starting servers")
    stack.start()
    b: bench.Bench | None = None
    soak: Soak | None = None
    try:
        settings = Settings.from_env({**os.environ, **stack.urls()}).replace(
            http_port=bench.PORT, log_level="WARNING", gateway_workers=2
        )
        migrate(settings.database_url)
        b = bench.Bench(stack, settings)
        b.log = OUT / "services.log"
        b.log.unlink(missing_ok=True)
        b.ceilings()
        b.start_consumer()
        b.start_relay()
        b.gateway = start_service("gateway", settings.environ(), b.log)
        bench.wait_listening()
        time.sleep(1)
        b.sustained_wrk()
        wrk_rate = b.figures["wrk_claims"]["rate"]
        binary = build_soakload()
        capacity, steps = 0.0, list[Step]()
        if not args.rate:
            say("the mix's capacity: steps of 20 s, a quarter more each")
            capacity, steps = asyncio.run(mix_capacity(binary, round(wrk_rate / 16)))
        rate = args.rate or round(capacity / 2)
        if rate <= 0:
            say("the mix's first step fell behind: no capacity to take half of")
            return 1
        soak = Soak(b, args.minutes, args.fault_every or float("inf"))
        say(
            f"{rate:,.0f} arrivals a second for {args.minutes:g} min,"
            f" a fault every {args.fault_every:g} min"
        )
        sale, checks_report = asyncio.run(load(binary, soak, settings, rate, args.minutes))
        grow = growth(soak.samples, soak.faults)
        lat = latency(soak, sale)
        checks = checks_report["checks"]
        lines = verdict_lines(checks, grow, lat)
        ok = (
            all(checks.values())
            and all(g.creep is None or g.creep < GROWTH_MB_PER_MIN for g in grow.values())
            and all(m["within"] is not False for m in lat["minutes"])
            and not soak.unexpected
        )
        if soak.unexpected:
            lines.append("FAILED exited by themselves: " + ", ".join(soak.unexpected))
        charts(soak, lat)
        ceilings = (
            f"pgbench, one transaction a claim: {b.figures['pgbench_one_per_tx']:,.0f} tx/s;"
            f" sustained claims (wrk, 10 s, one coupon): {wrk_rate:,.0f}/s;"
            + (
                f" this mix (steps of {PROBE_STEP_S} s, every claim answered, p99 within"
                f" twice the first step's): {capacity:,.0f} arrivals/s"
                f" ({'; '.join(str(s) for s in steps)});"
                if steps
                else " (the mix's capacity not measured: --rate given);"
            )
            + f" load: {rate:,.0f} arrivals/s"
            f" ({', '.join(f'{k} {v:,}' for k, v in sorted(sale.kinds.items()))});"
            f" {sale.retried:,} claims retried on the way, {sale.dropped:,} not sent"
        )
        print()
        print(ceilings)
        print("\n".join(soak.lines))
        print("statuses of the claims: " + str(checks_report["statuses"]))
        print("\n".join(lines))
        print("soak: " + ("passed" if ok else "FAILED"))
        results = {
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "ceilings": {
                "pgbench_one_per_tx": b.figures["pgbench_one_per_tx"],
                "wrk_claims": b.figures["wrk_claims"],
                "mix_arrivals_per_s": capacity,
                "mix_steps": [vars(s) for s in steps],
            },
            "rate": rate,
            "minutes": args.minutes,
            "kinds": dict(sale.kinds),
            "faults": [vars(f) for f in soak.faults],
            "audit": {k: v for k, v in checks_report.items()},
            "growth_mb_per_min": {k: vars(v) for k, v in grow.items()},
            "samples": [vars(x) for x in soak.samples],
            "latency": lat,
            "lines": soak.lines,
            "verdict": lines,
            "passed": ok,
        }
        (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (OUT / "minutes.txt").write_text("\n".join(soak.lines) + "\n")
        if not args.no_page:
            machine = (
                f"{os.cpu_count()} cores, Python {platform.python_version()},"
                " every server and the load on the same machine"
            )
            table = "\n".join(
                [
                    ceilings,
                    "",
                    *soak.lines,
                    "",
                    "statuses of the claims: " + str(checks_report["statuses"]),
                    "",
                    *lines,
                    "soak: " + ("passed" if ok else "FAILED"),
                ]
            )
            bench.write_page(
                DOC,
                "Soak",
                f"Written by `make soak` ({args.minutes:g} minutes, a fault every"
                f" {args.fault_every:g}) on {{day}} ({machine}); `bench/soak.py` says what"
                " it sends, what it reads and how it judges. The ceilings first, then a line"
                " a minute, then the verdict.",
                table,
                OUT,
                CHARTS,
                "make soak",
            )
        return 0 if ok else 1
    finally:
        if soak is not None and soak.generator is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(soak.generator, signal.SIGKILL)
        if b is not None:
            terminate([p for p in (b.gateway, b.consumer, b.relay) if p], 30)
        stack.stop()


async def load(
    binary: Path, soak: Soak, settings: Settings, rate: float, minutes: float
) -> tuple[Tally, dict[str, Any]]:
    """bench/soakload for ``minutes``, its lines tallied as they come, the sampler and
    the faults beside it from its first arrival; then the audit."""
    tally = Tally(uuid.uuid4().hex[:8])
    say(f"creating {WARM_COUPONS} coupons and the first drop")
    proc = await soakload(binary, tally.tag, rate, 60 * minutes)
    assert proc.stdout is not None
    soak.generator = proc.pid
    stop = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    try:
        # Every line kept (reports/soak/load.txt), for judging the run again.
        with (OUT / "load.txt").open("wb") as kept:
            async for raw in proc.stdout:
                kept.write(raw)
                line = raw.decode().rstrip("\n")
                if line == "start":
                    soak.started = tally.claims.started = tally.others.started = time.monotonic()
                    watcher = asyncio.create_task(soak.watch(tally, stop))
                    say("load started")
                elif line.startswith("done "):
                    tally.feed(line)
                    say("every request has its answer, or none within the deadline")
                else:
                    tally.feed(line)
    finally:
        stop.set()
        if watcher is not None:
            await watcher
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    say("checking every answer against the database")
    return tally, await asyncio.to_thread(audit, settings, tally)


if __name__ == "__main__":
    sys.exit(main())
