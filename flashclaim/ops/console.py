"""The operators' console: pages for a browser, served by the admin API under ``/console``.

The same operations as ``flashclaim dlq`` and the JSON admin API (ops/deadletters.py),
``flashclaim outbox`` and ``flashclaim claim show``, for a person: the dead letters by
reason and error type, a filterable list, one message in full, replay and purge of a
selection; the outbox's pending and failed events, and retrying failed ones; a claim's
story; and a live view of a sale (live.py), refreshing itself.

Who may do what (the invariants each handler relies on):

1. a person signs in with the admin token and their name (``POST /console/login``); the
   session lives in this process only (a restart signs everyone out) and is carried by
   an HttpOnly, ``SameSite=Strict`` cookie scoped to ``/console``; 8 hours at most;
2. every page but the sign-in form and the style sheet needs a session: a ``GET``
   without one is sent to the sign-in form, a ``POST`` without one is refused (403);
3. every ``POST`` carries the session's CSRF token in its form (the sign-in form, a
   token of its own matched against a cookie): without it, or with another, 403 and
   nothing is done;
4. a replay or a purge is shown first as a dry run, then done only when the operator
   types what it will do (``replay 3``): anything else is refused (400) and nothing
   moves. Each one done is in the operators' audit log under the signed-in name;
5. every response forbids scripts, frames and foreign form targets
   (Content-Security-Policy) and caching.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiohttp_jinja2
import jinja2
import psycopg
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiDictProxy
from psycopg.rows import dict_row

from flashclaim.ops import claim_story, live, outbox_cli
from flashclaim.ops.admin_state import BROKER, DATABASE, DLQ, SETTINGS
from flashclaim.ops.deadletters import BadSelection, DeadLetter, NotReplayable, Selection

SESSION_COOKIE = "flashclaim_console"
LOGIN_COOKIE = "flashclaim_console_login"
SESSION_SECONDS = 8 * 3600
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ACTIONS = ("replay", "purge")
HERE = Path(__file__).parent
T = TypeVar("T")


@dataclass
class Session:
    operator: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    expires: float = field(default_factory=lambda: time.monotonic() + SESSION_SECONDS)


class Sessions:
    """The signed-in operators of this process, by their cookie's random id."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def open(self, operator: str) -> tuple[str, Session]:
        self._drop_expired()
        key = secrets.token_urlsafe(32)
        self._by_id[key] = Session(operator)
        return key, self._by_id[key]

    def get(self, key: str | None) -> Session | None:
        session = self._by_id.get(key or "")
        if session is None or session.expires < time.monotonic():
            return None
        return session

    def close(self, key: str | None) -> None:
        self._by_id.pop(key or "", None)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._by_id.items() if s.expires < now]:
            del self._by_id[key]


SESSIONS = web.AppKey("console_sessions", Sessions)
RATES = web.AppKey("console_rates", live.Rates)
HTTP = web.AppKey("console_http", aiohttp.ClientSession)
SESSION = web.RequestKey("console_session", Session)
routes = web.RouteTableDef()


def create_console_app() -> web.Application:
    app = web.Application(middlewares=[_guard])
    app[SESSIONS] = Sessions()
    app[RATES] = live.Rates(window=10.0)
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates" / "console"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.add_routes(routes)
    app.router.add_static("/static", HERE / "static")
    app.cleanup_ctx.append(_http)
    return app


async def _http(app: web.Application) -> AsyncIterator[None]:
    """The client the live view reads the services' /metrics pages with."""
    async with aiohttp.ClientSession() as http:
        app[HTTP] = http
        yield


def _open_path(request: web.Request) -> bool:
    """The pages a person without a session may see."""
    return request.path in ("/console/login",) or request.path.startswith("/console/static/")


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _checked(request, handler)
    except web.HTTPException as exc:
        response = exc
    response.headers.update(SECURITY_HEADERS)
    return response


