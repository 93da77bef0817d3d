"""The ``flashclaim`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from flashclaim import logs
from flashclaim.errors import ConfigError
from flashclaim.settings import Settings

log = logging.getLogger("flashclaim")


def _run_async(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _gateway(settings: Settings, args: argparse.Namespace) -> int:
    from gateway import service

    if args.port is not None:
        settings = settings.replace(http_port=args.port)
    _run_async(service.run(settings))
    return 0


def _consumer(settings: Settings, args: argparse.Namespace) -> int:
    from consumer import service

    _run_async(service.run(settings))
    return 0


def _schema_apply(settings: Settings, args: argparse.Namespace) -> int:
    from flashclaim.db import apply_schema

    apply_schema(settings.database_url)
    print("schema applied", file=sys.stderr)
    return 0


def _stack(settings: Settings, args: argparse.Namespace) -> int:
    from flashclaim import devstack

    return devstack.run_foreground(args.profile, consumers=args.consumers)


def _audit(settings: Settings, args: argparse.Namespace) -> int:
    import json

    import psycopg

    from flashclaim.audit import run_audit

    try:
        report = run_audit(settings.database_url, pending_older_than=args.pending_older_than)
    except psycopg.OperationalError as exc:
        print(f"flashclaim audit: cannot reach the database: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {"ok": report.ok, "totals": report.totals, "violations": report.violations},
                indent=2,
            )
        )
    else:
        print(report.render())
    return 0 if report.ok else 1


def _scenarios(settings: Settings, args: argparse.Namespace) -> int:
    from flashclaim import scenarios

    reports = asyncio.run(scenarios.run_all(args.url.rstrip("/"), burst=args.burst))
    for report in reports:
        print(report.summary())
    failed = [r for r in reports if r.violations]
    print("scenarios: " + ("all passed" if not failed else f"{len(failed)} failed"))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashclaim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("gateway", help="serve the HTTP API")
    p.add_argument("--port", type=int, help="override FLASHCLAIM_HTTP_PORT")
    p.set_defaults(func=_gateway, service="gateway")

    p = sub.add_parser("consumer", help="apply claim commands from RabbitMQ to PostgreSQL")
    p.set_defaults(func=_consumer, service="consumer")

    p = sub.add_parser("schema", help="database schema")
    schema = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = schema.add_parser("apply", help="apply schema.sql (idempotent)")
    a.set_defaults(func=_schema_apply, service="schema")

    p = sub.add_parser(
        "stack",
        help="start PostgreSQL, RabbitMQ and Redis locally, then the gateway and consumers",
    )
    p.add_argument("--profile", default="run", choices=["run", "test"])
    p.add_argument("--consumers", type=int, default=1)
    p.set_defaults(func=_stack, service="stack")

    p = sub.add_parser("audit", help="check the database's invariants; exit 1 on a violation")
    p.add_argument(
        "--pending-older-than",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a PENDING inbox row older than this is a violation (default 60)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_audit, service="audit")

    p = sub.add_parser(
        "scenarios", help="run Flash Sale, Double Dip and a burst over HTTP, and check them"
    )
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--burst", type=int, default=2000, help="claims in the burst (stock 100)")
    p.set_defaults(func=_scenarios, service="scenarios")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"flashclaim: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, args.service)
    return int(args.func(settings, args))


if __name__ == "__main__":
    sys.exit(main())
