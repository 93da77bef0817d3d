"""Typed keys of the gateway's application state, all of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from flashclaim.core.metrics import GatewayMetrics
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
METRICS = web.AppKey("metrics", GatewayMetrics)
# TRUSTED_PROXIES, parsed: whose X-Forwarded-For names the client (gateway/clientaddress.py).
PROXIES = web.AppKey("proxies", tuple[ProxyNetwork, ...])

# What a request's handling learns, for its log line, its span and its metrics.
REQUEST_ID = web.RequestKey("request_id", str)  # the HTTP request's (X-Request-Id)
CLAIM_ID = web.RequestKey("claim_id", str)  # the claim's request id
COUPON = web.RequestKey("coupon", str)
OUTCOME = web.RequestKey("outcome", str)
ERROR = web.RequestKey("error", str)
ERROR_CODE = web.RequestKey("error_code", str)
PRINCIPAL = web.RequestKey("principal", Principal)  # the token's caller, when checked
# Named checks behind /readyz: each returns None or raises.
READINESS = web.AppKey("readiness", dict[str, Callable[[], Awaitable[None]]])