async def _checked(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _open_path(request):
        return await handler(request)
    session = request.app[SESSIONS].get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        if request.method in ("GET", "HEAD"):
            raise web.HTTPSeeOther("/console/login")
        return _refusal(request, 403, "Sign in first: this page needs a session.")
    if request.method == "POST":
        form = await request.post()
        given = str(form.get("csrf", ""))
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            return _refusal(request, 403, "The form's CSRF token is missing or wrong.")
    request[SESSION] = session
    return await handler(request)


def _refusal(request: web.Request, status: int, message: str) -> web.Response:
    return aiohttp_jinja2.render_template(
        "error.html", request, {"message": message, "session": None}, status=status
    )


def _page(
    name: str, request: web.Request, context: dict[str, Any], status: int = 200
) -> web.Response:
    return aiohttp_jinja2.render_template(
        name, request, {"session": request.get(SESSION), **context}, status=status
    )


def _operator(request: web.Request) -> str:
    return f"{request[SESSION].operator} via console from {request.remote or 'unknown'}"


# -- signing in and out -----------------------------------------------------------------


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    token = secrets.token_urlsafe(32)
    response = _page("login.html", request, {"csrf": token, "error": None})
    response.set_cookie(
        LOGIN_COOKIE, token, httponly=True, samesite="Strict", path="/console", max_age=600
    )
    return response


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    form = await request.post()
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(
        str(form.get("csrf", "")).encode(), expected.encode()
    ):
        return _refusal(request, 403, "The form's CSRF token is missing or wrong: load it again.")
    operator = str(form.get("operator", "")).strip()
    token = str(form.get("token", ""))
    admin_token = request.config_dict[SETTINGS].admin_token.get_secret_value()
    if not (0 < len(operator) <= 64 and operator.isascii() and operator.isprintable()):
        return _page(
            "login.html",
            request,
            {"csrf": expected, "error": "Give your name: 1 to 64 printable ASCII characters."},
            status=400,
        )
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        return _page("login.html", request, {"csrf": expected, "error": "Wrong token."}, status=401)
    key, _ = request.app[SESSIONS].open(operator)
    response = web.HTTPSeeOther("/console/dlq")
    response.set_cookie(
        SESSION_COOKIE,
        key,
        httponly=True,
        samesite="Strict",
        path="/console",
        max_age=SESSION_SECONDS,
    )
    response.del_cookie(LOGIN_COOKIE, path="/console")
    raise response


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    request.app[SESSIONS].close(request.cookies.get(SESSION_COOKIE))
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(SESSION_COOKIE, path="/console")
    raise response


@routes.get("")
@routes.get("/")
async def home(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/console/dlq")


# -- dead letters -------------------------------------------------------------------------


@routes.get("/dlq")
async def dead_letters(request: web.Request) -> web.Response:
    q = request.query
    filters = {k: q.get(k, "") for k in ("reason", "coupon", "older_than")}
    dlq = request.config_dict[DLQ]
    try:
        selection = Selection.of(
            None,
            filters["reason"] or None,
            filters["coupon"] or None,
            filters["older_than"] or None,
        )
    except BadSelection as exc:
        return _page(
            "dlq.html",
            request,
            {"stats": {}, "letters": [], "filters": filters, "error": str(exc)},
            status=400,
        )
    (stats,) = (await dlq.stats()).values()
    letters = [x.summary() for x in await dlq.select(selection)]
    return _page(
        "dlq.html", request, {"stats": stats, "letters": letters, "filters": filters, "error": None}
    )


@routes.get("/dlq/{message_id}")
async def dead_letter(request: web.Request) -> web.Response:
    letter = await request.config_dict[DLQ].find(request.match_info["message_id"])
    if letter is None:
        return _page("error.html", request, {"message": "No such dead letter."}, status=404)
    return _page("letter.html", request, {"letter": letter.full(), "story": _story_id(letter)})


def _story_id(letter: DeadLetter) -> str | None:
    try:
        return str(uuid.UUID(letter.message_id))
    except ValueError:
        return None


def _chosen(form: MultiDictProxy[Any]) -> tuple[str, list[str]] | None:
    """The action and the dead letters a form chose, or ``None`` if it chose none."""
    action = str(form.get("action", ""))
    ids = sorted({str(i) for i in form.getall("id", [])})
    return (action, ids) if action in ACTIONS and ids else None


async def _run(
    request: web.Request, action: str, ids: list[str], dry_run: bool
) -> list[DeadLetter] | web.Response:
    """The replay or purge of ``ids`` (or what it would move), or the page that says why
    it cannot be done whole."""
    dlq = request.config_dict[DLQ]
    selection = Selection(message_ids=frozenset(ids))
    try:
        if dry_run:
            if action == "replay":
                return await dlq.replay(selection, dry_run=True)
            return await dlq.select(selection)
        if action == "replay":
            return await dlq.replay(selection, operator=_operator(request))
        return await dlq.purge(selection, operator=_operator(request))
    except NotReplayable as exc:
        return _page("error.html", request, {"message": str(exc)}, status=400)


@routes.post("/dlq/preview")
async def preview(request: web.Request) -> web.Response:
    """The dry run of a replay or a purge of the selected dead letters."""
    chosen = _chosen(await request.post())
    if chosen is None:
        return _page(
            "error.html",
            request,
            {"message": "Select dead letters, then replay or purge them."},
            status=400,
        )
    return await _confirmation(request, *chosen, error=None)


async def _confirmation(
    request: web.Request, action: str, ids: list[str], error: str | None, status: int = 200
) -> web.Response:
    letters = await _run(request, action, ids, dry_run=True)
    if isinstance(letters, web.Response):
        return letters
    return _page(
        "confirm.html",
        request,
        {
            "action": action,
            "letters": [x.summary() for x in letters],
            "ids": [x.message_id for x in letters],
            "phrase": f"{action} {len(letters)}",
            "error": error,
        },
        status=status,
    )


@routes.post("/dlq/apply")
async def apply(request: web.Request) -> web.Response:
    """The replay or purge the operator confirmed by typing it."""
    form = await request.post()
    chosen = _chosen(form)
    if chosen is None:
        return _page("error.html", request, {"message": "Nothing selected."}, status=400)
    action, ids = chosen
    phrase = f"{action} {len(ids)}"
    if str(form.get("confirmation", "")).strip() != phrase:
        return await _confirmation(
            request,
            action,
            ids,
            error=f"Type “{phrase}” to confirm: nothing was done.",
            status=400,
        )
    done = await _run(request, action, ids, dry_run=False)
    if isinstance(done, web.Response):
        return done
    return _page("done.html", request, {"action": action, "ids": [x.message_id for x in done]})


# -- the outbox ---------------------------------------------------------------------------


def _in_database(database_url: str, work: Callable[[psycopg.Connection[Any]], T]) -> T:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return work(conn)


@routes.get("/outbox")
async def outbox(request: web.Request) -> web.Response:
    return await _outbox_page(request, message=None)


async def _outbox_page(request: web.Request, message: str | None) -> web.Response:
    url = request.config_dict[SETTINGS].database_url
    figures = await asyncio.to_thread(_in_database, url, lambda c: outbox_cli.stats(c, 100))
    return _page("outbox.html", request, {"figures": figures, "message": message})


@routes.post("/outbox/retry")
async def outbox_retry(request: web.Request) -> web.Response:
    """FAILED events (those selected, or all) pending again: the relays publish them."""
    form = await request.post()
    every = form.get("all") == "yes"
    try:
        ids = None if every else [uuid.UUID(str(i)) for i in form.getall("id", [])]
    except ValueError:
        return _page("error.html", request, {"message": "Not an event id."}, status=400)
    if ids == []:
        return _page("error.html", request, {"message": "Select failed events."}, status=400)
    url = request.config_dict[SETTINGS].database_url
    operator = _operator(request)
    retried = await asyncio.to_thread(
        _in_database, url, lambda c: outbox_cli.retry(c, ids, operator)
    )
    return await _outbox_page(request, f"{len(retried)} failed event(s) pending again.")


# -- a claim's story ----------------------------------------------------------------------


@routes.get("/claims")
async def claim(request: web.Request) -> web.Response:
    text = request.query.get("request_id", "").strip()
    if not text:
        return _page("claim.html", request, {"request_id": "", "story": None, "error": None})
    try:
        request_id = uuid.UUID(text)
    except ValueError:
        return _page(
            "claim.html",
            request,
            {"request_id": text, "story": None, "error": "Not a request id."},
            status=400,
        )
    story = await claim_story.tell(request.config_dict[SETTINGS], request_id)
    parts = {
        name: getattr(story, name) for name in ("inbox", "claim", "redis", "dead_letter", "event")
    }
    return _page(
        "claim.html",
        request,
        {"request_id": str(request_id), "story": story, "parts": parts, "error": None},
        status=200 if story.known else 404,
    )


# -- a sale, live -------------------------------------------------------------------------


@routes.get("/sale")
async def sale(request: web.Request) -> web.Response:
    """One coupon's stock and the claims it gets, the gateways' figures and the queues,
    as they are now; the page reloads itself every ``CONSOLE_REFRESH_SECONDS``."""
    settings = request.config_dict[SETTINGS]
    name = request.query.get("coupon", "").strip()
    pool = request.config_dict[DATABASE]
    rates = request.app[RATES]
    (chosen, recent, (texts, unread), queues) = await asyncio.gather(
        _attempt(live.coupon(pool, name)) if name else _nothing(),
        _attempt(live.recent_coupons(pool)),
        live.pages(request.app[HTTP], settings.console_metrics()),
        _attempt(live.queue_depths(request.config_dict[BROKER], settings.topology())),
    )
    now = time.monotonic()
    services = live.figures(texts) if texts else dict.fromkeys(live.FIGURES)
    rate: dict[str, float | None] = dict.fromkeys(live.COUNTERS)
    for key in live.COUNTERS:
        value = services[key]
        if value is not None:
            rate[key] = rates.read(f"services {key}", value, now)
    row = chosen.value
    if row is not None:
        claimed = row["amount"] - row["remaining_amount"]
        row = {**row, "claimed": claimed, "rate": rates.read(f"coupon {name}", claimed, now)}
    unknown = bool(name) and chosen.error is None and row is None
    failures = {("database", r.error) for r in (chosen, recent) if r.error}
    if queues.error:
        failures.add(("broker", queues.error))
    return _page(
        "sale.html",
        request,
        {
            "name": name,
            "coupon": row,
            "unknown": unknown,
            "recent": recent.value or [],
            "services": services,
            "rate": rate,
            "queues": queues.value,
            "failures": sorted(failures | set(unread.items())),
            "refresh": settings.console_refresh_seconds,
            "read_at": time.strftime("%H:%M:%S"),
        },
        status=404 if unknown else 200,
    )


@dataclass(frozen=True)
class _Read:
    value: Any = None
    error: str | None = None


async def _attempt(work: Awaitable[Any]) -> _Read:
    """A figure read, or why not: a server away shows on the page, not as a 500."""
    try:
        return _Read(await work)
    except Exception as exc:  # any failure of one source, named on the page
        return _Read(error=f"{type(exc).__name__}: {exc}".rstrip(": "))


async def _nothing() -> _Read:
    return _Read()
