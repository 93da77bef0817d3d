"""Typed settings, read once from ``FLASHCLAIM_*`` environment variables."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from flashclaim.core.errors import ConfigError

if TYPE_CHECKING:
    from flashclaim.core.topology import Topology

PREFIX = "FLASHCLAIM_"
ADMIN_TOKEN_MIN_LENGTH = 32
IDEMPOTENCY_SECRET_MIN = 32
# Settings where an empty value is a choice (turn the feature off), not "use the default".
_EMPTY_MEANS_OFF = frozenset({"amqp_management_url"})


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a flashclaim process can be configured with.

    Each field ``name`` is read from ``FLASHCLAIM_<NAME>``; the defaults match the local
    stack that ``make run`` starts.
    """

    database_url: str = "postgresql://flashclaim@127.0.0.1:55432/flashclaim"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:55672/"
    # RabbitMQ's management HTTP API, through which consumers set the queues' policies
    # (delivery limit, dead-lettering) at start; credentials default to the AMQP URL's.
    # Empty: the operator sets them (see flashclaim/core/policies.py).
    amqp_management_url: str = "http://127.0.0.1:55673/"
    redis_url: str = "redis://127.0.0.1:56379/0"
    # Prefix of every exchange, queue and Redis key, so that several deployments (or
    # test runs) can share one broker and one Redis.
    namespace: str = "flashclaim"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # The operators' dead-letter API (/admin/dlq) is served only when a token (at least
    # ADMIN_TOKEN_MIN_LENGTH characters) is set, on its own address: loopback unless
    # told otherwise, whatever HTTP_HOST is.
    admin_token: str = ""
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    # Key of the HMAC that turns an Idempotency-Key into a request id (at least 32
    # characters; every gateway of a deployment needs the same one). Unset: each
    # gateway supervisor draws one at start, so retries are recognised by the gateway
    # processes it runs, until it restarts.
    idempotency_secret: str = ""
    # Gateway processes sharing the port (SO_REUSEPORT); each has its own reply channel.
    gateway_workers: int = 1
    # How long a claim request waits for its result before answering 202.
    claim_wait_seconds: float = 5.0
    # How long results stay in Redis for GET /api/claims/{id} and Idempotency-Key replays
    # (PostgreSQL's inbox keeps them for good).
    result_ttl_seconds: int = 86_400
    # How long an answer the gateway gave without a round trip (409 for a holder, 400
    # for a sold-out coupon) stays readable at /api/claims/{id}. Such answers can come
    # at HTTP speed after a sell-out, so they are kept briefly (bounds Redis memory).
    fast_answer_ttl_seconds: int = 600
    max_body_bytes: int = 65_536
    # How long the gateway waits for the broker to confirm a claim before answering 503.
    publish_timeout_seconds: float = 5.0
    db_pool_min_size: int = 1
    db_pool_max_size: int = 10
    consumer_prefetch: int = 1000
    # Command queues; a coupon's claims always go to the same one. Changing it moves
    # coupons between queues: drain the queues first.
    partitions: int = 4
    # Consumers share the partitions: consumer i of n takes partitions p with
    # p % n == i at once, and the others after STANDBY_DELAY_SECONDS, as a stand-by
    # that the broker switches to if their consumer goes away.
    consumer_count: int = 1
    consumer_index: int = 0
    standby_delay_seconds: float = 2.0
    batch_size: int = 200
    batch_linger_ms: float = 1.0
    # Failed attempts (counted by the broker's x-delivery-count) after which a command
    # is marked FAILED in the inbox and dead-lettered with its error.
    max_attempts: int = 3
    # The broker's own bound on redeliveries (a backstop for consumers that crash before
    # they can count): it dead-letters with x-death reason "delivery_limit".
    delivery_limit: int = 5
    # Claims one gateway process holds at once; beyond that it answers 503 at once.
    max_in_flight_claims: int = 10_000
    # Per-client token bucket in Redis (client = remote address); 0 turns it off.
    rate_limit_per_second: float = 0.0
    rate_limit_burst: int = 0
    # Broker circuit breaker: consecutive failed publishes that open it, and how long
    # it stays open (answering 503 at once) before a publish is tried again.
    breaker_failure_threshold: int = 5
    breaker_recovery_seconds: float = 2.0
    # Seconds a stopping consumer or gateway gets to finish what it has in hand.
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    instance_id: str = field(default_factory=_default_instance_id)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``), failing clearly."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or (raw == "" and f.name not in _EMPTY_MEANS_OFF):
                continue
            values[f.name] = _parse(f, raw)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def environ(self) -> dict[str, str]:
        """These settings as the variables a process reads them back from."""
        return environ(**{f.name: getattr(self, f.name) for f in fields(self)})

    def topology(self) -> Topology:
        from flashclaim.core.topology import Topology

        return Topology(self.namespace, self.delivery_limit, self.partitions)

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def validate(self) -> None:
        positive = (
            "http_port",
            "admin_port",
            "claim_wait_seconds",
            "result_ttl_seconds",
            "fast_answer_ttl_seconds",
            "max_body_bytes",
            "publish_timeout_seconds",
            "db_pool_min_size",
            "db_pool_max_size",
            "consumer_prefetch",
            "batch_size",
            "delivery_limit",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be greater than 0")
        if not 0 <= self.consumer_index < self.consumer_count:
            raise ConfigError(f"{PREFIX}CONSUMER_INDEX must be from 0 to CONSUMER_COUNT - 1")
        if self.delivery_limit < self.max_attempts:
            raise ConfigError(f"{PREFIX}DELIVERY_LIMIT must be at least {PREFIX}MAX_ATTEMPTS")
        if self.rate_limit_per_second < 0 or self.rate_limit_burst < 0:
            raise ConfigError("rate limits cannot be negative")
        if self.batch_linger_ms < 0 or self.shutdown_grace_seconds < 0:
            raise ConfigError("linger and grace periods cannot be negative")
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ConfigError(f"{PREFIX}DB_POOL_MIN_SIZE exceeds {PREFIX}DB_POOL_MAX_SIZE")
        if self.admin_token and len(self.admin_token) < ADMIN_TOKEN_MIN_LENGTH:
            raise ConfigError(
                f"{PREFIX}ADMIN_TOKEN must be at least {ADMIN_TOKEN_MIN_LENGTH} characters"
                " (e.g. `openssl rand -hex 32`)"
            )
        if self.idempotency_secret and len(self.idempotency_secret) < IDEMPOTENCY_SECRET_MIN:
            raise ConfigError(
                f"{PREFIX}IDEMPOTENCY_SECRET must be at least {IDEMPOTENCY_SECRET_MIN} characters"
            )
        if not self.namespace.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"{PREFIX}NAMESPACE may hold only letters, digits, '.', '-', '_'")


def environ(**values: object) -> dict[str, str]:
    """``FLASHCLAIM_*`` variables for settings given by field name (``http_port=8081``),
    read back by :meth:`Settings.from_env`; a name that is no setting is an error, and
    ``None`` leaves a setting out. The one place these variable names are spelled."""
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"no such setting: {', '.join(unknown)}")
    return {PREFIX + name.upper(): str(v) for name, v in values.items() if v is not None}


def _parse(f: dataclasses.Field[object], raw: str) -> object:
    kind = f.type
    name = PREFIX + f.name.upper()
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from None
    return raw
