"""HTTP handlers of the REST contract."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from flashclaim.core import metrics
from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.http import (
    COUPON,
    METRICS,
    OUTCOME,
    REQUEST_ID,
    error_response,
    json_object,
    json_response,
)
from flashclaim.core.messages import ClaimCommand, ClaimResult, uuid_text
from gateway import auth, http_answers, validation
from gateway.state import (
    CLAIMS,
    PRINCIPAL,
    READINESS,
    REPOSITORY,
    REQUEST_IDS,
    SETTINGS,
)

routes = web.RouteTableDef()


@routes.post("/api/coupons")
async def create_coupon(request: web.Request) -> web.Response:
    auth.require_scope(request.get(PRINCIPAL), request.app[SETTINGS].auth_create_scope)
    body = await json_object(request)
    name = validation.name(body.get("name"), "name")
    amount = validation.amount(body.get("amount"))
    request[COUPON] = name
    coupon = await request.app[REPOSITORY].create_coupon(name, amount)
    return json_response(
        coupon, status=201, headers={"Location": f"/api/coupons/{quote(name, safe='')}"}
    )


# Any segment: aiohttp's default pattern for {name} ([^{}/]+) would turn a name with a
# brace into a 404 for the route; a name is checked by the rules, not by the router.
@routes.get("/api/coupons/{name:[^/]+}")
async def get_coupon(request: web.Request) -> web.Response:
    name = validation.name(request.match_info["name"], "name")
    return json_response(await request.app[REPOSITORY].get_coupon(name))


@routes.post("/api/coupons/claim")
async def claim(request: web.Request) -> web.Response:
    claims = request.app[CLAIMS]
    claims.refuse_if_overloaded()  # before anything is read: a crowd's refusals cost little
    body = await json_object(request)
    # With tokens on, the claim is the token's user's: a body naming another is refused
    # here, before anything is published.
    user_id = auth.require_user(request.get(PRINCIPAL), body.get("user_id"))
    coupon_name = validation.name(body.get("coupon_name"), "coupon_name")
    del body  # not kept while the claim waits (in a burst, thousands wait at once)
    key = validation.idempotency_key(request.headers.get("Idempotency-Key"))
    ids = request.app[REQUEST_IDS]
    # With a key, the id is the client's own (scoped to user_id, unguessable: see
    # gateway/idempotency.py); without one, every request is a new claim.
    request_id = ids.for_key(user_id, key) if key else ids.fresh()
    request[REQUEST_ID] = uuid_text(request_id)
    request[COUPON] = coupon_name
    command = ClaimCommand(request_id, user_id, coupon_name)
    result = await claims.submit(command, replayable=key is not None)
    if result is None:
        request[OUTCOME] = "pending"
        return pending_response(request_id)
    request[OUTCOME] = result.outcome.code
    return result_response(result)


@routes.get("/api/claims/{request_id}")
async def get_claim(request: web.Request) -> web.Response:
    """The claim's final answer; 202 while it is on its way; 404 if never accepted.

    Redis answers first; the inbox in PostgreSQL is the record when Redis has no result
    (expired, restarted, or down when the consumer reported). A claim is "on its way"
    while the inbox has no result but the request was accepted (answered 202).
    """
    try:
        request_id = uuid.UUID(request.match_info["request_id"])
    except ValueError:
        return error_response(404, "claim_not_found", "no such claim request")
    # With tokens on, a claim is shown only to its own user; to anyone else it does not
    # exist (404, as for an id never seen: no one learns which ids are in use).
    principal = request.get(PRINCIPAL)

    def visible(user_id: str | None) -> bool:
        return principal is None or user_id == principal.user_id

    async def pending() -> bool:
        owner = await service.pending_owner(request_id)
        return owner is not None and visible(owner)

    service = request.app[CLAIMS]
    result = await service.lookup(request_id)
    if result is not None and visible(result.user_id):
        return result_response(result)
    try:
        status, owner, result = await request.app[REPOSITORY].recorded_result(request_id)
    except DependencyUnavailable:
        if await pending():
            return pending_response(request_id)
        raise
    if not visible(owner):
        status, result = "UNKNOWN", None
    if result is not None:
        return result_response(result)
    if status == "FAILED":
        # Dead-lettered: kept for an operator to replay, after which it gets its answer.
        return pending_response(request_id, "dead_lettered")
    if status == "PENDING" or await pending():
        return pending_response(request_id)
    return error_response(
        404, "claim_not_found", "no such claim request", request_id=str(request_id)
    )


@routes.get("/metrics")
async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus's text format; with several gateway workers, their sum (whichever
    worker answers; the others' figures are at most a second late: metrics.Tally)."""
    request.app[METRICS].flush()
    body = metrics.exposition(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


# The public API's description (OpenAPI 3.1), kept beside the handlers it describes;
# tests/unit/test_openapi.py holds it to the routes and tests/acceptance/test_openapi.py
# holds the gateway's answers to it.
OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    checks = request.app[READINESS]
    names = list(checks)
    outcomes = await asyncio.gather(
        *(asyncio.wait_for(checks[n](), 2.0) for n in names), return_exceptions=True
    )
    report = {n: "ok" if o is None else _reason(o) for n, o in zip(names, outcomes, strict=True)}
    ready = all(v == "ok" for v in report.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", "checks": report},
        status=200 if ready else 503,
    )


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, DependencyUnavailable):
        return str(exc)
    return f"unavailable: {type(exc).__name__}"


def result_response(result: ClaimResult) -> web.Response:
    return json_response(http_answers.body(result), status=http_answers.status(result))


def pending_response(request_id: uuid.UUID, status: str = "pending") -> web.Response:
    text = uuid_text(request_id)
    return json_response(
        {"request_id": text, "status": status},
        status=202,
        headers={"Location": f"/api/claims/{text}"},
    )
