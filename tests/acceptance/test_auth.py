"""Bearer tokens on a running gateway: the user is the token's, creating needs a scope,
keys come from a JWKS served over HTTP that rotates and goes away, and no token, however
made, gets a 5xx or a dropped connection."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashclaim.core.settings import Settings, environ
from flashclaim.devtools.tokens import Signer, jwks, new_private_key
from gateway.auth import Authenticator
from tests.acceptance.conftest import LOGS, Services, free_port, until_queued
from tests.acceptance.test_contract import until_answered
from tests.acceptance.test_fuzz import raw

ISSUER, AUDIENCE = "https://id.flashclaim.test", "flashclaim-api"
CLI = (sys.executable, "-m", "flashclaim.cli")
WRITE = "coupons:write"


class JwksServer:
    """A JWKS document served over HTTP from a thread (the tests' event loop may block
    in a synchronous client meanwhile); its keys can change, and it can go away."""

    def __init__(self) -> None:
        self.keys: list[tuple[Any, str]] = []
        self.port = free_port()
        self.hits = 0
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.hits += 1
                body = json.dumps(jwks(served.keys)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def signer(self, kid: str, alg: str = "EdDSA", publish: bool = True) -> Signer:
        signer = Signer(new_private_key(alg), alg, kid, ISSUER, AUDIENCE)
        if publish:
            self.keys.append((signer.key, kid))
        return signer

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def auth_settings(server: JwksServer, **more: Any) -> dict[str, Any]:
    return {
        "auth_jwks": server.url,
        "auth_issuer": ISSUER,
        "auth_audience": AUDIENCE,
        "auth_jwks_refresh_seconds": 0.2,
        **more,
    }


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kw: Any
) -> tuple[int, Any, Any]:
    headers = {**kw.pop("headers", {}), **(bearer(token) if token else {})}
    async with http.request(method, url, headers=headers, **kw) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json(), response.headers


async def test_the_tokens_user_claims_and_only_that_user_sees_the_answer(
    services: Services, jwks_server: JwksServer, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    key = jwks_server.signer("k1", "ES256")
    merchant, alice, bob = key.token("shop", [WRITE]), key.token("alice"), key.token("bob")
    services.start_consumer()
    await services.start_gateway(**auth_settings(jwks_server))
    api = services.base_url
    status, body, _ = await call(
        http, "POST", f"{api}/api/coupons", merchant, json={"name": coupon_name, "amount": 5}
    )
    assert status == 201, body
    # Without a token, nothing of the public API answers but 401, with its challenge.
    for method, path, payload in (
        ("GET", f"/api/coupons/{coupon_name}", None),
        ("POST", "/api/coupons/claim", {"user_id": "alice", "coupon_name": coupon_name}),
        ("POST", "/api/coupons", {"name": "X", "amount": 1}),
        ("GET", f"/api/claims/{uuid.uuid4()}", None),
    ):
        status, body, headers = await call(http, method, f"{api}{path}", json=payload)
        assert (status, body["code"]) == (401, "invalid_token"), (path, body)
        assert headers["WWW-Authenticate"].startswith('Bearer realm="flashclaim"')
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    # The body may name its user, or leave it to the token.
    claim = f"{api}/api/coupons/claim"
    status, mine, _ = await call(
        http, "POST", claim, alice, json={"user_id": "alice", "coupon_name": coupon_name}
    )
    assert (status, mine["user_id"]) == (200, "alice"), mine
    status, body, _ = await call(http, "POST", claim, bob, json={"coupon_name": coupon_name})
    assert (status, body["user_id"]) == (200, "bob"), body
    status, body, _ = await call(
        http, "POST", claim, alice, json={"user_id": "alice", "coupon_name": coupon_name}
    )
    assert (status, body["code"]) == (409, "already_claimed")
    # A claim's answer only to its own user: to anyone else it does not exist.
    answer = f"{api}/api/claims/{mine['request_id']}"
    status, body, _ = await call(http, "GET", answer, alice)
    assert (status, body) == (200, mine)
    status, body, _ = await call(http, "GET", answer, bob)
    assert (status, body["code"]) == (404, "claim_not_found")
    status, body, _ = await call(http, "GET", f"{api}/api/coupons/{coupon_name}", bob)
    assert (status, sorted(body["claimed_by"])) == (200, ["alice", "bob"])
    # The gateway names no software version, and no token reaches its log.
    async with http.get(f"{api}/healthz") as response:
        assert response.headers["Server"] == "flashclaim"
    # Nor does the answer of its HTTP parser to a request it cannot read.
    reader, writer = await asyncio.open_connection("127.0.0.1", services.port)
    writer.write(b"NOT AN HTTP REQUEST\r\n\r\n")
    raw_answer = await reader.read()
    writer.close()
    assert raw_answer.startswith(b"HTTP/1.0 400") and b"Server: flashclaim\r\n" in raw_answer
    assert b"aiohttp" not in raw_answer and b"Python" not in raw_answer
    logs = "".join(p.read_text() for p in LOGS.glob(f"{services.settings.namespace}-*.log"))
    assert '"user":"alice"' in logs  # access log lines name the token's user
    assert not any(t.split(".")[2] in logs for t in (merchant, alice, bob))


async def test_another_users_id_is_403_and_nothing_is_published(
    services: Services,
    jwks_server: JwksServer,
    http: aiohttp.ClientSession,
    settings: Settings,
    coupon_name: str,
) -> None:
    key = jwks_server.signer("k1")
    await services.start_gateway(**auth_settings(jwks_server), claim_wait_seconds=0.3)
    api = services.base_url
    status, _, _ = await call(
        http,
        "POST",
        f"{api}/api/coupons",
        key.token("shop", [WRITE]),
        json={"name": coupon_name, "amount": 5},
    )
    assert status == 201
    claim = f"{api}/api/coupons/claim"
    mallory = key.token("mallory")
    for user in ("alice", "", 42, "mallory "):
        status, body, _ = await call(
            http, "POST", claim, mallory, json={"user_id": user, "coupon_name": coupon_name}
        )
        assert (status, body["code"]) == (403, "forbidden"), (user, body)
    # No consumer runs: the one claim allowed waits in the queue, alone.
    status, body, _ = await call(
        http, "POST", claim, mallory, json={"user_id": "mallory", "coupon_name": coupon_name}
    )
    assert status == 202, body
    assert await until_queued(settings, 1) == 1
    services.start_consumer()
    await until_answered(http, f"{api}/api/claims/{body['request_id']}", headers=bearer(mallory))
    status, body, _ = await call(http, "GET", f"{api}/api/coupons/{coupon_name}", mallory)
    assert body["claimed_by"] == ["mallory"]


async def test_creating_a_coupon_needs_the_scope(
    services: Services, jwks_server: JwksServer, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    key = jwks_server.signer("k1", "RS256")
    await services.start_gateway(**auth_settings(jwks_server))
    api = services.base_url
    payload = {"name": coupon_name, "amount": 5}
    shopper = key.token("shopper", ["coupons:read"])
    status, body, headers = await call(http, "POST", f"{api}/api/coupons", shopper, json=payload)
    assert (status, body["code"]) == (403, "forbidden")
    assert 'error="insufficient_scope", scope="coupons:write"' in headers["WWW-Authenticate"]
    status, body, _ = await call(http, "GET", f"{api}/api/coupons/{coupon_name}", shopper)
    assert (status, body["code"]) == (404, "coupon_not_found")  # nothing was stored
    # The scope may come as a role, as some identity providers write it.
    merchant = key.token("merchant", roles=[WRITE])
    status, body, _ = await call(http, "POST", f"{api}/api/coupons", merchant, json=payload)
    assert status == 201, body


async def _until_status(
    http: aiohttp.ClientSession, url: str, token: str, wanted: int, timeout: float = 10
) -> None:
    async with asyncio.timeout(timeout):
        for _ in itertools.count():
            if (await call(http, "GET", url, token))[0] == wanted:
                return
            await asyncio.sleep(0.05)


async def test_a_rotated_key_is_picked_up_and_a_removed_one_refused(
    services: Services, jwks_server: JwksServer, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    old = jwks_server.signer("2026-old")
    new = jwks_server.signer("2026-new", "ES256", publish=False)
    await services.start_gateway(**auth_settings(jwks_server, auth_jwks_ttl_seconds=1))
    url = f"{services.base_url}/api/coupons/{coupon_name}"
    assert (await call(http, "GET", url, old.token("a")))[0] == 404  # known key: served
    status, body, _ = await call(http, "GET", url, new.token("a"))
    assert (status, body["error"]) == (401, "unknown signing key")
    # Published: a token naming it makes the gateway read the document again.
    jwks_server.keys.append((new.key, "2026-new"))
    await _until_status(http, url, new.token("a"), 404)
    # Retired: refused once the keys the gateway holds are older than their TTL.
    jwks_server.keys = [(new.key, "2026-new")]
    await _until_status(http, url, old.token("a"), 401)
    assert (await call(http, "GET", url, new.token("a")))[0] == 404


async def test_keys_held_outlive_the_jwks_and_without_any_claims_are_503(
    services: Services, jwks_server: JwksServer, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    key = jwks_server.signer("k1")
    await services.start_gateway(**auth_settings(jwks_server, auth_jwks_ttl_seconds=0.5))
    url = f"{services.base_url}/api/coupons/{coupon_name}"
    assert (await call(http, "GET", url, key.token("a")))[0] == 404
    jwks_server.stop()
    # The keys are stale and their document is gone: they keep verifying, and the
    # gateway says it could not load them again.
    log = LOGS.glob(f"{services.settings.namespace}-gateway-*.log")
    async with asyncio.timeout(10):
        while "signing keys not loaded" not in "".join(p.read_text() for p in log):
            assert (await call(http, "GET", url, key.token("a")))[0] == 404
            await asyncio.sleep(0.2)
            log = LOGS.glob(f"{services.settings.namespace}-gateway-*.log")
    assert (await call(http, "GET", url, key.token("a")))[0] == 404
    # A gateway that never had a key cannot tell a good token: 503, and it says why.
    cold = Services(services.settings)
    try:
        await cold.start_gateway(**auth_settings(jwks_server))
        status, body, headers = await call(
            http, "GET", f"{cold.base_url}/api/coupons/{coupon_name}", key.token("a")
        )
        assert (status, body["code"]) == (503, "service_unavailable"), body
        assert "signing keys" in body["error"] and "Retry-After" in headers
    finally:
        cold.stop()


async def test_rate_limits_are_per_user_not_per_address(
    services: Services, jwks_server: JwksServer, http: aiohttp.ClientSession, coupon_name: str
) -> None:
    key = jwks_server.signer("k1")
    await services.start_gateway(
        **auth_settings(jwks_server), rate_limit_per_second=0.5, rate_limit_burst=3
    )
    url = f"{services.base_url}/api/coupons/{coupon_name}"
    bot = [(await call(http, "GET", url, key.token("bot")))[0] for _ in range(6)]
    assert bot[:3] == [404, 404, 404] and set(bot[3:]) == {429}, bot
    # The same address, another user: a bucket of its own.
    other = [(await call(http, "GET", url, key.token("carol")))[0] for _ in range(3)]
    assert other == [404, 404, 404]
    # A bot changing tokens under one user id gains nothing.
    assert (await call(http, "GET", url, key.token("bot", ttl=60)))[0] == 429


# Tokens made to be wrong: random bytes, JWS-shaped strings with odd headers, and real
# signatures over odd claims.
_segment = st.binary(max_size=80).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode())


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    _containers,
    max_leaves=6,
)
_header = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["none", "HS256", "RS256", "ES256", "EdDSA", "", "ES512"]) | _json,
        "kid": st.sampled_from(["k1", "", "../../etc/passwd"]) | _json,
        "typ": _json,
        "crit": _json,
        "jku": st.just("http://127.0.0.1:1/jwks"),
    },
)


def _b64json(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _shaped(header: dict[str, Any], claims: object, signature: str) -> str:
    return f"{_b64json(header)}.{_b64json(claims)}.{signature}"


_tokens = st.one_of(
    st.text(max_size=300),
    st.builds(_shaped, _header, _json, _segment),
    st.builds(lambda a, b, c: f"{a}.{b}.{c}", _segment, _segment, _segment),
)
_header_values = st.one_of(
    _tokens.map(lambda t: f"Bearer {t}"),
    _tokens,
    st.binary(max_size=200),
    st.sampled_from(["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer\tx", "Bearer a b"]),
)


@pytest.fixture(scope="module")
async def fuzzed(stack: Any) -> AsyncIterator[tuple[Services, Signer]]:
    from tests.conftest import make_settings

    server = JwksServer()
    key = server.signer("k1")
    running = Services(make_settings(stack, f"m{uuid.uuid4().hex[:12]}"))
    await running.start_gateway(**auth_settings(server))
    yield running, key
    running.stop()
    server.stop()


def _header_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_header_values, claims=_json, path=st.sampled_from(["claim", "coupon", "answer"]))
def test_no_token_or_authorization_header_gets_a_5xx_or_a_dropped_connection(
    fuzzed: tuple[Services, Signer], value: str | bytes, claims: object, path: str
) -> None:
    gateway, key = fuzzed
    target = {
        "claim": ("POST", "/api/coupons/claim"),
        "coupon": ("GET", "/api/coupons/FUZZ"),
        "answer": ("GET", f"/api/claims/{uuid.uuid4()}"),
    }[path]
    body = json.dumps({"user_id": "u", "coupon_name": "FUZZ"}).encode()
    raw_value = _header_bytes(value).replace(b"\r", b"").replace(b"\n", b"")
    status, answer = raw(gateway.port, *target, body, {"Authorization": raw_value})
    assert status in (400, 401), answer  # 400: bytes no HTTP header may hold
    # Claims of any shape, validly signed: refused or served, never an error.
    payload = claims if isinstance(claims, dict) else {"sub": "u", "extra": claims}
    try:
        signed = jwt.encode(payload, key.key, key.alg, {"kid": "k1"})
    except (TypeError, ValueError, jwt.PyJWTError):
        return  # claims PyJWT will not sign
    status, answer = raw(
        gateway.port, *target, body, {"Authorization": f"Bearer {signed}".encode()}
    )
    assert status in (200, 202, 401, 404), answer


async def test_readme_example_token_is_made_from_a_local_key(tmp_path: Path) -> None:
    """`flashclaim token keys` and `token mint`, as the README runs them."""
    run = [sys.executable, "-m", "flashclaim.cli", "token"]
    made = await asyncio.to_thread(
        subprocess.run,
        [*run, "keys", "--dir", str(tmp_path), "--kid", "dev-1"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "jwks.json" in made.stdout and (tmp_path / "dev-1.pem").stat().st_mode & 0o077 == 0
    env = {"FLASHCLAIM_AUTH_ISSUER": ISSUER, "FLASHCLAIM_AUTH_AUDIENCE": AUDIENCE}
    minted = await asyncio.to_thread(
        subprocess.run,
        [*run, "mint", "--key", str(tmp_path / "dev-1.pem"), "--user", "alice"],
        check=True,
        capture_output=True,
        text=True,
        env={**env, "PATH": "/usr/bin:/bin"},
    )
    token = minted.stdout.strip()
    settings = Settings.checked(
        {"auth_jwks": str(tmp_path / "jwks.json"), "auth_issuer": ISSUER, "auth_audience": AUDIENCE}
    )
    auth = Authenticator.of(settings)
    assert auth is not None
    principal = await auth.principal(token)
    assert principal.user_id == "alice"


async def test_the_scenarios_and_a_load_test_sign_each_users_token(
    services: Services, tmp_path: Path
) -> None:
    """`flashclaim scenarios` and `flashclaim loadtest` against a gateway that checks
    tokens, with `--token-key`: every claim is its user's, every answer the contract's."""
    made = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "token", "keys", "--dir", str(tmp_path), "--kid", "load-1"],
        check=True,
        capture_output=True,
        text=True,
    )
    key = tmp_path / "load-1.pem"
    auth = {"auth_jwks": str(tmp_path / "jwks.json"), "auth_issuer": ISSUER}
    auth["auth_audience"] = AUDIENCE
    services.start_consumer()
    await services.start_gateway(**auth)
    env = {**os.environ, **environ(**auth)}
    common = ["--url", services.base_url, "--token-key", str(key)]
    runs = [
        ["scenarios", "--burst", "300"],
        ["loadtest", "mixed", "--rate", "300", "--duration", "2", "--quiet"],
    ]
    for command in runs:
        result = await asyncio.to_thread(
            subprocess.run,
            [*CLI, *command, *common],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, made.stdout + result.stdout + result.stderr
    # Without the key, the same run is refused at once: every request needs a token.
    result = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "scenarios", "--url", services.base_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "401" in result.stdout, result.stdout + result.stderr
