"""Bearer tokens on the public API: who the caller is, and what it may do.

A token is a signed JWT (RFC 7519), checked with PyJWT against the keys of a JWKS
document (a file, or a URL: :class:`Keys`), or against a shared secret with HS256 for
development. What a token must be to be accepted, the invariants relied on:

- its algorithm is one the settings accept; the header only picks among them, ``none``
  is never among them, and a key signs only with algorithms of its own type (an RSA
  key never verifies an HS256 token made with the public key as its secret; a JWKS's
  symmetric keys are ignored);
- it is signed, unexpired and already valid (with ``AUTH_LEEWAY_SECONDS`` of clock
  skew), by the configured issuer, for the configured audience;
- it names its user in ``AUTH_USER_CLAIM`` (``sub``), a valid user id.

Anything else is :class:`Unauthenticated` (``401``), whatever the bytes sent; keys that
cannot be had at all are :class:`DependencyUnavailable` (``503``). What the user may do
is decided by the handlers with :func:`require_scope` and :func:`require_user`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from flashclaim.core.errors import (
    DependencyUnavailable,
    Forbidden,
    InvalidInput,
    Unauthenticated,
)
from flashclaim.core.messages import check_name
from flashclaim.core.settings import Settings, algorithm_list

log = logging.getLogger(__name__)

# The algorithms each type of key signs with (RFC 7518, RFC 8037).
_FAMILIES = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}
# Claims that list what the caller may do: OAuth's `scope` (a string) and the lists of
# common identity providers.
_SCOPE_CLAIMS = ("scope", "scp", "roles", "permissions")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: its user id and what its token allows."""

    user_id: str
    scopes: frozenset[str]


def require_scope(principal: Principal | None, scope: str) -> None:
    """:class:`Forbidden` unless the caller's token carries ``scope`` (no token checked
    at all when authentication is off: ``principal`` is then ``None``)."""
    if principal is not None and scope not in principal.scopes:
        raise Forbidden(f"this needs the {scope!r} scope", scope=scope)


def require_user(principal: Principal | None, user_id: object) -> str:
    """The claim's user: the token's when there is one (a body naming another user is
    :class:`Forbidden`), else the body's own ``user_id``."""
    if principal is None:
        return check_name(user_id, "user_id")
    if user_id is not None and user_id != principal.user_id:
        raise Forbidden("user_id is not the token's user")
    return principal.user_id


