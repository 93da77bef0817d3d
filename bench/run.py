"""`make bench`: the pgbench ceiling and the end-to-end scenarios, in one run.

Starts its own servers (profile ``bench``: own ports, durable settings), a consumer and
a gateway with two worker processes, then measures:

1. the one-transaction-per-claim ceiling on one hot coupon (pgbench, 8 clients);
2. open-loop claims on one hot coupon at fixed offered rates (latency percentiles);
3. the most claims per second end to end (offered well above capacity);
4. a burst of 10,000 concurrent claims for 100 in stock;
5. peak memory of each gateway and consumer process.

Prints a table and writes ``reports/bench/results.json`` and a chart per scenario.
Figures are one run on whatever machine runs it: compare them only within one run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from flashclaim.core.db import migrate
from flashclaim.core.settings import Settings
from flashclaim.devtools.devstack import Stack
from flashclaim.devtools.loadreport import Report
from flashclaim.devtools.loadtest import run_scenario
from flashclaim.devtools.processes import start_service, terminate

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "bench"
PORT = 18080
BASE = f"http://127.0.0.1:{PORT}"


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def pgbench_ceiling(stack: Stack, url: str, seconds: int = 10, clients: int = 8) -> float:
    assert stack.postgres is not None
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO coupons (name, amount, remaining_amount) "
            "VALUES ('PGBENCH_HOT', 100000000, 100000000) ON CONFLICT DO NOTHING"
        )
    result = subprocess.run(
        [
            str(stack.postgres.bindir / "pgbench"),
            "-n",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(seconds),
            "-f",
            str(ROOT / "bench" / "pgbench_claim.sql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(stack.postgres.port),
            "-U",
            "flashclaim",
            "flashclaim",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"tps = ([\d.]+)", result.stdout)
    if not match:
        raise RuntimeError(f"pgbench printed no tps:\n{result.stdout}\n{result.stderr}")
    return float(match.group(1))


def peak_rss_mb(pids: list[int]) -> dict[int, float]:
    peaks = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        if match:
            peaks[pid] = int(match.group(1)) / 1024
    return peaks


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(t) for t in text]
    return found


def wait_healthy(timeout: float = 60) -> None:
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
        f"{chart}: {report.throughput:,.0f}/s, p99 {report.percentiles_ms()['p99']:.1f} ms, "
        f"checks {'ok' if report.ok else 'FAILED'}"
    )
    return report


async def end_to_end() -> dict[str, Report]:
    reports = {}
    reports["flash_sale"] = await scenario(
        "flash-sale", "flash-sale", users=50, stock=5, concurrency=50
    )
    reports["double_dip"] = await scenario("double-dip", "double-dip", attempts=10, stock=100)
    for rate in (500, 1000):
        reports[f"fixed_{rate}"] = await scenario(
            "sustained", f"sustained-{rate}", rate=rate, duration=10, coupons=1, hot_share=1.0
        )
    reports["max"] = await scenario(
        "sustained", "sustained-max", rate=3000, duration=10, coupons=1, hot_share=1.0
    )
    return reports


async def burst() -> Report:
    return await scenario(
        "flash-sale", "burst-10000", users=10_000, stock=100, concurrency=10_000, connections=10_000
    )


def table(ceiling: float, reports: dict[str, Report], memory: dict[str, float]) -> str:
    top = reports["max"]
    burst = reports["burst"]
    rows = [
        (
            "one-transaction-per-claim ceiling (pgbench, 8 clients, hot row)",
            f"{ceiling:,.0f} claims/s",
        ),
        (
            "end to end, one hot coupon, offered 3,000/s",
            f"{top.throughput:,.0f} claims/s = {top.throughput / ceiling:.2f}x the ceiling",
        ),
    ]
    for rate in (500, 1000):
        r = reports[f"fixed_{rate}"]
        lat = r.percentiles_ms()
        rows.append(
            (
                f"offered {rate:,}/s: achieved, p50 / p99",
                f"{r.throughput:,.0f}/s, {lat['p50']:.1f} / {lat['p99']:.1f} ms",
            )
        )
    statuses = dict(burst.recorder.statuses)
    rows += [
        (
            "burst 10,000 concurrent claims, 100 in stock",
            f"{statuses.get(200, 0)} winners, {sum(v for k, v in statuses.items() if k >= 500)}"
            f" x 5xx, last answer {burst.percentiles_ms()['max'] / 1000:.1f} s",
        ),
        (
            "Flash Sale (50 users, 5 in stock) / Double Dip (10 x 1 user)",
            f"{'ok' if reports['flash_sale'].ok else 'FAILED'} / "
            f"{'ok' if reports['double_dip'].ok else 'FAILED'}",
        ),
        (
            "peak memory in the sustained runs: gateway workers / consumer",
            " / ".join(f"{v:.0f} MB" for v in memory.values()),
        ),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    stack = Stack("bench", root=ROOT / ".stack", fresh=True)
    procs: list[subprocess.Popen[bytes]] = []
    say("starting servers")
    stack.start()
    try:
        urls = stack.urls()
        # Settings of the shell (FLASHCLAIM_*) apply, for experiments; the servers are ours.
        settings = Settings.from_env({**os.environ, **urls}).replace(
            http_port=PORT, log_level="WARNING", gateway_workers=2
        )
        migrate(settings.database_url)
        say("pgbench ceiling (10 s)")
        ceiling = pgbench_ceiling(stack, settings.database_url)
        log = OUT / "services.log"
        log.unlink(missing_ok=True)
        procs.append(start_service("consumer", settings.environ(), log))
        procs.append(start_service("gateway", settings.environ(), log))
        wait_healthy()
        time.sleep(1)
        reports = asyncio.run(end_to_end())
        # Peak resident memory so far: the sustained scenarios, before the burst.
        workers = children_of(procs[1].pid)
        peaks = peak_rss_mb([*workers, procs[0].pid])
        memory = {f"gateway {i}": peaks.get(pid, float("nan")) for i, pid in enumerate(workers)}
        memory["consumer"] = peaks.get(procs[0].pid, float("nan"))
        reports["burst"] = asyncio.run(burst())
        print()
        print(
            f"flashclaim bench on {platform.node()}: {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, every server on the same machine"
        )
        print(table(ceiling, reports, memory))
        results = {
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "pgbench_ceiling_claims_per_s": ceiling,
            "memory_peak_mb": memory,
            "scenarios": {k: r.as_dict() for k, r in reports.items()},
        }
        for r in results["scenarios"].values():
            r.pop("timeline", None)
        (OUT / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\nreport: {OUT / 'results.json'}, charts: {OUT}/*.png")
        return 0 if all(r.ok for k, r in reports.items() if k != "max") else 1
    finally:
        terminate(procs, 30)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
