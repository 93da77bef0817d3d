"""Signing keys and bearer tokens for a gateway with authentication on, made locally.

``flashclaim token keys`` makes a key pair: the private key in ``<dir>/<kid>.pem`` (read
by its owner only) and its public half added to ``<dir>/jwks.json``, the document
``FLASHCLAIM_AUTH_JWKS`` names (run it again to rotate: the new key joins the old ones;
delete an entry from ``jwks.json`` to retire one). ``flashclaim token mint`` signs a
token with such a key (its ``kid`` is the file's name) or with ``AUTH_HS256_SECRET``.
In production an identity provider issues the tokens and publishes its JWKS; this is for
development, tests and load tests.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from flashclaim.core.errors import ConfigError
from flashclaim.core.settings import Settings

ALGORITHMS = ("EdDSA", "ES256", "RS256")
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_private_key(alg: str) -> PrivateKey:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65_537, key_size=2048)
    raise ConfigError(f"no such algorithm: {alg} (one of {', '.join(ALGORITHMS)})")


def algorithm_of(key: PrivateKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    return "RS256"


def public_jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    """The public half as a JWK, with its ``kid``, ``alg`` and ``use``."""
    alg = algorithm_of(key)
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk = json.loads(algorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def jwks(keys: Iterable[tuple[PrivateKey, str]]) -> dict[str, Any]:
    """A JWKS document of the public halves of ``(key, kid)``."""
    return {"keys": [public_jwk(key, kid) for key, kid in keys]}


def make_keys(directory: Path, alg: str, kid: str | None = None) -> Path:
    """A new key pair in ``directory``: its private key's path; its public half is
    added to ``directory/jwks.json`` (made if absent)."""
    kid = kid or f"{time.strftime('%Y%m%d')}-{uuid.uuid4().hex[:8]}"
    key = new_private_key(alg)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{kid}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem(key))
    document = directory / "jwks.json"
    keys = json.loads(document.read_text())["keys"] if document.exists() else []
    keys.append(public_jwk(key, kid))
    temporary = document.with_suffix(".tmp")
    temporary.write_text(json.dumps({"keys": keys}, indent=2) + "\n")
    temporary.replace(document)
    return path


@dataclass(frozen=True)
class Signer:
    """Signs tokens for a gateway's issuer and audience, with one key."""

    key: Any  # a private key, or the HS256 secret
    alg: str
    kid: str | None
    issuer: str
    audience: str

    @classmethod
    def from_file(cls, path: Path, issuer: str, audience: str) -> Signer:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, PrivateKey):
            raise ConfigError(f"{path}: not an Ed25519, EC or RSA private key")
        return cls(key, algorithm_of(key), path.stem, issuer, audience)

    @classmethod
    def from_settings(cls, settings: Settings, key_file: str | None = None) -> Signer:
        """With ``key_file``, else with the HS256 secret of ``settings``; for their
        issuer and audience."""
        issuer, audience = settings.auth_issuer, settings.auth_audience
        if key_file:
            return cls.from_file(Path(key_file), issuer, audience)
        secret = settings.auth_hs256_secret.get_secret_value()
        if not secret:
            raise ConfigError("give a key file (--key), or set FLASHCLAIM_AUTH_HS256_SECRET")
        return cls(secret, "HS256", None, issuer, audience)

    def token(
        self,
        user_id: str,
        scopes: Iterable[str] = (),
        ttl: float = 3600,
        user_claim: str = "sub",
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            user_claim: user_id,
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl),
            **({"scope": " ".join(scopes)} if scopes else {}),
            **claims,
        }
        headers = {"kid": self.kid} if self.kid else None
        return jwt.encode(payload, self.key, algorithm=self.alg, headers=headers)


