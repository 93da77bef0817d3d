"""The HTTP pieces the public API (gateway/) and the operators' API (ops/dlq_api.py)
share: JSON bodies in and out, the one table from the project's errors to HTTP answers
(every error a JSON body, never a traceback), request ids, and one access line a request.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from aiohttp import web, web_response
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from aiohttp.web import BaseRequest, StreamResponse

from flashclaim.core import logs
from flashclaim.core.errors import (
    CouponExists,
    CouponNotFound,
    DependencyUnavailable,
    FlashclaimError,
    Forbidden,
    IdempotencyKeyReused,
    InvalidInput,
    Overloaded,
    RateLimited,
    Unauthenticated,
)
from flashclaim.core.messages import dumps
from flashclaim.core.metrics import GatewayMetrics

# The application's figures, when it keeps them (its requests, by route and status).
METRICS = web.AppKey("metrics", GatewayMetrics)
# What a request's handling learns, for its log line, its span and its metrics.
HTTP_REQUEST_ID = web.RequestKey("http_request_id", str)  # X-Request-Id: the HTTP request's
REQUEST_ID = web.RequestKey("request_id", str)  # the claim's (the contract's request_id)
COUPON = web.RequestKey("coupon", str)
OUTCOME = web.RequestKey("outcome", str)
ERROR = web.RequestKey("error", str)
ERROR_CODE = web.RequestKey("error_code", str)
USER = web.RequestKey("user", str)  # the bearer token's user, once checked


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response, serialised with orjson (several times faster than json), its
    body no longer than its text (messages.dumps)."""
    return web.Response(
        body=dumps(data),
        status=status,
        headers=headers,
        content_type="application/json",
    )


async def json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or :class:`InvalidInput` (the body size cap is
    aiohttp's: 413)."""
    raw = await request.read()
    if not raw.strip():
        raise InvalidInput("request body must be a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    return data


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
_HTTP_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_SOURCE: tuple[int, str, Iterator[int]] | None = None


def _new_http_id() -> str:
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
    """Every answer gets its ``X-Request-Id``, every failure a JSON error, every request
    its metrics. One layer (each costs every request in flight a frame, in a burst
    thousands at once)."""
    started = time.perf_counter()
    incoming = request.headers.get("X-Request-Id", "")
    request[HTTP_REQUEST_ID] = incoming if _HTTP_REQUEST_ID.match(incoming) else _new_http_id()
    # Every line logged while the request is handled carries its id.
    bound = logs.bind_request(request[HTTP_REQUEST_ID])
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _refusal(request, exc)
    except Exception as exc:
        response = _refusal(request, exc)
    finally:
        logs.unbind_request(bound)
    response.headers["X-Request-Id"] = request[HTTP_REQUEST_ID]
    metrics = request.app.get(METRICS)
    if metrics is not None and metrics.enabled:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.request_done(route, request.method, response.status, time.perf_counter() - started)
        if ERROR_CODE in request:
            metrics.http_errors.labels(request[ERROR_CODE]).inc()
    return response


def _refusal(request: web.Request, exc: Exception) -> web.Response:
    """The JSON error for what a handler raised: ours (FlashclaimError), aiohttp's
    (an HTTPException of 400 and above), or a bug (500, logged with its trace: the one
    boundary left)."""
    if isinstance(exc, FlashclaimError):
        status, code = next(
            (v for k, v in ERRORS.items() if isinstance(exc, k)), (500, "internal_error")
        )
        request[ERROR] = str(exc)
        request[ERROR_CODE] = code
        # A claim refused after it got its id (503, 422...) says which claim it was.
        extra = {"request_id": request[REQUEST_ID]} if REQUEST_ID in request else {}
        response = error_response(
            status, code, str(exc), getattr(exc, "retry_after", None), **extra
        )
        if challenge := _challenge(exc):
            response.headers["WWW-Authenticate"] = challenge
        return response
    if isinstance(exc, web.HTTPException):
        code = re.sub(r"\W+", "_", exc.reason.lower()).strip("_")
        response = error_response(exc.status, code, exc.reason)
        request[ERROR_CODE] = code
        if allow := exc.headers.get("Allow"):
            response.headers["Allow"] = allow
        return response
    log.error(
        "unhandled error",
        exc_info=exc,
        extra={"http_request_id": request[HTTP_REQUEST_ID], "path": request.path},
    )
    request[ERROR_CODE] = "internal_error"
    return error_response(500, "internal_error", "internal server error")


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


# Asked every few seconds by Prometheus, load balancers and Kubernetes' probes: a line
# for each that succeeds would drown the rest (they are counted in the request metrics).
_ROUTINE = frozenset({"/metrics", "/healthz", "/readyz"})


class CanonicalAccessLogger(AbstractAccessLogger):
    """One line a request, but none for a routine scrape or probe that succeeded."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if response.status == 200 and request.path in _ROUTINE:
            return
        fields = {
            "http_request_id": request.get(HTTP_REQUEST_ID),
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 2),
        }
        if USER in request:  # the token's user (never the token)
            fields["user"] = request[USER]
        for key, name in (
            (REQUEST_ID, "request_id"),
            (COUPON, "coupon"),
            (OUTCOME, "outcome"),
            (ERROR, "error"),
        ):
            if key in request:
                fields[name] = request[key]
        self.logger.info("request", extra=fields)
