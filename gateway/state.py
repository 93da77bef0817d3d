"""Typed keys of the gateway's application state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.claims import ClaimService
from gateway.idempotency import RequestIds
from gateway.repository import Repository

REPOSITORY = web.AppKey("repository", Repository)
CLAIMS = web.AppKey("claims", ClaimService)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
# Named checks behind /readyz: each returns None or raises.
READINESS = web.AppKey("readiness", dict[str, Callable[[], Awaitable[None]]])