def bearer_token(headers: list[str]) -> str:
    """The token of the request's ``Authorization`` headers (RFC 6750: exactly one,
    ``Bearer <token>``)."""
    if not headers:
        raise Unauthenticated("no bearer token")
    if len(headers) > 1:
        raise Unauthenticated("more than one Authorization header")
    scheme, _, token = headers[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("Authorization is not a bearer token")
    return token


class Keys:
    """A JWKS document's signing keys, kept in memory.

    Loaded at the first token; loaded again when a token names a key not held (a key
    rotated in) and once they are older than ``ttl`` (a key removed is then refused),
    never more often than every ``min_interval`` seconds, one load at a time. When a
    load fails, the keys held keep working; with none held, tokens get ``503``.
    """

    def __init__(
        self,
        load: Callable[[], Awaitable[bytes]],
        algorithms: tuple[str, ...],
        ttl: float,
        min_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._algorithms = algorithms
        self._ttl = ttl
        self._min_interval = min_interval
        self._clock = clock
        self._keys: list[_Key] | None = None
        self._loaded_at = 0.0
        self._tried_at: float | None = None
        self._attempts = 0
        self._lock = asyncio.Lock()

    async def find(self, kid: str | None) -> tuple[Any, tuple[str, ...]]:
        """The key a token's ``kid`` names, and the algorithms it may sign with."""
        if self._keys is None or self._clock() - self._loaded_at >= self._ttl:
            await self._refresh()
        found = self._pick(kid)
        if found is None:
            await self._refresh()
            found = self._pick(kid)
        if found is None:
            if self._keys is None:
                raise DependencyUnavailable("signing keys", "the JWKS cannot be read")
            raise Unauthenticated("unknown signing key")
        return found

    def _pick(self, kid: str | None) -> tuple[Any, tuple[str, ...]] | None:
        keys = self._keys or []
        if kid is None and len(keys) != 1:
            return None  # several keys: a token must say which
        for key in keys:
            if kid is None or key.kid == kid:
                return key.key, key.algorithms
        return None

    async def _refresh(self) -> None:
        attempts = self._attempts
        async with self._lock:
            if self._attempts != attempts:
                return  # another request loaded them while this one waited
            if self._tried_at is not None and self._clock() - self._tried_at < self._min_interval:
                return  # tried too recently
            self._attempts += 1
            self._tried_at = self._clock()
            try:
                keys = self._usable(orjson.loads(await self._load()))
            except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # ValueError: not JSON, or no usable key in it.
                log.warning(
                    "signing keys not loaded",
                    extra={"error": f"{type(exc).__name__}: {exc}", "kept": len(self._keys or [])},
                )
                return
            self._keys, self._loaded_at = keys, self._clock()

    def _usable(self, document: object) -> list[_Key]:
        """The signing keys of a JWKS document that may sign with an accepted algorithm
        (RSA, EC and OKP keys: a symmetric key has no place in a public document)."""
        entries = document.get("keys") if isinstance(document, dict) else None
        import jwt  # PyJWT and cryptography: some 9 MB a process, loaded with tokens on

        keys = []
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or entry.get("kty") not in _FAMILIES:
                continue
            if entry.get("use", "sig") != "sig":
                continue
            try:
                jwk = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a curve or a parameter this library cannot use
            algorithms = self._signs_with(entry, jwk.algorithm_name)
            if algorithms:
                keys.append(_Key(entry.get("kid"), jwk.key, algorithms))
        if not keys:
            raise ValueError("the JWKS has no signing key for the accepted algorithms")
        return keys

    def _signs_with(self, entry: dict[str, Any], inferred: str) -> tuple[str, ...]:
        """The accepted algorithms a key may sign with: its declared ``alg``; else those
        of its type (for an EC key, its curve's one)."""
        if entry.get("alg") or entry["kty"] == "EC":
            return (inferred,) if inferred in self._algorithms else ()
        return tuple(a for a in self._algorithms if a.startswith(_FAMILIES[entry["kty"]]))


@dataclass(frozen=True, slots=True)
class _Key:
    kid: object
    key: Any
    algorithms: tuple[str, ...]


def jwks_loader(source: str, timeout: float = 3.0) -> Callable[[], Awaitable[bytes]]:
    """How to read ``AUTH_JWKS``: GET the URL, or read the file."""
    if source.startswith(("http://", "https://")):

        async def fetch() -> bytes:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
                http.get(source, headers={"Accept": "application/json"}) as response,
            ):
                if response.status != 200:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status
                    )
                return await response.read()

        return fetch
    path = Path(source.removeprefix("file://"))

    async def read() -> bytes:
        return await asyncio.to_thread(path.read_bytes)

    return read


class Authenticator:
    """Turns a request's bearer token into its :class:`Principal`."""

    def __init__(
        self,
        keys: Keys | None,
        secret: str,
        algorithms: tuple[str, ...],
        issuer: str,
        audience: str,
        leeway: float,
        user_claim: str,
    ) -> None:
        self._keys = keys
        self._secret = secret
        self._accepted = set(algorithms) | ({"HS256"} if secret else set())
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._user_claim = user_claim

    @classmethod
    def of(cls, settings: Settings) -> Authenticator | None:
        """From the settings; ``None`` when authentication is off."""
        if not settings.auth_enabled:
            return None
        algorithms = algorithm_list(settings.auth_algorithms)
        keys = (
            Keys(
                jwks_loader(settings.auth_jwks),
                algorithms,
                settings.auth_jwks_ttl_seconds,
                settings.auth_jwks_refresh_seconds,
            )
            if settings.auth_jwks
            else None
        )
        return cls(
            keys,
            settings.auth_hs256_secret.get_secret_value(),
            algorithms if keys else (),
            settings.auth_issuer,
            settings.auth_audience,
            settings.auth_leeway_seconds,
            settings.auth_user_claim,
        )

    async def principal(self, token: str) -> Principal:
        import jwt  # loaded only with tokens on (Keys._usable)

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._accepted:
            raise Unauthenticated("token algorithm not accepted")
        if alg == "HS256":
            key: Any = self._secret
        else:
            assert self._keys is not None  # only HS256 is accepted without a JWKS
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise Unauthenticated("malformed token")
            key, signs_with = await self._keys.find(kid)
            if alg not in signs_with:
                raise Unauthenticated("token algorithm not accepted for its key")
        claims = self._decode(token, key, alg)
        try:
            user_id = check_name(claims.get(self._user_claim), "user")
        except InvalidInput:
            raise Unauthenticated(f"token's {self._user_claim!r} is not a user id") from None
        return Principal(user_id, _scopes(claims))

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        import jwt

        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", self._user_claim]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token issuer not accepted") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token audience not accepted") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token has no {exc.claim!r} claim") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            # A key of the wrong shape for the bytes given (InvalidKeyError), bad JSON...
            raise Unauthenticated("invalid token") from None


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    found: set[str] = set()
    for name in _SCOPE_CLAIMS:
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return frozenset(found)
