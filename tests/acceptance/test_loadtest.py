"""The load-test tools, run against real processes: their checks and their reports."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp

from flashclaim.devtools.loadreport import Report
from flashclaim.devtools.loadtest import Run
from tests.acceptance.conftest import Services

ROOT = Path(__file__).resolve().parents[2]


def loadtest(api: Services, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashclaim.cli", "loadtest", *args, "--url", api.base_url],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_flash_sale_reports_and_checks(api: Services, tmp_path: Path) -> None:
    report, chart = tmp_path / "r.json", tmp_path / "r.png"
    result = loadtest(
        api,
        "flash-sale",
        "--users",
        "300",
        "--stock",
        "20",
        "--concurrency",
        "100",
        "--report",
        str(report),
        "--chart",
        str(chart),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["ok"] is True
    assert data["statuses"] == {"200": 20, "400": 280}
    assert all(data["checks"].values())
    assert set(data["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max"}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[" in result.stderr  # the live progress line


def test_sustained_and_mixed_open_loop(api: Services, tmp_path: Path) -> None:
    for scenario in ("sustained", "mixed"):
        report = tmp_path / f"{scenario}.json"
        result = loadtest(
            api,
            scenario,
            "--rate",
            "300",
            "--duration",
            "2",
            "--coupons",
            "3",
            "--hot-share",
            "0.8",
            "--report",
            str(report),
            "--quiet",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        data = json.loads(report.read_text())
        assert data["sent"] == 600
        assert data["completed"] == 600
        assert data["ok"] is True
        assert data["timeline"], "per-second figures are reported"


def test_double_dip(api: Services) -> None:
    result = loadtest(api, "double-dip", "--attempts", "10", "--quiet")
    assert result.returncode == 0, result.stdout
    assert "1x200, 9x409" in result.stdout


async def test_checks_catch_answers_that_disagree_with_the_database(
    api: Services, http: aiohttp.ClientSession
) -> None:
    coupon = f"CHECK_{uuid.uuid4().hex[:8]}"
    run = Run(http, api.base_url)
    await run.create_coupon(coupon, 5)
    await run.claim("alice", coupon, 0.0)
    # A load test that believed bob won instead must fail its check.
    run.finals = [("bob", coupon, 200)]
    report = Report("flash-sale", {}, run.recorder, 1.0)
    await run.check(report, [coupon])
    assert report.checks["claimed_by equals the users told they won"] is False
    assert not report.ok


def test_locustfile_runs_headless(api: Services) -> None:
    coupon = f"LOCUST_{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "locust"),
            "-f",
            str(ROOT / "locustfile.py"),
            "--headless",
            "-u",
            "20",
            "-r",
            "20",
            "-t",
            "4s",
            "--host",
            api.base_url,
            "--only-summary",
        ],
        env={
            "PATH": "/usr/bin:/bin",
            "FLASHCLAIM_LOCUST_COUPON": coupon,
            "FLASHCLAIM_LOCUST_STOCK": "10",
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    state = json.loads(
        subprocess.run(
            ["curl", "-s", f"{api.base_url}/api/coupons/{coupon}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert state["remaining_amount"] == 10 - len(state["claimed_by"])
    assert len(state["claimed_by"]) == 10  # 20 shoppers, 10 in stock
