"""Bearer tokens (gateway/auth.py): every way a token is refused, the keys' life cycle,
and who may do what. The JWKS is served from memory; the gateway tests use HTTP."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from flashclaim.core.errors import DependencyUnavailable, Forbidden, Unauthenticated
from flashclaim.core.settings import Settings
from flashclaim.devtools.tokens import Signer, jwks, new_private_key
from gateway.auth import Authenticator, Keys, Principal, bearer_token, require_scope, require_user

ISSUER, AUDIENCE = "https://id.example", "flashclaim"
SECRET = "d" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Document:
    """A JWKS served from memory, counting its loads; ``down`` makes them fail."""

    def __init__(self, *keys: tuple[Any, str]) -> None:
        self.keys = list(keys)
        self.loads = 0
        self.down = False

    async def __call__(self) -> bytes:
        self.loads += 1
        if self.down:
            raise OSError("connection refused")
        return json.dumps(jwks(self.keys)).encode()


def authenticator(
    document: Document,
    clock: Clock | None = None,
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA"),
    secret: str = "",
) -> Authenticator:
    keys = Keys(document, algorithms, ttl=60, min_interval=5, clock=clock or Clock())
    return Authenticator(keys, secret, algorithms, ISSUER, AUDIENCE, 30, "sub")


def signer(alg: str = "EdDSA", kid: str = "k1") -> Signer:
    return Signer(new_private_key(alg), alg, kid, ISSUER, AUDIENCE)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
async def test_a_signed_token_names_its_user_and_scopes(alg: str) -> None:
    s = signer(alg)
    auth = authenticator(Document((s.key, "k1")))
    token = s.token("alice", ["coupons:write"], roles=["merchant"])
    assert await auth.principal(token) == Principal(
        "alice", frozenset({"coupons:write", "merchant"})
    )


def _b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(Unauthenticated) as exc:
        await auth.principal(token)
    return str(exc.value)


async def test_each_bad_token_is_refused_for_its_reason() -> None:
    s = signer()
    other = signer(kid="k1")  # same kid, another key: a forged signature
    auth = authenticator(Document((s.key, "k1")))
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": now + 60}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    cases = [
        ("malformed token", "not-a-token"),
        # A header whose alg is no string (a list cannot be looked up in a set).
        ("token algorithm not accepted", f"{_b64({'alg': []})}.{_b64(claims)}."),
        ("token signature does not verify", other.token("alice")),
        ("token algorithm not accepted", unsigned),
        ("token expired", s.token("alice", ttl=-60)),
        ("token not yet valid", s.token("alice", nbf=now + 600)),
        ("token issuer not accepted", s.token("alice", iss="https://evil.example")),
        ("token audience not accepted", s.token("alice", aud="another-api")),
        ("unknown signing key", signer(kid="k9").token("alice")),
        (
            "token has no 'exp' claim",
            jwt.encode(
                {k: v for k, v in claims.items() if k != "exp"}, s.key, "EdDSA", {"kid": "k1"}
            ),
        ),
        ("token's 'sub' is not a user id", s.token("alice", sub="\n")),
    ]
    for reason, token in cases:
        assert await refused(auth, token) == reason, reason
    # Within the leeway, a token just expired or about to be valid still passes.
    assert (await auth.principal(s.token("alice", ttl=-10))).user_id == "alice"
    assert (await auth.principal(s.token("alice", nbf=now + 10))).user_id == "alice"


async def test_the_algorithm_is_the_settings_choice_not_the_tokens() -> None:
    rsa = signer("RS256", kid="r1")
    document = Document((rsa.key, "r1"))
    # HS256 signed with the RSA public key as the secret (the classic confusion): the
    # key verifies RSA only, and HS256 is not accepted without a shared secret at all.
    public = rsa.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = _forge_hs256(public, {"kid": "r1"})
    assert await refused(authenticator(document), forged) == "token algorithm not accepted"
    # An RSA key never verifies another algorithm family, even one that is accepted.
    with_secret = authenticator(document, secret=SECRET)
    assert await refused(with_secret, forged) == "token signature does not verify"
    es = signer("ES256", kid="r1")
    assert await refused(authenticator(document), es.token("bob")) in (
        "token algorithm not accepted for its key",
    )
    # RS256 not among the accepted: an RSA token is refused though its key is known.
    only_eddsa = authenticator(document, algorithms=("EdDSA",))
    assert await refused(only_eddsa, rsa.token("bob")) == "token algorithm not accepted"


def _forge_hs256(secret: bytes, header: dict[str, Any]) -> str:
    import hashlib
    import hmac

    now = int(time.time())
    signing_input = (
        f"{_b64({'alg': 'HS256', 'typ': 'JWT', **header})}."
        f"{_b64({'iss': ISSUER, 'aud': AUDIENCE, 'sub': 'mallory', 'exp': now + 60})}"
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


async def test_a_shared_secret_signs_hs256_for_development() -> None:
    auth = Authenticator(None, SECRET, (), ISSUER, AUDIENCE, 30, "sub")
    dev = Signer(SECRET, "HS256", None, ISSUER, AUDIENCE)
    assert (await auth.principal(dev.token("carol"))).user_id == "carol"
    wrong = Signer("e" * 32, "HS256", None, ISSUER, AUDIENCE)
    assert await refused(auth, wrong.token("carol")) == "token signature does not verify"
    assert await refused(auth, signer().token("carol")) == "token algorithm not accepted"


async def test_a_rotated_key_is_picked_up_and_a_removed_one_refused() -> None:
    old, new = signer(kid="old"), signer(kid="new")
    document, clock = Document((old.key, "old")), Clock()
    auth = authenticator(document, clock)
    assert (await auth.principal(old.token("a"))).user_id == "a"
    assert document.loads == 1
    # A token naming a key not held: the document is loaded again at once...
    document.keys.append((new.key, "new"))
    clock.now += 6
    assert (await auth.principal(new.token("a"))).user_id == "a"
    assert document.loads == 2
    # ... but not more often than every min_interval, whatever kids tokens invent.
    for i in range(20):
        assert await refused(auth, signer(kid=f"bot{i}").token("a")) == "unknown signing key"
    assert document.loads == 2
    # A key removed from the document is refused once the keys held are older than ttl.
    document.keys = [(new.key, "new")]
    assert (await auth.principal(old.token("a"))).user_id == "a"  # still held
    clock.now += 61
    assert await refused(auth, old.token("a")) == "unknown signing key"
    assert document.loads == 3


async def test_keys_held_outlive_an_outage_and_none_held_is_503() -> None:
    key = signer()
    document, clock = Document((key.key, "k1")), Clock()
    auth = authenticator(document, clock)
    assert (await auth.principal(key.token("a"))).user_id == "a"
    document.down = True
    clock.now += 120  # stale: a load is tried, fails, and the keys held still verify
    assert (await auth.principal(key.token("a"))).user_id == "a"
    assert document.loads == 2
    cold = authenticator(Document((key.key, "k1")))
    cold._keys._load = document  # type: ignore[union-attr]  # the same outage
    with pytest.raises(DependencyUnavailable):
        await cold.principal(key.token("a"))


async def test_a_document_without_usable_keys_is_no_keys() -> None:
    auth = Authenticator(
        Keys(
            _static({"keys": [{"kty": "oct", "k": _b64(b"x" * 32), "kid": "k1"}]}),
            ("RS256",),
            60,
            5,
        ),
        "",
        ("RS256",),
        ISSUER,
        AUDIENCE,
        30,
        "sub",
    )
    # A symmetric key in a public document is never used (it would let anyone sign).
    token = jwt.encode({"sub": "a"}, b"x" * 32, "HS256", {"kid": "k1"})
    assert await refused(auth, token) == "token algorithm not accepted"
    with pytest.raises(DependencyUnavailable):
        await auth.principal(signer("RS256", kid="k1").token("a"))


def _static(document: dict[str, Any]) -> Any:
    async def load() -> bytes:
        return json.dumps(document).encode()

    return load


def test_the_authorization_header_holds_one_bearer_token() -> None:
    assert bearer_token(["Bearer abc"]) == "abc"
    assert bearer_token(["bearer  abc "]) == "abc"
    for headers in ([], ["Basic abc"], ["Bearer"], ["Bearer "], ["Bearer a", "Bearer b"]):
        with pytest.raises(Unauthenticated):
            bearer_token(headers)


def test_the_user_is_the_tokens_and_a_scope_is_needed_to_create() -> None:
    alice = Principal("alice", frozenset({"coupons:write"}))
    assert require_user(alice, None) == "alice"
    assert require_user(alice, "alice") == "alice"
    with pytest.raises(Forbidden):
        require_user(alice, "bob")
    assert require_user(None, "bob") == "bob"  # authentication off: the body's
    require_scope(alice, "coupons:write")
    with pytest.raises(Forbidden) as refused_scope:
        require_scope(Principal("bob", frozenset()), "coupons:write")
    assert refused_scope.value.scope == "coupons:write"
    require_scope(None, "coupons:write")


def test_authentication_needs_an_issuer_and_an_audience() -> None:
    from flashclaim.core.errors import ConfigError

    with pytest.raises(ConfigError, match="AUTH_ISSUER and FLASHCLAIM_AUTH_AUDIENCE"):
        Settings.checked({"auth_jwks": "/etc/jwks.json"})
    with pytest.raises(ConfigError, match="AUTH_ALGORITHMS"):
        Settings.checked({"auth_algorithms": "HS256"})
    with pytest.raises(ConfigError, match=r"AUTH_HS256_SECRET=\(hidden\)|at least 32"):
        Settings.checked({"auth_hs256_secret": "short", "auth_issuer": "i", "auth_audience": "a"})
    on = Settings.checked({"auth_jwks": "/etc/jwks.json", "auth_issuer": "i", "auth_audience": "a"})
    assert on.auth_enabled and not Settings.checked({}).auth_enabled
