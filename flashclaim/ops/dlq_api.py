"""The operators' HTTP API for dead letters, under ``/admin/dlq``.

Served by its own process, ``flashclaim admin``, which refuses to start unless
``FLASHCLAIM_ADMIN_TOKEN`` is set to 32 characters at least; on its own address
(``FLASHCLAIM_ADMIN_HOST``, loopback by default, whatever the public API binds to) and
port (``FLASHCLAIM_ADMIN_PORT``), apart from the public API and its rate limit. Every
request must carry ``Authorization: Bearer <token>`` (401 otherwise). Replays and
purges are audited with the caller: the ``X-Operator`` header (tools should send their
user's name) and the remote address.

    GET  /admin/dlq                      stats: depth, counts by reason and error type
    GET  /admin/dlq/messages             list (?reason=&coupon=&older_than=&limit=)
    GET  /admin/dlq/messages/{id}        one message in full
    POST /admin/dlq/replay               {"message_ids": [...] | filters | "all": true,
                                          "dry_run": false, "rate": null}
    POST /admin/dlq/purge                the same selection, plus "confirm": true
    GET  /openapi.json                   this API's description (OpenAPI 3.1), no token

and the operators' console, pages for a browser under ``/console`` (console.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from flashclaim.core import broker, db
from flashclaim.core.errors import ConfigError, InvalidInput
from flashclaim.core.http import (
    CanonicalAccessLogger,
    errors_middleware,
    hide_server_version,
    json_object,
    json_response,
)
from flashclaim.core.runtime import Runtime
from flashclaim.core.settings import PREFIX, Settings
from flashclaim.ops import console
from flashclaim.ops.admin_state import BROKER, DATABASE, DLQ, SETTINGS
from flashclaim.ops.deadletters import BadSelection, DeadLetterQueue, Selection

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def create_admin_app(settings: Settings) -> web.Application:
    hide_server_version()
    app = web.Application(
        middlewares=[errors_middleware, _bearer_token], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app.add_routes(routes)
    app.add_subapp("/console", console.create_console_app())
    app.cleanup_ctx.append(_broker)
    app.cleanup_ctx.append(_database)
    return app


@web.middleware
async def _bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/openapi.json" and request.method in ("GET", "HEAD"):
        return await handler(request)  # the description is public; every operation is not
    if request.path == "/console" or request.path.startswith("/console/"):
        return await handler(request)  # signed in with a session of its own (console.py)
    expected = f"Bearer {request.app[SETTINGS].admin_token.get_secret_value()}".encode()
    # Header bytes that are not UTF-8 arrive as surrogate escapes: compare raw bytes.
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, expected):
        response = json_response(
            {"error": "a valid admin bearer token is required", "code": "unauthorized"}, status=401
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="flashclaim-admin"'
        return response
    return await handler(request)


async def _broker(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    connection = await broker.connect(s.amqp_url, f"gateway admin {s.instance_id}")
    # Declared as every service declares it (idempotent): the dead-letter queue is there
    # to be read, empty, before any consumer ran.
    channel = await connection.channel()
    await s.topology().declare(channel)
    await channel.close()
    app[DLQ] = DeadLetterQueue(connection, s.topology())
    app[BROKER] = connection
    yield
    await connection.close()


async def _database(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    pool = db.create_pool(s.database_url, 0, 2, f"flashclaim admin {s.instance_id}")
    await pool.open(wait=False)
    app[DATABASE] = pool
    yield
    await pool.close()


def _operator(request: web.Request) -> str:
    """Who called, for the audit event: the ``X-Operator`` header if it is sane (the
    token is shared, so tooling should name its user), and always where from."""
    named = request.headers.get("X-Operator", "")
    if not (0 < len(named) <= 64 and named.isascii() and named.isprintable()):
        named = "unnamed"
    return f"{named} via http from {request.remote or 'unknown'}"


def _selection(data: dict[str, Any], required: bool = True) -> Selection:
    try:
        return Selection.of(
            data.get("message_ids"),
            data.get("reason"),
            data.get("coupon"),
            data.get("older_than"),
            data.get("all", False),  # a boolean, or refused: "yes" is not true
            required=required,
        )
    except BadSelection as exc:
        raise InvalidInput(str(exc)) from None


# This API's description, kept beside it; tests/unit/test_openapi.py holds it to the
# routes and tests/acceptance/test_openapi.py holds the answers to it.
OPENAPI = (Path(__file__).parent / "openapi-admin.json").read_bytes()


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


@routes.get("/admin/dlq")
async def stats(request: web.Request) -> web.Response:
    return json_response(await request.app[DLQ].stats())


@routes.get("/admin/dlq/messages")
async def list_messages(request: web.Request) -> web.Response:
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        raise InvalidInput("'limit' must be a whole number") from None
    if limit < 0:
        raise InvalidInput("'limit' cannot be negative")
    selection = _selection(dict(q), required=False)
    letters = await request.app[DLQ].select(selection)
    return json_response([x.summary() for x in letters][:limit])


@routes.get("/admin/dlq/messages/{message_id}")
async def show(request: web.Request) -> web.Response:
    letter = await request.app[DLQ].find(request.match_info["message_id"])
    if letter is None:
        return json_response({"error": "no such dead letter", "code": "not_found"}, status=404)
    return json_response(letter.full())


@routes.post("/admin/dlq/replay")
async def replay(request: web.Request) -> web.Response:
    data = await json_object(request)
    rate = data.get("rate")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0
    ):
        raise InvalidInput("'rate' must be a positive number")
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        # "true" as a string must not replay for real.
        raise InvalidInput("'dry_run' must be true or false")
    moved = await request.app[DLQ].replay(
        _selection(data), dry_run=dry_run, rate=rate, operator=_operator(request)
    )
    return json_response(
        {"dry_run": dry_run, "count": len(moved), "message_ids": [x.message_id for x in moved]}
    )


@routes.post("/admin/dlq/purge")
async def purge(request: web.Request) -> web.Response:
    data = await json_object(request)
    if data.get("confirm") is not True:
        raise InvalidInput('purging removes messages for good: send "confirm": true')
    removed = await request.app[DLQ].purge(_selection(data), operator=_operator(request))
    return json_response({"count": len(removed), "message_ids": [x.message_id for x in removed]})


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve the admin API until ``stop`` is set (default: SIGTERM or SIGINT)."""
    if not settings.admin_token.get_secret_value():
        raise ConfigError(f"{PREFIX}ADMIN_TOKEN is not set: the admin API stays off")
    async with Runtime(settings, "admin API", stop) as rt:
        runner = web.AppRunner(
            create_admin_app(settings),
            access_log_class=CanonicalAccessLogger,
            access_log=logging.getLogger("flashclaim.access"),
        )
        await runner.setup()
        # Requests in hand get the grace period (the site's shutdown timeout).
        rt.on_exit(runner.cleanup, "HTTP server", settings.shutdown_grace_seconds + 5)
        site = web.TCPSite(
            runner,
            settings.admin_host,
            settings.admin_port,
            shutdown_timeout=settings.shutdown_grace_seconds,
        )
        await site.start()
        log.info(
            "admin API listening",
            extra={"host": settings.admin_host, "port": settings.admin_port},
        )
        await rt.stop.wait()
