"""`flashclaim audit` passes on a consistent database and names each violation."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from flashclaim.core.settings import Settings
from flashclaim.ops.invariants import run_audit
from tests.conftest import create_coupon_row


def audit(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"FLASHCLAIM_DATABASE_URL": settings.database_url, "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "flashclaim.cli", "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


# What the `broken` coupon's rows break (a duplicate holder cannot be written while the
# constraints hold: see the test of a missing one); written behind the code's back,
# they have no events either.
EVERY_VIOLATION_BUT_DUPLICATES = {
    "audit_stock",
    "audit_claims_without_success",
    "audit_success_without_claim",
    "audit_stale_pending",
    "audit_claims_without_event",
    "audit_coupons_without_events",
}


@pytest.fixture
def broken(settings: Settings, coupon_name: str) -> Iterator[str]:
    """A coupon whose rows break every invariant the audit checks; removed afterwards
    (other tests audit the whole database)."""
    granted, orphan, stale = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "INSERT INTO coupons (name, amount, remaining_amount) VALUES (%s, 5, 5)", (coupon_name,)
        )
        conn.execute(
            "INSERT INTO claims (coupon_name, user_id, message_id) VALUES (%s, 'x', %s)",
            (coupon_name, orphan),
        )
        conn.execute(
            "INSERT INTO inbox (message_id, sender, event_type, payload, status, outcome)"
            " VALUES (%s, 't', 'x', %s, 'PROCESSED', 'claimed')",
            (granted, f'{{"coupon_name": "{coupon_name}"}}'),
        )
        conn.execute(
            "INSERT INTO inbox (message_id, sender, event_type, payload, created_at)"
            " VALUES (%s, 't', 'x', %s, now() - interval '2 hours')",
            (stale, f'{{"coupon_name": "{coupon_name}"}}'),
        )
    yield coupon_name
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("DELETE FROM claims WHERE coupon_name = %s", (coupon_name,))
        conn.execute("DELETE FROM coupons WHERE name = %s", (coupon_name,))
        conn.execute("DELETE FROM inbox WHERE message_id = ANY(%s)", ([granted, stale],))


def test_audit_passes_on_a_consistent_database(settings: Settings) -> None:
    result = audit(settings, "--pending-older-than", "3600")
    assert result.returncode == 0, result.stdout
    assert "audit: passed" in result.stdout


def test_audit_reports_every_violation_and_fails(settings: Settings, broken: str) -> None:
    report = run_audit(settings.database_url, pending_older_than=3600)
    found = {name for name, rows in report.violations.items() if rows}
    assert found == EVERY_VIOLATION_BUT_DUPLICATES
    assert any(row["name"] == broken for row in report.violations["audit_stock"])
    result = audit(settings, "--pending-older-than", "3600")
    assert result.returncode == 1
    assert "audit: FAILED" in result.stdout
    assert broken in result.stdout


def test_audit_of_some_coupons_sees_only_them(settings: Settings, broken: str) -> None:
    """`--coupon` audits one sale: the broken coupon's every violation is found when it
    is named, and a sound coupon passes although the database holds the broken one."""
    sound = f"SOUND_{uuid.uuid4().hex[:10]}"
    create_coupon_row(settings.database_url, sound, 5)
    try:
        report = run_audit(settings.database_url, pending_older_than=3600, coupons=[broken])
        found = {name for name, rows in report.violations.items() if rows}
        assert found == EVERY_VIOLATION_BUT_DUPLICATES
        assert report.totals == {"coupons": 1, "claims": 1, "inbox": 2, "failed": 0}
        result = audit(settings, "--pending-older-than", "3600", "--coupon", sound)
        assert result.returncode == 0, result.stdout
        assert "coupons=1, claims=0, inbox=0" in result.stdout
        result = audit(settings, "--coupon", sound, "--coupon", broken)
        assert result.returncode == 1 and broken in result.stdout
    finally:
        with psycopg.connect(settings.database_url) as conn:
            conn.execute("DELETE FROM coupons WHERE name = %s", (sound,))


def test_audit_says_when_it_cannot_reach_the_database() -> None:
    env = {
        "FLASHCLAIM_DATABASE_URL": "postgresql://x@127.0.0.1:1/x?connect_timeout=1",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "flashclaim.cli", "audit"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot reach the database" in result.stderr


def test_audit_finds_a_guarantee_gone_and_what_slipped_through(own_settings: Settings) -> None:
    """Without its UNIQUE constraint a user can hold a coupon twice: the audit names the
    missing constraint (and the stock that no longer adds up); with it back, it passes."""
    url = own_settings.database_url
    create_coupon_row(url, "TWICE", 5)
    assert run_audit(url).ok
    with psycopg.connect(url) as conn:
        conn.execute("ALTER TABLE claims DROP CONSTRAINT claims_one_per_user")
        for _ in range(2):
            conn.execute(
                "INSERT INTO claims (coupon_name, user_id, message_id) VALUES ('TWICE', 'u', %s)",
                (uuid.uuid4(),),
            )
    report = run_audit(url)
    assert report.violations["audit_guarantees"] == [
        {"table": "claims", "missing_constraint": "claims_one_per_user"}
    ]
    assert [r["name"] for r in report.violations["audit_stock"]] == ["TWICE"]
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM claims")
        conn.execute(
            "ALTER TABLE claims ADD CONSTRAINT claims_one_per_user UNIQUE (user_id, coupon_name)"
        )
    assert not run_audit(url).violations["audit_guarantees"]
