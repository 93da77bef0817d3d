"""The ``flashclaim`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from flashclaim.core import logs
from flashclaim.core.errors import ConfigError, DependencyUnavailable, FlashclaimError
from flashclaim.core.settings import Settings

log = logging.getLogger("flashclaim")
# Packages of the optional extras (pyproject.toml), for a clear error when one is missing.
EXTRAS = {
    "hdrh": "loadtest",
    "matplotlib": "loadtest",
    "locust": "loadtest",
    "supervisor": "devstack",
}


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
    return service.serve(settings)


def _admin(settings: Settings, args: argparse.Namespace) -> int:
    from flashclaim.ops import dlq_api

    if not settings.admin_token.get_secret_value():
        raise ConfigError("set FLASHCLAIM_ADMIN_TOKEN (32+ characters)")
    _run_async(dlq_api.run(settings))
    return 0


def _consumer(settings: Settings, args: argparse.Namespace) -> int:
    from consumer import service
    from flashclaim.core import metrics, tracing

    metrics.refuse_multiprocess("consumer")
    tracing.configure("consumer")
    _run_async(service.run(settings))
    return 0


def _relay(settings: Settings, args: argparse.Namespace) -> int:
    from flashclaim.core import metrics, tracing
    from relay import service

    metrics.refuse_multiprocess("relay")
    tracing.configure("relay")
    _run_async(service.run(settings))
    return 0


def _schema(settings: Settings, args: argparse.Namespace) -> int:
    from tenacity import RetryCallState

    from flashclaim.core.privileges import grant_services
    from flashclaim.core.retry import is_outage, outage_wait
    from flashclaim.core.schema_migrations import migrate, pending_migrations

    def waiting(state: RetryCallState) -> None:
        # A progress line a try: a container started with its database shows why it waits.
        error = state.outcome.exception() if state.outcome else None
        reason = " ".join(str(error).split())[:200]
        pause = state.next_action.sleep if state.next_action else 0
        print(
            f"flashclaim schema: database not reachable yet ({reason}); "
            f"trying again in {pause:.1f} s",
            file=sys.stderr,
        )

    # An unreachable database is waited for up to --wait seconds (a server that is still
    # starting: Compose, a Kubernetes Job next to a new cluster).
    patience = outage_wait(args.wait, waiting)
    try:
        if args.action == "status":
            pending = patience(pending_migrations, settings.database_url)
            print("up to date" if not pending else "pending: " + ", ".join(pending))
            return 0 if not pending else 1
        applied = patience(migrate, settings.database_url)
        for role in args.grant_to:
            grant_services(settings.database_url, role)
    except Exception as exc:  # an outage, after the wait, says how long it was waited for
        if not is_outage(exc) or not args.wait:
            raise
        reason = " ".join(str(exc).split())
        raise DependencyUnavailable("database", f"waited {args.wait:g} s; {reason}") from exc
    print(("applied " + ", ".join(applied)) if applied else "schema up to date", file=sys.stderr)
    if args.grant_to:
        print(f"services' privileges granted to {', '.join(args.grant_to)}", file=sys.stderr)
    return 0


def _topology_apply(settings: Settings, args: argparse.Namespace) -> int:
    """Declare the exchanges and queues and set their policies (idempotent)."""
    from flashclaim.core import broker
    from flashclaim.core.policies import apply_configured

    async def apply() -> None:
        await apply_configured(settings)
        connection = await broker.connect(settings.amqp_url, "flashclaim topology", 30)
        async with connection:
            await settings.topology().declare(await connection.channel())

    _run_async(apply())
    print("topology and policies applied", file=sys.stderr)
    return 0


def _topology_definitions(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from flashclaim.core.policies import definitions

    document = definitions(settings.topology(), args.broker_major, args.vhost)
    print(json.dumps(document, indent=2))
    return 0


def _stack(settings: Settings, args: argparse.Namespace) -> int:
    from flashclaim.devtools import devstack

    if args.action == "stop":
        return devstack.stop_profile(args.profile)
    return devstack.run_foreground(args.profile, consumers=args.consumers)


def _audit(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from flashclaim.ops.invariants import run_audit

    report = run_audit(
        settings.database_url,
        pending_older_than=args.pending_older_than,
        coupons=args.coupon,
        outbox_retention=settings.outbox_retention_seconds,
        inbox_retention=settings.inbox_retention_seconds,
    )
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
    from flashclaim.devtools import scenarios
    from flashclaim.devtools.tokens import credentials_from

    credentials = credentials_from(settings, args.token_key)
    reports = asyncio.run(
        scenarios.run_all(args.url.rstrip("/"), burst=args.burst, credentials=credentials)
    )
    for report in reports:
        print(report.summary())
    failed = [r for r in reports if r.violations]
    print("scenarios: " + ("all passed" if not failed else f"{len(failed)} failed"))
    return 1 if failed else 0


def _loadtest(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from flashclaim.devtools.loadtest import run_scenario
    from flashclaim.devtools.tokens import credentials_from

    credentials = credentials_from(settings, args.token_key)
    params = {
        k: v
        for k, v in vars(args).items()
        if k
        not in (
            *("command", "func", "service", "url", "report", "chart", "scenario", "quiet"),
            "token_key",
        )
        and v is not None
    }
    report = asyncio.run(
        run_scenario(
            args.scenario, args.url, params, progress=not args.quiet, credentials=credentials
        )
    )
    print(report.summary())
    if args.report:
        report.write_json(Path(args.report))
        print(f"report      {args.report}")
    if args.chart:
        report.write_chart(Path(args.chart))
        print(f"chart       {args.chart}")
    return 0 if report.ok else 1


Handler = Callable[[Settings, argparse.Namespace], int]


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Handler,
    text: str,
    service: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand run by ``func``; ``service`` names it in the logs (default: ``name``)."""
    p = sub.add_parser(name, help=text)
    p.set_defaults(func=func, service=service or name)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashclaim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "gateway", _gateway, "serve the HTTP API")
    p.add_argument("--port", type=int, help="override FLASHCLAIM_HTTP_PORT")
    _command(
        sub, "admin", _admin, "serve the operators' dead-letter API (needs FLASHCLAIM_ADMIN_TOKEN)"
    )
    _command(sub, "consumer", _consumer, "apply claim commands from RabbitMQ to PostgreSQL")
    _command(sub, "relay", _relay, "publish the outbox's events to RabbitMQ (any number of them)")

    schema = sub.add_parser("schema", help="database schema").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    for action, text in (
        ("apply", "apply the pending migrations (each once)"),
        ("status", "list the pending migrations; exit 1 if any"),
    ):
        p = _command(schema, action, _schema, text, "schema")
        p.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="wait this long for an unreachable database, backing off (default: 0, "
            "try once); exit 2 if it is still unreachable",
        )
        if action == "apply":
            p.add_argument(
                "--grant-to",
                action="append",
                default=[],
                metavar="ROLE",
                help="give this role the services' privileges (rows, no DDL) once applied;"
                " run as the tables' owner (repeat for several)",
            )

    topology = sub.add_parser("topology", help="RabbitMQ exchanges, queues and policies")
    actions = topology.add_subparsers(dest="action", required=True, metavar="ACTION")
    _command(
        actions,
        "apply",
        _topology_apply,
        "declare them and set the policies (idempotent)",
        "topology",
    )
    p = _command(
        actions,
        "definitions",
        _topology_definitions,
        "print them as a RabbitMQ definitions file (for load_definitions; no users)",
        "topology",
    )
    p.add_argument("--broker-major", type=int, default=4, help="RabbitMQ major version (4)")
    p.add_argument("--vhost", default="/")

    from flashclaim.devtools.devstack import PROFILES

    p = _command(
        sub,
        "stack",
        _stack,
        "start PostgreSQL, RabbitMQ and Redis locally, then the gateway and consumers",
    )
    p.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "stop"],
        help="run (default): start everything in the foreground; stop: stop what a run"
        " that was killed left behind",
    )
    p.add_argument("--profile", default="run", choices=sorted(PROFILES))
    p.add_argument("--consumers", type=int, default=1)

    p = _command(sub, "loadtest", _loadtest, "run a load scenario against a gateway and check it")
    scenarios = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8080")
    common.add_argument("--report", help="write a JSON report here")
    common.add_argument("--chart", help="write a PNG chart of throughput and latency here")
    common.add_argument("--connections", type=int, default=512, help="HTTP connections")
    common.add_argument("--quiet", action="store_true", help="no progress line")
    common.add_argument(
        "--token-key",
        metavar="FILE",
        help="a gateway with bearer tokens on: sign each user's token with this private key"
        " (with FLASHCLAIM_AUTH_HS256_SECRET set, that secret); one token a user, kept",
    )
    s = scenarios.add_parser("flash-sale", parents=[common], help="N users race for S coupons")
    s.add_argument("--users", type=int, default=1000)
    s.add_argument("--stock", type=int, default=100)
    s.add_argument("--concurrency", type=int, default=256)
    s = scenarios.add_parser(
        "http-floor", parents=[common], help="N GET /healthz, C at a time (a burst's floor)"
    )
    s.add_argument("--requests", type=int, default=10_000)
    s.add_argument("--concurrency", type=int, default=1000)
    s = scenarios.add_parser("double-dip", parents=[common], help="one user, N claims at once")
    s.add_argument("--attempts", type=int, default=10)
    s.add_argument("--stock", type=int, default=100)
    for name, text in (
        ("sustained", "open-loop claims at a fixed rate"),
        ("mixed", "open-loop claims and coupon reads at a fixed rate"),
    ):
        s = scenarios.add_parser(name, parents=[common], help=text)
        s.add_argument("--rate", type=float, default=1000, help="requests per second")
        s.add_argument("--duration", type=float, default=10, help="seconds")
        s.add_argument("--coupons", type=int, default=10)
        s.add_argument(
            "--hot-share", type=float, default=0.9, help="share of requests on the one hot coupon"
        )
        s.add_argument("--stock", type=int, help="per coupon (default: enough for all)")
        s.add_argument("--seed", type=int, default=1)
        if name == "mixed":
            s.add_argument("--read-share", type=float, default=0.3)

    from flashclaim.ops import dlq_cli

    dlq_cli.add_parser(sub, argparse.ArgumentParser(add_help=False))
    from flashclaim.ops import outbox_cli

    outbox_cli.add_parser(sub)
    from flashclaim.ops import claim_story

    claim_story.add_parser(sub)
    from flashclaim.devtools import tokens

    tokens.add_parser(sub)

    p = _command(sub, "audit", _audit, "check the database's invariants; exit 1 on a violation")
    p.add_argument(
        "--pending-older-than",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a PENDING inbox row older than this is a violation (default 60)",
    )
    p.add_argument(
        "--coupon",
        action="append",
        metavar="NAME",
        help="audit only what concerns this coupon (repeat for several; default: all)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _command(
        sub,
        "scenarios",
        _scenarios,
        "run Flash Sale, Double Dip and a burst over HTTP, and check them",
    )
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--burst", type=int, default=2000, help="claims in the burst (stock 100)")
    p.add_argument(
        "--token-key",
        metavar="FILE",
        help="a gateway with bearer tokens on: sign each user's token with this private key"
        " (`flashclaim token keys`); with FLASHCLAIM_AUTH_HS256_SECRET set, that secret",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"flashclaim: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, args.service, settings.log_format)
    try:
        return int(args.func(settings, args))
    except Exception as exc:  # mapped to a line and exit 2 below, or raised (a bug)
        problem = _refusal(exc)
        if problem is None:
            raise
        print(f"flashclaim {args.command}: {problem}", file=sys.stderr)
        return 2


def _refusal(exc: Exception) -> str | None:
    """What to tell a person for an error that is theirs or their servers' (exit 2); ``None``
    for a bug. The one place the commands' errors become exit codes."""
    if isinstance(exc, ConfigError):
        return f"configuration error: {exc}"
    if isinstance(exc, DependencyUnavailable):
        return f"cannot reach the {exc.service}" + (f": {exc.detail}" if exc.detail else "")
    if isinstance(exc, FlashclaimError):  # InvalidInput and the like: the message says it
        return str(exc)
    if isinstance(exc, ModuleNotFoundError):
        extra = EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            return None
        return f"needs the {extra!r} extra (pip install 'flashclaim[{extra}]'): {exc}"
    # The servers' own errors, for commands that talk to them directly. Imported here:
    # they are loaded by then, and `flashclaim --help` stays quick.
    import socket

    import aiormq.exceptions
    import redis.exceptions

    from flashclaim.core.retry import is_outage

    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return f"cannot reach a server: {exc!r}"
    if isinstance(exc, OSError):  # a file: the message names it
        return str(exc)
    if is_outage(exc):
        return "cannot reach the database: " + " ".join(str(exc).split())
    if isinstance(exc, aiormq.exceptions.AMQPError | aiormq.exceptions.ChannelInvalidStateError):
        return f"cannot reach the broker: {exc!r}"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"cannot reach redis: {exc!r}"
    return None


if __name__ == "__main__":
    sys.exit(main())
