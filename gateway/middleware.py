"""Every error becomes the JSON error body; every request gets a request id."""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web, web_response
from aiohttp.typedefs import Handler

from flashclaim.core import logs, tracing
from flashclaim.core.errors import (
    CouponExists,
    CouponNotFound,
    DependencyUnavailable,
    FlashclaimError,
    Forbidden,
    InvalidInput,
    Overloaded,
    RateLimited,
    Unauthenticated,
)
from gateway.idempotency import IdempotencyKeyReused
from gateway.jsonresponse import json_response
from gateway.state import CLAIM_ID, ERROR, ERROR_CODE, METRICS, REQUEST_ID

log = logging.getLogger(__name__)

# The one table from the project's exceptions to HTTP answers.
ERRORS: dict[type[FlashclaimError], tuple[int, str]] = {
    InvalidInput: (400, "invalid_request"),
    Unauthenticated: (401, "invalid_token"),
    Forbidden: (403, "forbidden"),
    CouponExists: (409, "coupon_exists"),
    CouponNotFound: (404, "coupon_not_found"),
    IdempotencyKeyReused: (422, "idempotency_key_reused"),
    RateLimited: (429, "rate_limited"),
    Overloaded: (503, "overloaded"),
    DependencyUnavailable: (503, "service_unavailable"),
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_SOURCE: tuple[int, str, Iterator[int]] | None = None


def _new_request_id() -> str:
    """A request id unique across processes and restarts (a random prefix drawn once
    per process, then a counter): it correlates log lines, it guards nothing, so it
    need not cost a call to the system's random source per request as a UUID does."""
    global _SOURCE
    if _SOURCE is None or _SOURCE[0] != os.getpid():  # drawn again in a forked worker
        _SOURCE = (os.getpid(), secrets.token_hex(8), itertools.count())
    return f"{_SOURCE[1]}{next(_SOURCE[2]):016x}"


def error_response(
    status: int, code: str, message: str, retry_after: int | None = None, **extra: Any
) -> web.Response:
    response = json_response({"error": message, "code": code, **extra}, status=status)
    if retry_after is None and status in (429, 503):
        retry_after = 1
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, retry_after))
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await _answered(request, handler)
    metrics = request.app.get(METRICS)
    if metrics is not None and metrics.enabled:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.request_done(route, request.method, response.status, time.perf_counter() - started)
        if ERROR_CODE in request:
            metrics.http_errors.labels(request[ERROR_CODE]).inc()
    return response


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A server span for each request (when tracing is on), continuing the trace of a
    ``traceparent`` the client sent; the claim's command carries it on."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    with tracing.tracer().start_as_current_span(
        f"{request.method} {route}" if route else request.method,
        context=tracing.extract(request.headers),
        kind=tracing.SpanKind.SERVER,
        attributes={
            "http.request.method": request.method,
            "url.path": request.path,
            **({"http.route": route} if route else {}),
        },
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if CLAIM_ID in request:
            span.set_attribute("flashclaim.request_id", request[CLAIM_ID])
        if response.status >= 500:
            span.set_status(tracing.StatusCode.ERROR)
        return response


def _challenge(exc: FlashclaimError) -> str | None:
    """RFC 6750's ``WWW-Authenticate`` of a refusal for want of a token or a scope. The
    messages are this module's own fixed texts (no quote in them), never the token."""
    if isinstance(exc, Unauthenticated):
        text = str(exc).replace('"', "'")
        return f'Bearer realm="flashclaim", error="invalid_token", error_description="{text}"'
    if isinstance(exc, Forbidden) and exc.scope is not None:
        return f'Bearer realm="flashclaim", error="insufficient_scope", scope="{exc.scope}"'
    return None


def hide_server_version() -> None:
    """Every response says ``Server: flashclaim``, not the Python and aiohttp versions.

    aiohttp fills the header from its module's ``SERVER_SOFTWARE`` when a response has
    none, including the answers its HTTP parser gives before any middleware or signal
    runs (a malformed request line): setting it there is the one place that covers all.
    """
    web_response.SERVER_SOFTWARE = "flashclaim"  # type: ignore[attr-defined]


async def _answered(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = incoming if _REQUEST_ID.match(incoming) else _new_request_id()
    try:
        # Every line logged while the request is handled carries its id.
        with logs.bind(request_id=request[REQUEST_ID]):
            response = await handler(request)
    except FlashclaimError as exc:
        status, code = next(
            (v for k, v in ERRORS.items() if isinstance(exc, k)), (500, "internal_error")
        )
        request[ERROR] = str(exc)
        request[ERROR_CODE] = code
        # A claim refused after it got its id (503, 422...) says which claim it was.
        extra = {"request_id": request[CLAIM_ID]} if CLAIM_ID in request else {}
        response = error_response(
            status, code, str(exc), getattr(exc, "retry_after", None), **extra
        )
        if challenge := _challenge(exc):
            response.headers["WWW-Authenticate"] = challenge
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = re.sub(r"\W+", "_", exc.reason.lower()).strip("_")
        response = error_response(exc.status, code, exc.reason)
        request[ERROR_CODE] = code
        if allow := exc.headers.get("Allow"):
            response.headers["Allow"] = allow
    except Exception:  # the one boundary left: a bug answers 500, logged with its trace
        log.exception(
            "unhandled error", extra={"request_id": request[REQUEST_ID], "path": request.path}
        )
        response = error_response(500, "internal_error", "internal server error")
        request[ERROR_CODE] = "internal_error"
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    return response
