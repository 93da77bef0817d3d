"""``flashclaim audit``: check the database's invariants and say what was found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from flashclaim.core.db import queries

# (query, what a row found by it means)
CHECKS: tuple[tuple[str, str], ...] = (
    ("audit_stock", "remaining_amount differs from amount - claims"),
    (
        "audit_guarantees",
        "a constraint missing or not validated (one claim per user, stock in range, answers)",
    ),
    (
        "audit_claims_without_success",
        "a claim whose command was not recorded as granted (within the inbox retention)",
    ),
    ("audit_success_without_claim", "a command recorded as granted without its claim"),
    ("audit_stale_pending", "a command left PENDING longer than the threshold"),
    (
        "audit_claims_without_event",
        "a claim without exactly one coupon.claimed event (within the outbox retention)",
    ),
    (
        "audit_coupons_without_events",
        "a coupon without one coupon.created, or sold out without one coupon.sold_out",
    ),
)


@dataclass
class AuditReport:
    totals: dict[str, int] = field(default_factory=dict)
    violations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def render(self) -> str:
        lines = ["totals: " + ", ".join(f"{k}={v}" for k, v in self.totals.items())]
        for name, meaning in CHECKS:
            rows = self.violations.get(name, [])
            verdict = (
                "ok" if not rows else f"VIOLATION ({len(rows)}{'+' if len(rows) >= 100 else ''})"
            )
            lines.append(f"{name.removeprefix('audit_'):<24} {verdict:<16} {meaning}")
            lines += [f"    {row}" for row in rows[:10]]
        lines.append("audit: " + ("passed" if self.ok else "FAILED"))
        return "\n".join(lines)


def run_audit(
    conninfo: str,
    pending_older_than: float = 60.0,
    coupons: Sequence[str] | None = None,
    outbox_retention: float = 86_400.0,
    inbox_retention: float = 7 * 86_400.0,
) -> AuditReport:
    """Run every check in one repeatable-read snapshot, so they see one state; over the
    whole database, or only what concerns ``coupons`` (one sale's coupons)."""
    q = queries()
    report = AuditReport()
    params = {
        "older_than": pending_older_than,
        "coupons": list(coupons) if coupons else None,
        # Events of changes older than this may have been pruned once sent.
        "retention": outbox_retention,
        # Commands processed longer ago than this may have been pruned from the inbox.
        "inbox_retention": inbox_retention,
    }
    with psycopg.connect(conninfo, row_factory=dict_row) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            row = conn.execute(q["audit_totals"].encode(), params).fetchone()
            report.totals = dict(row) if row else {}
            for name, _ in CHECKS:
                rows = conn.execute(q[name].encode(), params)
                report.violations[name] = [
                    {k: str(v) for k, v in r.items()} for r in rows.fetchall()
                ]
    return report
