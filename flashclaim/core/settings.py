"""Typed settings, read once from ``FLASHCLAIM_*`` environment variables.

pydantic checks them (types, ranges, the rules between them) and reports every bad
variable at once. They are read by :meth:`Settings.from_env` from any mapping, not
only ``os.environ``: the tools start services from settings they build (``environ``)
and the tests read a mapping of their own, which pydantic-settings' sources cannot take
without patching ``os.environ``; reading the prefixed names is the few lines below.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from flashclaim.core.errors import ConfigError
from flashclaim.core.hosts import split_hosts

if TYPE_CHECKING:
    from flashclaim.core.topology import Topology

PREFIX = "FLASHCLAIM_"
log = logging.getLogger(__name__)
ADMIN_TOKEN_MIN_LENGTH = 32
IDEMPOTENCY_SECRET_MIN = 32
AUTH_SECRET_MIN = 32
# Settings where an empty value is a choice (turn the feature off), not "use the default".
_EMPTY_MEANS_OFF = frozenset({"amqp_management_url"})

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(gt=0, le=65_535)]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
NonNegativeNumber = Annotated[float, Field(ge=0, allow_inf_nan=False)]
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]


def _hosts(url: str) -> str:
    """A URL naming one server or several (flashclaim/core/hosts.py)."""
    if url:
        split_hosts(url)  # ValueError: pydantic reports it against the variable
    return url


ProxyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(text: str) -> tuple[ProxyNetwork, ...]:
    """``TRUSTED_PROXIES``: addresses or networks, comma-separated (``10.0.0.0/8, ::1``)."""
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
    )


def url_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of URLs (``CONSOLE_METRICS_URLS``)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _http_urls(text: str) -> str:
    for url in url_list(text):
        try:
            parts = urlsplit(url)
            good = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 (ValueError when it is no port)
        except ValueError:
            good = False
        if not good:
            raise ValueError(f"not an http(s) URL: {url!r}")
    return text


def _proxies(text: str) -> str:
    proxy_networks(text)  # ValueError: pydantic reports it against the variable
    return text


# What a JWKS key may sign with: asymmetric algorithms only (HS256 takes the shared secret).
JWKS_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")


def algorithm_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _algorithms(text: str) -> str:
    unknown = [a for a in algorithm_list(text) if a not in JWKS_ALGORITHMS]
    if unknown or not algorithm_list(text):
        raise ValueError(f"accepted algorithms are some of {', '.join(JWKS_ALGORITHMS)}")
    return text


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# Variables of earlier releases, still read (with a warning) under their new names.
RENAMED = {PREFIX + "FAST_ANSWER_TTL_SECONDS": "gateway_answer_ttl_seconds"}


class Settings(BaseModel):
    """Everything a flashclaim process can be configured with.

    Each field ``name`` is read from ``FLASHCLAIM_<NAME>``; the defaults match the local
    stack that ``make run`` starts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    database_url: str = "postgresql://flashclaim@127.0.0.1:55432/flashclaim"
    # A cluster's nodes as one URL with several hosts, "amqp://u:p@h1:5672,h2:5672/":
    # each connection attempt tries them in turn (flashclaim/core/broker.py).
    amqp_url: Annotated[str, AfterValidator(_hosts)] = "amqp://guest:guest@127.0.0.1:55672/"
    # RabbitMQ's management HTTP API, through which consumers set the queues' policies
    # (delivery limit, dead-lettering) at start; credentials default to the AMQP URL's.
    # Several hosts are tried in turn, as for AMQP. Empty: the operator sets them (see
    # flashclaim/core/policies.py).
    amqp_management_url: Annotated[str, AfterValidator(_hosts)] = "http://127.0.0.1:55673/"
    redis_url: str = "redis://127.0.0.1:56379/0"
    # The Sentinels' password when REDIS_URL is a redis+sentinel:// URL whose user is not
    # the default one (an ACL user: Sentinels have a password only). Empty: the URL's.
    redis_sentinel_password: SecretStr = SecretStr("")
    # Prefix of every exchange, queue and Redis key, so that several deployments (or
    # test runs) can share one broker and one Redis.
    namespace: str = Field("flashclaim", pattern=r"^[A-Za-z0-9._-]+$")
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    # The operators' dead-letter API (/admin/dlq) is served only when a token (at least
    # ADMIN_TOKEN_MIN_LENGTH characters) is set, on its own address: loopback unless
    # told otherwise, whatever HTTP_HOST is.
    admin_token: SecretStr = SecretStr("")
    admin_host: str = "127.0.0.1"
    admin_port: Port = 8081
    # The /metrics pages the console's live view of a sale reads (comma-separated: every
    # gateway, and any consumer's or relay's METRICS_PORT); empty: the gateway of these
    # settings, at HTTP_HOST:HTTP_PORT.
    console_metrics_urls: Annotated[str, AfterValidator(_http_urls)] = ""
    # How often the live view refreshes itself, and the span its rates are taken over.
    console_refresh_seconds: Annotated[int, Field(ge=1, le=60)] = 2
    # Key of the HMAC that turns an Idempotency-Key into a request id (at least 32
    # characters; every gateway of a deployment needs the same one). Unset: each
    # gateway supervisor draws one at start, so retries are recognised by the gateway
    # processes it runs, until it restarts.
    idempotency_secret: SecretStr = SecretStr("")
    # Gateway processes sharing the port (SO_REUSEPORT); each has its own reply channel.
    gateway_workers: Positive = 1
    # How long a claim request waits for its result before answering 202.
    claim_wait_seconds: PositiveSeconds = 5.0
    # How long results stay in Redis for GET /api/claims/{id} and Idempotency-Key replays
    # (PostgreSQL's inbox keeps them for INBOX_RETENTION_SECONDS).
    result_ttl_seconds: Positive = 86_400
    # The deduplication window: how long a processed command stays in the inbox, to be
    # recognised if delivered again and answered at /api/claims/{id} (consumer/retention.py).
    # Longer than RESULT_TTL_SECONDS and GATEWAY_ANSWER_TTL_SECONDS; FAILED rows (their
    # commands wait in the dead-letter queue) stay whatever their age.
    inbox_retention_seconds: PositiveSeconds = 7 * 86_400.0
    # How often a consumer deletes processed rows past the window, and how many at most
    # in one statement (its own short transaction).
    inbox_prune_seconds: PositiveSeconds = 60.0
    inbox_prune_batch: Annotated[int, Field(gt=0, le=100_000)] = 5_000
    # How long an answer the gateway gave without a round trip (409 for a holder, 400
    # for a sold-out coupon) stays readable at /api/claims/{id}. Such answers can come
    # at HTTP speed after a sell-out, so they are kept briefly (bounds Redis memory).
    gateway_answer_ttl_seconds: Positive = 600
    max_body_bytes: Positive = 65_536
    # Claims of one coupon arriving together go in one message (gateway/coalescer.py):
    # a claim waits at most PUBLISH_LINGER_MS for others, and a message carries at most
    # PUBLISH_MAX_CLAIMS. 0 ms groups only what arrives in the same event-loop turn.
    publish_linger_ms: NonNegativeNumber = 3.0
    publish_max_claims: Annotated[int, Field(gt=0, le=10_000)] = 100
    # How long a claim is held back, at most, while the claims in flight could take all
    # of its coupon's stock (gateway/admission.py); 0 turns holding off.
    claim_hold_seconds: Seconds = 1.0
    # How long the gateway waits for the broker to confirm a claim before answering 503.
    publish_timeout_seconds: PositiveSeconds = 5.0
    db_pool_min_size: Positive = 1
    db_pool_max_size: Positive = 10
    consumer_prefetch: Positive = 1000
    # Command queues; a coupon's claims always go to the same one. Changing it moves
    # coupons between queues: drain the queues first.
    partitions: Positive = 4
    # Consumers share the partitions: consumer i of n takes partitions p with
    # p % n == i at once, and the others after STANDBY_DELAY_SECONDS, as a stand-by
    # that the broker switches to if their consumer goes away.
    consumer_count: Positive = 1
    # "auto": the lowest slot no running consumer holds (consumer/slots.py), for
    # consumers started as identical replicas.
    consumer_index: NonNegative | Literal["auto"] = 0
    standby_delay_seconds: Seconds = 2.0
    # What a command queue holds at most (message bodies, each partition): claims queued
    # while every consumer is away or far behind. Past it the broker refuses a publish
    # and the claim is answered 503 with Retry-After (a policy: changed at any time).
    # 64 MiB: some 400,000 claims a partition.
    command_queue_max_bytes: Positive = 64 * 1024 * 1024
    # Messages a consumer takes at once, and (about) the claims it applies in one
    # transaction: a message carrying more is applied in a transaction of its own.
    batch_size: Positive = 200
    batch_linger_ms: NonNegativeNumber = 2.0
    # Failed attempts (counted in the inbox: consumer/store.py; by the broker's
    # x-delivery-count only when the inbox cannot be written) after which a command is
    # marked FAILED in the inbox and dead-lettered with its error.
    max_attempts: Positive = 3
    # The broker's own bound on redeliveries (a backstop for consumers that crash before
    # they can count): it dead-letters with x-death reason "delivery_limit".
    delivery_limit: Positive = 5
    # Claims one gateway process holds at once; beyond that it answers 503 at once.
    max_in_flight_claims: Positive = 10_000
    # A claim is refused at once (503 overloaded, Retry-After), before its body is read,
    # while this gateway process has on their way as many claims as the results it got
    # in the last second times this (and at least 200): the claims let in wait about
    # this long, the crowd beyond capacity is refused (gateway/overload.py). Keep it well
    # below CLAIM_WAIT_SECONDS. Off (0) by default: queue-first under any crowd.
    overload_wait_seconds: Seconds = 0.0
    # Per-client token bucket in Redis (client = the remote address, or the one a trusted
    # proxy names); 0 turns it off.
    rate_limit_per_second: NonNegativeNumber = 0.0
    rate_limit_burst: NonNegative = 0
    # Bearer tokens on the public API (gateway/auth.py), on when AUTH_JWKS or
    # AUTH_HS256_SECRET is set. AUTH_JWKS: a JWKS document's path, or an http(s) URL
    # fetched and cached for AUTH_JWKS_TTL_SECONDS, fetched again when a token names a
    # key it lacks, never more often than every AUTH_JWKS_REFRESH_SECONDS.
    # AUTH_HS256_SECRET: a shared secret (HS256), for development only.
    auth_jwks: str = ""
    auth_hs256_secret: SecretStr = SecretStr("")
    # The algorithms a JWKS key may sign with (comma-separated); the token's header
    # only picks among them.
    auth_algorithms: Annotated[str, AfterValidator(_algorithms)] = "RS256,ES256,EdDSA"
    auth_issuer: str = ""
    auth_audience: str = ""
    auth_leeway_seconds: Annotated[float, Field(ge=0, le=300, allow_inf_nan=False)] = 30.0
    # The claim naming the user: a claim's user_id is its value.
    auth_user_claim: str = Field("sub", min_length=1)
    # The scope (or role) that creating a coupon needs.
    auth_create_scope: str = Field("coupons:write", min_length=1)
    auth_jwks_ttl_seconds: PositiveSeconds = 300.0
    auth_jwks_refresh_seconds: PositiveSeconds = 5.0
    # Proxies (an ingress, a load balancer) whose X-Forwarded-For names the client:
    # addresses or networks, comma-separated. Empty: the peer is the client.
    trusted_proxies: Annotated[str, AfterValidator(_proxies)] = ""
    # Broker circuit breaker: consecutive failed publishes that open it, and how long
    # it stays open (answering 503 at once) before a publish is tried again.
    breaker_failure_threshold: Positive = 5
    breaker_recovery_seconds: PositiveSeconds = 2.0
    # The outbox relay (relay/): events it publishes in one transaction; how often it
    # looks for work without a notification (a backstop: it wakes on LISTEN/NOTIFY),
    # and how long it lingers after one;
    # broker refusals after which a row is FAILED, and the backoff between them (doubling
    # from OUTBOX_RETRY_SECONDS up to OUTBOX_RETRY_MAX_SECONDS); how long SENT rows are
    # kept, and how often they are pruned.
    outbox_batch_size: Annotated[int, Field(gt=0, le=10_000)] = 500
    outbox_poll_seconds: PositiveSeconds = 2.0
    # How long a relay woken by a notification waits for more events before it takes
    # them: under load, fewer and larger transactions and messages (an event's delay
    # grows by it; README).
    outbox_linger_ms: NonNegativeNumber = 100.0
    # Events of one type that share an AMQP message (envelope 2, docs/EVENTS.md); 1
    # publishes each event alone (envelope 1) for subscribers that read only that.
    outbox_events_per_message: Annotated[int, Field(gt=0, le=1_000)] = 100
    outbox_max_attempts: Positive = 10
    outbox_retry_seconds: PositiveSeconds = 1.0
    outbox_retry_max_seconds: PositiveSeconds = 300.0
    outbox_retention_seconds: PositiveSeconds = 86_400.0
    outbox_prune_seconds: PositiveSeconds = 60.0
    # Seconds a stopping consumer or gateway gets to finish what it has in hand.
    shutdown_grace_seconds: Seconds = 10.0
    # Metrics (flashclaim/core/metrics.py): the gateway serves /metrics on its HTTP port,
    # the consumer and the relay on METRICS_HOST:METRICS_PORT (0: not served). Off, no
    # figure is counted at all.
    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65_535)] = 0
    log_level: LogLevel = "INFO"
    # JSON lines (json), or one readable line an event (text: time, level, service, event,
    # then the fields); auto: text on a terminal, JSON otherwise (a file, a collector).
    log_format: Literal["auto", "json", "text"] = "auto"
    instance_id: str = Field(default_factory=_default_instance_id, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if isinstance(self.consumer_index, int) and self.consumer_index >= self.consumer_count:
            raise ValueError(f"{PREFIX}CONSUMER_INDEX must be from 0 to CONSUMER_COUNT - 1")
        if self.delivery_limit < self.max_attempts:
            raise ValueError(f"{PREFIX}DELIVERY_LIMIT must be at least {PREFIX}MAX_ATTEMPTS")
        if self.outbox_retry_seconds > self.outbox_retry_max_seconds:
            raise ValueError(
                f"{PREFIX}OUTBOX_RETRY_SECONDS exceeds {PREFIX}OUTBOX_RETRY_MAX_SECONDS"
            )
        if self.inbox_retention_seconds <= max(
            self.result_ttl_seconds, self.gateway_answer_ttl_seconds
        ):
            raise ValueError(
                f"{PREFIX}INBOX_RETENTION_SECONDS must exceed {PREFIX}RESULT_TTL_SECONDS and"
                f" {PREFIX}GATEWAY_ANSWER_TTL_SECONDS: a retry must find its answer in"
                " Redis or the inbox for as long as either keeps it"
            )
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError(f"{PREFIX}DB_POOL_MIN_SIZE exceeds {PREFIX}DB_POOL_MAX_SIZE")
        token = self.admin_token.get_secret_value()
        if token and len(token) < ADMIN_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"{PREFIX}ADMIN_TOKEN must be at least {ADMIN_TOKEN_MIN_LENGTH} characters"
                " (e.g. `openssl rand -hex 32`)"
            )
        hs256 = self.auth_hs256_secret.get_secret_value()
        if hs256 and len(hs256) < AUTH_SECRET_MIN:
            raise ValueError(
                f"{PREFIX}AUTH_HS256_SECRET must be at least {AUTH_SECRET_MIN} characters"
            )
        if self.auth_enabled and not (self.auth_issuer and self.auth_audience):
            raise ValueError(
                f"{PREFIX}AUTH_ISSUER and {PREFIX}AUTH_AUDIENCE are needed with bearer tokens"
            )
        secret = self.idempotency_secret.get_secret_value()
        if secret and len(secret) < IDEMPOTENCY_SECRET_MIN:
            raise ValueError(
                f"{PREFIX}IDEMPOTENCY_SECRET must be at least {IDEMPOTENCY_SECRET_MIN} characters"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_jwks or self.auth_hs256_secret.get_secret_value())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``); a :class:`ConfigError`
        naming every bad variable if any is."""
        env = os.environ if environ is None else environ
        for old, new in RENAMED.items():
            if old in env and variable(new) not in env:
                log.warning(f"{old} is now {variable(new)}: read as such; rename it")
                env = {**env, variable(new): env[old]}
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(PREFIX + name.upper())
            path = env.get(PREFIX + name.upper() + "_FILE")
            if path:
                raw = _from_file(name, path, raw)
            if raw is None or (raw == "" and name not in _EMPTY_MEANS_OFF):
                continue
            values[name] = raw
        return cls.checked(values)

    @classmethod
    def checked(cls, values: Mapping[str, object]) -> Settings:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(_explain(exc)) from None

    def replace(self, **changes: object) -> Settings:
        """A copy with ``changes`` (field names), checked like any settings."""
        return self.checked({**self.values(), **changes})

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def environ(self) -> dict[str, str]:
        """These settings as the variables a process reads them back from."""
        return environ(**self.values())

    def console_metrics(self) -> tuple[str, ...]:
        """The /metrics pages of the live view (``CONSOLE_METRICS_URLS``, or the gateway
        at ``HTTP_HOST:HTTP_PORT``, reached on loopback when it binds every address)."""
        listed = url_list(self.console_metrics_urls)
        if listed:
            return listed
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
            self.http_host, self.http_host
        )
        if ":" in host:
            host = f"[{host}]"
        return (f"http://{host}:{self.http_port}/metrics",)

    def topology(self) -> Topology:
        from flashclaim.core.topology import Topology

        return Topology(
            self.namespace, self.delivery_limit, self.partitions, self.command_queue_max_bytes
        )


def without_password(url: str) -> str:
    """``url`` with the password of its credentials shown as ``***``."""
    return re.sub(r"(://[^/?#@:]*:)[^/?#]*@", r"\1***@", url)


def _from_file(name: str, path: str, value: str | None) -> str:
    """``FLASHCLAIM_<NAME>_FILE``: the setting is the file's content (a secret mounted by
    Docker or Kubernetes), without its final line break."""
    variable = PREFIX + name.upper()
    if value is not None:
        raise ConfigError(f"{variable} and {variable}_FILE are both set: set one")
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{variable}_FILE={path!r}: {exc.__class__.__name__}") from None


def _explain(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:  # a rule between settings
            problems.append(message)
            continue
        name = str(error["loc"][0])
        secret = name in Settings.model_fields and (
            Settings.model_fields[name].annotation is SecretStr
        )
        shown = "(hidden)" if secret else repr(error["input"])
        if name.endswith("_url"):  # the password of a URL is not shown either
            shown = without_password(shown)
        if error["type"] == "extra_forbidden":
            problems.append(f"no such setting: {name}")
        else:
            problems.append(f"{PREFIX}{name.upper()}={shown}: {message}")
    return "; ".join(problems)


def variable(name: str) -> str:
    """The environment variable of the setting ``name`` (``http_port`` ->
    ``FLASHCLAIM_HTTP_PORT``); a name that is no setting is an error."""
    if name not in Settings.model_fields:
        raise TypeError(f"no such setting: {name}")
    return PREFIX + name.upper()


def environ(**values: object) -> dict[str, str]:
    """``FLASHCLAIM_*`` variables for settings given by field name (``http_port=8081``),
    read back by :meth:`Settings.from_env`; a name that is no setting is an error, and
    ``None`` leaves a setting out. The one place these variable names are spelled."""
    unknown = sorted(set(values) - set(Settings.model_fields))
    if unknown:
        raise TypeError(f"no such setting: {', '.join(unknown)}")
    return {
        variable(name): v.get_secret_value() if isinstance(v, SecretStr) else str(v)
        for name, v in values.items()
        if v is not None
    }
