"""``flashclaim outbox``: the operator's view of the events waiting to be published.

Exit codes: 0 done; 1 nothing to retry; 2 cannot reach the database or bad arguments.
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

from flashclaim.core.db import queries
from flashclaim.core.errors import InvalidInput
from flashclaim.core.events import NOTIFY_CHANNEL
from flashclaim.core.settings import Settings
from flashclaim.ops.deadletters import local_operator, operations_log


def add_parser(sub: Any) -> None:
    p = sub.add_parser("outbox", help="events waiting for the relay: stats, retry FAILED rows")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("stats", help="pending, failed, oldest pending age; FAILED rows")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--limit", type=int, default=20, help="FAILED rows listed (default 20)")
    a = actions.add_parser("retry", help="make FAILED rows pending again (attempts from 0)")
    a.add_argument("ids", nargs="*", metavar="EVENT_ID", type=_event_id)
    a.add_argument("--all", action="store_true", help="every FAILED row")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run, service="outbox")


def _event_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an event id (a UUID): {text!r}") from None


def run(settings: Settings, args: argparse.Namespace) -> int:
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        if args.action == "stats":
            return _stats(conn, args)
        return _retry(conn, args)


def stats(conn: psycopg.Connection[dict[str, Any]], limit: int) -> dict[str, Any]:
    """Pending, failed, the oldest pending row's age, the last send, and up to ``limit``
    FAILED rows (``failed_rows``)."""
    q = queries()
    figures = conn.execute(q["outbox_stats"].encode()).fetchone() or {}
    failed = conn.execute(q["outbox_failed"].encode(), {"limit": limit}).fetchall()
    return {**figures, "failed_rows": failed}


def retry(
    conn: psycopg.Connection[dict[str, Any]], ids: list[uuid.UUID] | None, operator: str
) -> list[str]:
    """Make FAILED rows (``ids``, or all with ``None``) pending again, their attempts
    from 0, and wake the relays; audited under ``operator``. Returns the ids retried."""
    rows = conn.execute(
        queries()["outbox_retry"].encode(), {"ids": ids, "channel": NOTIFY_CHANNEL}
    ).fetchall()
    conn.commit()
    retried = [str(r["id"]) for r in rows]
    operations_log.warning(
        "outbox retry",
        extra={
            "audit": True,
            "action": "outbox retry",
            "operator": operator,
            "count": len(retried),
            "event_ids": retried[:1000],
        },
    )
    return retried


def _stats(conn: psycopg.Connection[dict[str, Any]], args: argparse.Namespace) -> int:
    figures = stats(conn, args.limit)
    failed = figures["failed_rows"]
    if args.json:
        print(json.dumps(figures, default=str, indent=2))
        return 0
    oldest = figures.get("oldest_pending_seconds")
    print(f"pending              {figures.get('pending', 0)}")
    print(f"failed               {figures.get('failed', 0)}")
    print(f"oldest pending       {'-' if oldest is None else f'{oldest:.1f} s'}")
    print(f"last sent            {figures.get('last_sent_at') or '-'}")
    for row in failed:
        print(
            f"  FAILED {row['id']} {row['event_type']} coupon={row['aggregate']!r}"
            f" attempts={row['attempts']} error={row['last_error']!r}"
        )
    if failed and figures.get("failed", 0) > len(failed):
        print(f"  ... and {figures['failed'] - len(failed)} more")
    return 0


def _retry(conn: psycopg.Connection[dict[str, Any]], args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all):
        raise InvalidInput("give event ids, or --all")
    ids = retry(conn, None if args.all else args.ids, local_operator())
    if args.json:
        print(json.dumps({"retried": ids}))
    else:
        print(f"{len(ids)} FAILED event(s) pending again")
    return 0 if ids else 1
