"""Typed keys of the gateway's application state (the request keys it shares with the
operators' API are core/http.py's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from flashclaim.core.settings import ProxyNetwork, Settings
from gateway.auth import Authenticator, Principal
from gateway.claims import Claims
from gateway.idempotency import RequestIds
from gateway.ratelimit import RateLimiter
from gateway.repository import Repository

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
AMQP = web.AppKey("amqp", AbstractRobustConnection)
LIMITER = web.AppKey("limiter", RateLimiter)
# Bearer tokens on the public API (absent: authentication is off).
AUTH = web.AppKey("auth", Authenticator)
REPOSITORY = web.AppKey("repository", Repository)
CLAIMS = web.AppKey("claims", Claims)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
# TRUSTED_PROXIES, parsed: whose X-Forwarded-For names the client (gateway/clientaddress.py).
PROXIES = web.AppKey("proxies", tuple[ProxyNetwork, ...])

# The token's caller, when checked (its user is also core/http.py's USER, for the logs).
PRINCIPAL = web.RequestKey("principal", Principal)
# Named checks behind /readyz: each returns None or raises.
READINESS = web.AppKey("readiness", dict[str, Callable[[], Awaitable[None]]])
