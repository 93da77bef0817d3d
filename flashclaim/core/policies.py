"""RabbitMQ policies: the limits and dead-lettering of flashclaim's queues.

Queue *arguments* are fixed when a queue is declared: changing one later (a new
``FLASHCLAIM_DELIVERY_LIMIT``, say) makes every later declaration fail with
``PRECONDITION_FAILED``. So the queues are declared with only what can never change
(their type, single active consumer) and everything tunable is a *policy*, which the
broker applies to existing queues as soon as it changes:

- ``<ns>.claims``, on the partition queues: ``delivery-limit`` (the broker's backstop
  for consumers that crash before they can count), ``dead-letter-exchange``,
  ``dead-letter-strategy: at-least-once`` (a dead letter is kept until the DLQ has it)
  ``overflow: reject-publish`` (which at-least-once requires) and ``max-length-bytes``
  (``FLASHCLAIM_COMMAND_QUEUE_MAX_BYTES``: past it a publish is refused, and the
  gateway answers 503, so that no queue grows without bound);
- ``<ns>.claims.dlq``, on the dead-letter queue: ``overflow: reject-publish`` and, on
  RabbitMQ 4.x, ``delivery-limit: -1``. Since 4.0 quorum queues drop (or dead-letter) a
  message after 20 deliveries by default, and every ``flashclaim dlq`` peek is a
  delivery: without the override, dead letters would vanish after about 20 looks.
  (3.x has no default limit and refuses ``-1``.)

They are applied through the management HTTP API (``FLASHCLAIM_AMQP_MANAGEMENT_URL``;
of a cluster, any node's: several, as in ``http://host1:15672,host2:15672/``, are tried
in turn) by every consumer at start and by ``flashclaim topology apply``; with that setting
empty, the operator applies them (the Messaging Topology Operator's ``Policy``, a
definitions file, or ``rabbitmqctl set_policy``) and :func:`policies` says what to set.
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

from flashclaim.core.errors import DependencyUnavailable
from flashclaim.core.hosts import split_hosts
from flashclaim.core.settings import Settings
from flashclaim.core.topology import Topology

log = logging.getLogger(__name__)

# Above RabbitMQ's own default of 0, so an unrelated catch-all policy does not win.
PRIORITY = 10


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    pattern: str
    definition: dict[str, Any]

    def body(self) -> dict[str, Any]:
        # "queues" (not "quorum_queues"): the one value both 3.x and 4.x accept.
        return {
            "pattern": self.pattern,
            "apply-to": "queues",
            "definition": self.definition,
            "priority": PRIORITY,
        }


def policies(topology: Topology, broker_major_version: int) -> list[Policy]:
    ns = re.escape(topology.namespace)
    dlq: dict[str, Any] = {"overflow": "reject-publish"}
    if broker_major_version >= 4:
        dlq["delivery-limit"] = -1  # unlimited: peeking must never drop a dead letter
    return [
        Policy(
            f"{topology.namespace}.claims",
            rf"^{ns}\.claims\.[0-9]+$",
            {
                "delivery-limit": topology.delivery_limit,
                "dead-letter-exchange": topology.dead_letter_exchange,
                "dead-letter-strategy": "at-least-once",
                "overflow": "reject-publish",
                "max-length-bytes": topology.max_bytes,
            },
        ),
        Policy(f"{topology.namespace}.claims.dlq", rf"^{ns}\.claims\.dlq$", dlq),
    ]


class Management:
    """The few calls of RabbitMQ's management HTTP API flashclaim needs."""

    def __init__(self, management_url: str, amqp_url: str) -> None:
        amqp = urllib.parse.urlsplit(split_hosts(amqp_url)[0])
        api = urllib.parse.urlsplit(management_url)
        self._base = f"{api.scheme}://{api.hostname}:{api.port or 15672}{api.path.rstrip('/')}"
        # Credentials: the management URL's own, else the AMQP URL's (guest by default).
        user = api.username or amqp.username or "guest"
        password = api.password or amqp.password or "guest"
        credentials = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()
        }
        vhost = urllib.parse.unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
        self._vhost = urllib.parse.quote(vhost, safe="")

    async def _call(
        self, http: aiohttp.ClientSession, method: str, path: str, body: Any = None
    ) -> Any:
        url = f"{self._base}/api/{path}"
        try:
            async with http.request(method, url, json=body, headers=self._headers) as response:
                if response.status >= 400:
                    detail = (await response.text())[:300]
                    raise DependencyUnavailable(
                        "broker management API", f"{method} {path}: {response.status} {detail}"
                    )
                if response.content_type != "application/json":
                    return None  # 201/204 on a PUT: no body
                return await response.json()
        except aiohttp.ClientError as exc:
            raise DependencyUnavailable("broker management API", repr(exc)) from exc

    async def apply(self, topology: Topology) -> list[Policy]:
        """Set flashclaim's policies (idempotent); return what was set."""
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            overview = await self._call(http, "GET", "overview")
            version = str(overview.get("rabbitmq_version", "3"))
            major = int(version.split(".")[0]) if version[:1].isdigit() else 3
            wanted = policies(topology, major)
            for policy in wanted:
                name = urllib.parse.quote(policy.name, safe="")
                await self._call(http, "PUT", f"policies/{self._vhost}/{name}", policy.body())
        log.info(
            "broker policies applied",
            extra={"broker_version": version, "policies": [p.name for p in wanted]},
        )
        return wanted


async def apply_configured(settings: Settings) -> list[Policy]:
    """Apply the policies through the configured management API (none if it is off)."""
    if not settings.amqp_management_url:
        log.info("broker policies are the operator's (FLASHCLAIM_AMQP_MANAGEMENT_URL is empty)")
        return []
    # A policy is the cluster's: any node's API sets it. The first that answers does.
    apis = split_hosts(settings.amqp_management_url)
    for i, api in enumerate(apis):
        try:
            return await Management(api, settings.amqp_url).apply(settings.topology())
        except DependencyUnavailable as exc:
            if i == len(apis) - 1:
                raise
            log.warning(
                "broker management API not reachable; trying the next address",
                extra={"api": urllib.parse.urlsplit(api).hostname, "error": str(exc)},
            )
    raise AssertionError("unreachable")  # pragma: no cover


def definitions(topology: Topology, broker_major_version: int, vhost: str = "/") -> dict[str, Any]:
    """The topology and its policies as a RabbitMQ definitions document (what
    ``rabbitmqctl import_definitions`` and ``load_definitions`` read): the same
    exchanges, queues, bindings and policies that :meth:`Topology.declare` and
    :func:`policies` make, for a broker whose topology is set before any consumer runs
    (``flashclaim topology definitions``). Users are not in it: they are the
    deployment's secrets."""
    durable: dict[str, Any] = {"vhost": vhost, "durable": True, "auto_delete": False}
    exchanges = [
        {**durable, "name": e.name, "type": e.type, "internal": False, "arguments": {}}
        for e in topology.exchanges()
    ]
    queues = [{**durable, "name": q.name, "arguments": q.arguments} for q in topology.queues()]
    bindings = [
        {
            "vhost": vhost,
            "source": b.exchange,
            "destination": b.queue,
            "destination_type": "queue",
            "routing_key": b.routing_key,
            "arguments": {},
        }
        for b in topology.bindings()
    ]
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
        "policies": [
            {"vhost": vhost, "name": p.name, **p.body()}
            for p in policies(topology, broker_major_version)
        ],
    }