class Credentials:
    """Bearer tokens for clients of a gateway with authentication on: each user's own
    (minted once, kept), and a merchant's that may create coupons."""

    def __init__(self, signer: Signer, create_scope: str = "coupons:write", ttl: float = 3600):
        self._signer = signer
        self._scope = create_scope
        self._ttl = ttl
        self._tokens: dict[str, str] = {}
        self._merchant: str | None = None

    def user(self, user_id: str) -> dict[str, str]:
        token = self._tokens.get(user_id)
        if token is None:
            token = self._tokens[user_id] = self._signer.token(user_id, ttl=self._ttl)
        return {"Authorization": f"Bearer {token}"}

    def merchant(self) -> dict[str, str]:
        if self._merchant is None:
            self._merchant = self._signer.token("merchant", [self._scope], ttl=self._ttl)
        return {"Authorization": f"Bearer {self._merchant}"}


def headers_of(credentials: Credentials | None, user_id: str | None = None) -> dict[str, str]:
    """The Authorization header a client sends (none when authentication is off): the
    user's, or the merchant's when no user is named."""
    if credentials is None:
        return {}
    return credentials.user(user_id) if user_id is not None else credentials.merchant()


def credentials_from(settings: Settings, key_file: str | None) -> Credentials | None:
    """Tokens signed with ``key_file`` (or the HS256 secret) for ``settings``' issuer
    and audience; ``None`` when neither is given (authentication off)."""
    if not key_file and not settings.auth_hs256_secret.get_secret_value():
        return None
    if not (settings.auth_issuer and settings.auth_audience):
        raise ConfigError("set FLASHCLAIM_AUTH_ISSUER and FLASHCLAIM_AUTH_AUDIENCE for tokens")
    return Credentials(Signer.from_settings(settings, key_file), settings.auth_create_scope)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="signing keys and bearer tokens for development")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("keys", help="make a key pair: <dir>/<kid>.pem, added to jwks.json")
    p.add_argument("--dir", required=True, help="where the keys and jwks.json are kept")
    p.add_argument("--alg", default="EdDSA", choices=ALGORITHMS)
    p.add_argument("--kid", help="the key's id (default: the date and a random suffix)")
    p.add_argument(
        "--if-absent",
        action="store_true",
        help="do nothing if <dir>/jwks.json exists (a container's first start makes them)",
    )
    p.set_defaults(func=_keys, service="token")
    p = actions.add_parser("mint", help="print a signed token for a user")
    p.add_argument("--key", help="a private key made by `token keys` (default: HS256 secret)")
    p.add_argument("--user", required=True, help="the token's user (its subject)")
    p.add_argument(
        "--scope", action="append", default=[], help="a scope it carries (repeat for several)"
    )
    p.add_argument("--ttl", type=float, default=3600, help="seconds it is valid (3600)")
    p.add_argument("--issuer", help="default: FLASHCLAIM_AUTH_ISSUER")
    p.add_argument("--audience", help="default: FLASHCLAIM_AUTH_AUDIENCE")
    p.set_defaults(func=_mint, service="token")


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    if args.if_absent and (Path(args.dir) / "jwks.json").exists():
        print(f"public keys  {Path(args.dir) / 'jwks.json'}  (kept)")
        return 0
    path = make_keys(Path(args.dir), args.alg, args.kid)
    print(f"private key  {path}")
    print(f"public keys  {path.parent / 'jwks.json'}  (FLASHCLAIM_AUTH_JWKS)")
    return 0


def _mint(settings: Settings, args: argparse.Namespace) -> int:
    signer = Signer.from_settings(settings, args.key)
    issuer = args.issuer or signer.issuer
    audience = args.audience or signer.audience
    if not (issuer and audience):
        raise ConfigError("give --issuer and --audience, or set FLASHCLAIM_AUTH_ISSUER/AUDIENCE")
    signer = Signer(signer.key, signer.alg, signer.kid, issuer, audience)
    print(signer.token(args.user, args.scope, args.ttl, settings.auth_user_claim))
    return 0
