"""The aiohttp application factory: routes, middleware and one cleanup context a resource."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from aiohttp.typedefs import Handler

from flashclaim.core import broker, metrics, tracing
from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.http import METRICS, USER, errors_middleware, hide_server_version
from flashclaim.core.results import ResultStore
from flashclaim.core.runtime import Runtime
from flashclaim.core.settings import Settings, proxy_networks
from gateway.admission import Admission
from gateway.auth import Authenticator, bearer_token
from gateway.claims import Claims
from gateway.clientaddress import client_address
from gateway.coalescer import Coalescer
from gateway.gateway_answers import GatewayAnswers
from gateway.handlers import routes
from gateway.idempotency import RequestIds, random_secret
from gateway.middleware import tracing_middleware
from gateway.overload import Overload
from gateway.publisher import ClaimPublisher
from gateway.ratelimit import RateLimiter
from gateway.replies import ReplyListener
from gateway.repository import Repository
from gateway.state import (
    AMQP,
    AUTH,
    CLAIMS,
    LIMITER,
    PRINCIPAL,
    PROXIES,
    READINESS,
    REDIS,
    REPOSITORY,
    REQUEST_IDS,
    SETTINGS,
)

log = logging.getLogger(__name__)


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The public API's bearer token (gateway/auth.py); in the chain only when
    authentication is on, so that an open API pays nothing for it."""
    if request.path.startswith("/api/"):
        token = bearer_token(request.headers.getall("Authorization", []))
        principal = await request.app[AUTH].principal(token)
        request[PRINCIPAL] = principal
        request[USER] = principal.user_id
    return await handler(request)


@web.middleware
async def _rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A token bucket per user on the public API (gateway/ratelimit.py): the token's user
    when there is one, else the client's address; in the chain only when configured (off
    by default), as each layer costs every request in flight a frame."""
    limiter = request.app[LIMITER]
    if request.path.startswith("/api/"):
        principal = request.get(PRINCIPAL)
        if principal is not None:
            await limiter.check(f"user:{principal.user_id}")
        else:
            proxies = request.app[PROXIES]
            forwarded = request.headers.getall("X-Forwarded-For", [])
            await limiter.check(f"address:{client_address(request.remote, forwarded, proxies)}")
    return await handler(request)


def create_app(settings: Settings) -> web.Application:
    """Build the gateway; nothing connects until the app starts."""
    auth = Authenticator.of(settings)
    limited = settings.rate_limit_per_second > 0
    middlewares = [
        errors_middleware,
        *([_authenticate] if auth else []),
        *([_rate_limit] if limited else []),
    ]
    if tracing.enabled():
        middlewares.insert(0, tracing_middleware)
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[SETTINGS] = settings
    hide_server_version()
    if auth is not None:
        app[AUTH] = auth
        if settings.auth_hs256_secret.get_secret_value():
            log.warning("HS256 tokens are accepted (AUTH_HS256_SECRET): for development only")
    else:
        log.warning("the public API is open: anyone who reaches it may claim as any user")
    app[PROXIES] = proxy_networks(settings.trusted_proxies)
    app[READINESS] = {}
    app[METRICS] = metrics.GatewayMetrics(settings.metrics_enabled)
    # An unset secret is drawn by the process that starts the gateway workers and
    # handed to them (gateway/service.py); a lone process draws its own.
    app[REQUEST_IDS] = RequestIds(settings.idempotency_secret.get_secret_value() or random_secret())
    app.add_routes(routes)
    app.cleanup_ctx.append(_resources)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Everything a worker holds, opened in order and closed in reverse through the
    service runtime (flashclaim/core/runtime.py)."""
    async with Runtime(app[SETTINGS], "gateway", asyncio.Event()) as rt:
        await _database(app, rt)
        _redis(app, rt)
        await _broker(app, rt)
        await _claims(app, rt)
        yield
        rt.stop.set()


async def _database(app: web.Application, rt: Runtime) -> None:
    s = app[SETTINGS]
    # Not waiting: claims need no database, so the gateway starts even while it is down.
    pool = await rt.database(s.db_pool_min_size, s.db_pool_max_size, wait=False)
    app[REPOSITORY] = Repository(pool)
    app[READINESS]["database"] = app[REPOSITORY].ping


def _redis(app: web.Application, rt: Runtime) -> None:
    s = app[SETTINGS]
    client = rt.redis()
    app[REDIS] = client
    if s.rate_limit_per_second > 0:
        app[LIMITER] = RateLimiter(client, s.namespace, s.rate_limit_per_second, s.rate_limit_burst)

    async def ping() -> None:
        await client.ping()

    app[READINESS]["redis"] = ping


async def _broker(app: web.Application, rt: Runtime) -> None:
    connection = await rt.broker()
    app[AMQP] = connection
    app[READINESS]["broker"] = _connected(connection)


async def _claims(app: web.Application, rt: Runtime) -> None:
    s = app[SETTINGS]
    publisher = ClaimPublisher(
        app[AMQP],
        s.topology(),
        s.publish_timeout_seconds,
        s.breaker_failure_threshold,
        s.breaker_recovery_seconds,
        app[METRICS],
    )
    await publisher.open()
    rt.on_exit(publisher.close, "claim publisher")
    results = ResultStore(
        app[REDIS], s.namespace, s.result_ttl_seconds, s.gateway_answer_ttl_seconds
    )
    replies = ReplyListener(app[REDIS], results.reply_channel(s.instance_id))
    await replies.start()
    rt.on_exit(replies.stop, "reply listener")
    admission = (
        Admission(app[REPOSITORY].remaining, min(s.claim_hold_seconds, s.claim_wait_seconds))
        if s.claim_hold_seconds > 0
        else None
    )
    known = GatewayAnswers(
        app[REPOSITORY].holders, on_sold_out=admission.sold_out if admission else None
    )
    if admission is not None:
        admission.on_exhausted = known.sold_out
    claims = app[CLAIMS] = Claims(
        Coalescer(
            publisher.publish, s.publish_linger_ms / 1000, s.publish_max_claims, publisher.check
        ),
        replies,
        results,
        s.claim_wait_seconds,
        s.max_in_flight_claims,
        known,
        admission,
        app[METRICS],
        Overload(s.overload_wait_seconds) if s.overload_wait_seconds > 0 else None,
    )
    rt.on_exit(claims.drain, "answers given by the gateway")
    rt.background(
        metrics.sample_every(1.0, rt.stop, _sampler(app, publisher, admission)), "metrics"
    )
    rt.on_exit(app[METRICS].flush, "metrics counted since the last second")


def _sampler(
    app: web.Application, publisher: ClaimPublisher, admission: Admission | None
) -> Callable[[], None]:
    """This worker's gauges that no event updates: pool, breaker, held claims."""
    m = app[METRICS]

    def sample() -> None:
        if not m.enabled:
            return
        m.flush()
        m.sample_pool(app[REPOSITORY].pool_stats())
        m.breaker_open.set(1 if publisher.breaker_open else 0)
        m.in_flight.set(app[CLAIMS].in_flight)
        m.held.set(admission.holding() if admission is not None else 0)

    return sample


def _connected(connection: AbstractRobustConnection) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        if not broker.is_up(connection):
            raise DependencyUnavailable("broker", "not connected")

    return check
