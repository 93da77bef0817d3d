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

from aiohttp import web
from aiohttp.typedefs import Handler

from flashclaim.core import logs
from flashclaim.core.errors import (
    CouponExists,
    CouponNotFound,
    DependencyUnavailable,
    FlashclaimError,
    InvalidInput,
    Overloaded,
    RateLimited,
)
from gateway.idempotency import IdempotencyKeyReused
from gateway.jsonresponse import json_response
from gateway.state import METRICS

log = logging.getLogger(__name__)

# The one table from the project's exceptions to HTTP answers.
ERRORS: dict[type[FlashclaimError], tuple[int, str]] = {
    InvalidInput: (400, "invalid_request"),
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
        metrics.http_requests.labels(route, request.method, str(response.status)).inc()
        metrics.http_duration.labels(route, request.method).observe(time.perf_counter() - started)
        if "error_code" in request:
            metrics.http_errors.labels(request["error_code"]).inc()
    return response


async def _answered(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    request["request_id"] = incoming if _REQUEST_ID.match(incoming) else _new_request_id()
    try:
        # Every line logged while the request is handled carries its id.
        with logs.bind(request_id=request["request_id"]):
            response = await handler(request)
    except FlashclaimError as exc:
        status, code = next(
            (v for k, v in ERRORS.items() if isinstance(exc, k)), (500, "internal_error")
        )
        request["error"] = str(exc)
        request["error_code"] = code
        # A claim refused after it got its id (503, 422...) says which claim it was.
        extra = {"request_id": request["claim_id"]} if "claim_id" in request else {}
        response = error_response(
            status, code, str(exc), getattr(exc, "retry_after", None), **extra
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = re.sub(r"\W+", "_", exc.reason.lower()).strip("_")
        response = error_response(exc.status, code, exc.reason)
        request["error_code"] = code
        if allow := exc.headers.get("Allow"):
            response.headers["Allow"] = allow
    except Exception:
        log.exception(
            "unhandled error", extra={"request_id": request["request_id"], "path": request.path}
        )
        response = error_response(500, "internal_error", "internal server error")
        request["error_code"] = "internal_error"
    response.headers["X-Request-Id"] = request["request_id"]
    return response
