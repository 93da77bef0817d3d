"""Request ids for claims sent with an ``Idempotency-Key``.

A retried request must become the same command (the inbox then applies it at most
once), so its request id is derived from the key rather than drawn at random. Two rules
make that safe between clients (the IETF Idempotency-Key draft and Stripe work alike):

- **Scope.** A key belongs to the client that sent it: the id is derived from the key
  *and* the claim's ``user_id``. Two users who both send ``Idempotency-Key: order-1``
  make two unrelated claims.
- **Secrecy.** The id is an HMAC-SHA256 under a server-side secret
  (``FLASHCLAIM_IDEMPOTENCY_SECRET``), so nobody can compute another client's request
  id from a key they guessed, and read its answer at ``/api/claims/{id}``.

Within one scope, the same key with another coupon is a conflict (``422``), and the same
key with the same body gets the first request's answer: :class:`Claims` checks the
claim a key was first used for (the fingerprint) before anything is published.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from flashclaim.core.settings import IDEMPOTENCY_SECRET_MIN


def random_secret() -> str:
    """A secret good enough for :class:`RequestIds` (used when none is configured)."""
    return secrets.token_urlsafe(32)


class RequestIds:
    def __init__(self, secret: str) -> None:
        if len(secret) < IDEMPOTENCY_SECRET_MIN:
            raise ValueError(f"the idempotency secret needs {IDEMPOTENCY_SECRET_MIN}+ characters")
        self._key = secret.encode()

    def for_key(self, user_id: str, key: str) -> uuid.UUID:
        """The request id of ``user_id``'s claim sent with ``key``.

        The NUL separator cannot occur in a valid user id or key, so two different
        (user, key) pairs never feed the same bytes to the HMAC.
        """
        digest = hmac.new(
            self._key, b"claim\0" + user_id.encode() + b"\0" + key.encode(), hashlib.sha256
        ).digest()
        # An RFC 9562 version 8 ("custom") UUID carrying 122 bits of the HMAC.
        value = int.from_bytes(digest[:16], "big")
        value &= ~(0xF000 << 64) & ~(0xC000 << 48)
        value |= (8 << 76) | (0x8000 << 48)
        return uuid.UUID(int=value)

    @staticmethod
    def fresh() -> uuid.UUID:
        """The request id of a claim sent without a key."""
        return uuid.uuid4()
