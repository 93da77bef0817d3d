"""The project's exception root; driver errors are translated into these at the boundary."""

from __future__ import annotations


class FlashclaimError(Exception):
    """Root of every error flashclaim raises on purpose."""


class Stopping(FlashclaimError):
    """Shutdown was requested while waiting for a server to come back."""


class ConfigError(FlashclaimError):
    """A setting is missing or malformed."""


class InvalidInput(FlashclaimError):
    """A request or command does not follow the contract."""


class PoisonMessage(FlashclaimError):
    """A queued command that can never be applied (unparseable, unknown version...)."""


class DependencyUnavailable(FlashclaimError):
    """A server flashclaim needs (broker, database, Redis) cannot be reached now."""

    def __init__(self, service: str, detail: str = "", retry_after: int = 1) -> None:
        super().__init__(f"{service} is unavailable" + (f": {detail}" if detail else ""))
        self.service = service
        self.detail = detail
        self.retry_after = retry_after


class Overloaded(FlashclaimError):
    """This process already holds as much work as it is allowed to."""

    retry_after = 1


class RateLimited(FlashclaimError):
    """This client sent more requests than its rate allows."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many requests")
        self.retry_after = retry_after


class CouponExists(FlashclaimError):
    """A coupon with this name already exists."""


class CouponNotFound(FlashclaimError):
    """No coupon has this name."""


class IdempotencyKeyReused(FlashclaimError):
    """An Idempotency-Key was sent again with a different claim."""


class Unauthenticated(FlashclaimError):
    """The request carries no valid bearer token (missing, malformed, expired, ...)."""


class Forbidden(FlashclaimError):
    """The caller is known but may not do this (another user's claim, a missing scope).

    ``scope``: the scope that was missing, when that is the reason.
    """

    def __init__(self, message: str, scope: str | None = None) -> None:
        super().__init__(message)
        self.scope = scope
