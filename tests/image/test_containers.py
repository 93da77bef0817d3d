"""The image's services, run as docker-compose.yml declares them (`make test-image`).

Built by `make image`; started with podman on the host's network against the servers the
test command starts (tests/image/containers.py says what is taken from the Compose file
and what differs). One deployment for the module, in this order: the services start and
become healthy, serve the scenarios and a burst, publish their events, are stopped under
load (the gateway, then the consumer) and started again, and are still up and healthy at
the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aio_pika
import aiohttp
import psycopg
import pytest
import redis
import yaml
from packaging.requirements import Requirement
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from flashclaim.core.events import decode
from flashclaim.core.settings import Settings
from flashclaim.devtools import scenarios
from flashclaim.devtools.devstack import Stack
from flashclaim.devtools.tokens import Credentials, Signer, headers_of
from tests.acceptance.conftest import Services, free_port
from tests.acceptance.load import Load, Window, verify
from tests.image.containers import (
    EDGE_IMAGE,
    IMAGE,
    LIMITS,
    ROOT,
    Container,
    Declared,
    Deployment,
    declared_services,
    images_match,
    podman,
)

pytestmark = pytest.mark.image

SERVICES = ("consumer", "relay", "gateway")


class SpanSink:
    """The benchmark's OTLP/HTTP receiver (bench/otlp_sink.py), standing in for Jaeger:
    the spans each service sends."""

    def __init__(self) -> None:
        self.port = free_port()
        self._proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "otlp_sink.py"), "--port", str(self.port)],
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.1)
        raise TimeoutError("the OTLP receiver did not start")

    @property
    def by_service(self) -> Counter[str]:
        url = f"http://127.0.0.1:{self.port}/spans"
        with urllib.request.urlopen(url, timeout=5) as response:
            return Counter(json.loads(response.read())["by_service"])

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


@dataclass
class Running:
    deployment: Deployment
    settings: Settings  # the servers and names the containers use, for the checks
    containers: dict[str, Container]
    ports: dict[str, dict[str, int]]
    spans: SpanSink
    credentials: Credentials | None = None
    healthy_after: dict[str, float] = field(default_factory=dict)
    events: aio_pika.abc.AbstractQueue | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']['FLASHCLAIM_HTTP_PORT']}"

    @property
    def edge_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['edge']['FLASHCLAIM_EDGE_PORT']}"

    @property
    def services(self) -> Services:
        """What the acceptance tests' load and checks need: the settings and the URL."""
        return Services(
            self.settings,
            port=self.ports["gateway"]["FLASHCLAIM_HTTP_PORT"],
            credentials=self.credentials,
        )

    def audit(self) -> str:
        """`flashclaim audit`, run from the image like the other commands."""
        result = self.deployment.run_once("schema", "audit", "--pending-older-than", "300")
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


def _add_redis_users(stack: Stack) -> None:
    """The users Compose's Redis starts with (its command's `--user` directives), but
    the default user's: the suite's own clients are the default user."""
    assert stack.redis is not None
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["redis"]["command"]
    client = redis.Redis(port=stack.redis.port)
    try:
        for directive in " ".join(command).split(" --user ")[1:]:
            user, *rules = directive.split(" ")
            if user != "default":
                client.execute_command("ACL", "SETUSER", user, "reset", *rules)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def _credentials(deployment: Deployment) -> Credentials:
    """Tokens for the gateway container: signed with the key its `keys` service made,
    for the issuer and audience it is configured with."""
    env = deployment.environment("gateway", {})
    folder = deployment.volume_path("authkeys")
    signer = Signer.from_file(
        folder / "compose-dev.pem", env["FLASHCLAIM_AUTH_ISSUER"], env["FLASHCLAIM_AUTH_AUDIENCE"]
    )
    return Credentials(signer)


def _import_broker_definitions(stack: Stack) -> None:
    """What Compose's RabbitMQ loads at boot: deploy/rabbitmq/definitions.json (its user,
    exchanges, queues, bindings, policies), through the management API. The file is for
    Compose's RabbitMQ 4.x; the suite's is Debian's 3.10, which has no default delivery
    limit to lift and refuses the DLQ's `delivery-limit: -1`, so that key is left out."""
    assert stack.rabbitmq is not None
    definitions = json.loads((ROOT / "deploy/rabbitmq/definitions.json").read_text())
    for policy in definitions["policies"]:
        if policy["definition"].get("delivery-limit") == -1:
            del policy["definition"]["delivery-limit"]

    async def post() -> None:
        auth = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
        async with (
            aiohttp.ClientSession(headers=auth) as http,
            http.post(
                f"{stack.rabbitmq.management_url}api/definitions",  # type: ignore[union-attr]
                json=definitions,
            ) as r,
        ):
            assert r.status in (200, 201, 204), await r.text()

    asyncio.run(post())


@pytest.fixture(scope="module")
def declared() -> dict[str, Declared]:
    services = declared_services()
    assert set(services) == {"schema", "keys", *SERVICES, "edge"}, services
    for service in services.values():
        assert images_match(service.image, service.built), (service.service, service.image)
    assert services["edge"].built == EDGE_IMAGE
    return services


@pytest.fixture(scope="module")
def running(stack: Stack, declared: dict[str, Declared]) -> Iterator[Running]:
    if len(stack.owned) < 3:
        pytest.skip(
            "the image's tests load the broker's definitions: they need the suite's servers"
        )
    assert stack.postgres is not None and stack.rabbitmq is not None and stack.redis is not None
    urls = Settings.from_env(stack.urls())
    database = f"img_{uuid.uuid4().hex[:10]}"
    admin = make_conninfo(urls.database_url, user="postgres", dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}" OWNER flashclaim')
        # What Compose's PostgreSQL runs at its first start: the services' role.
        conn.execute((ROOT / "deploy/postgres/service-role.sql").read_text())
    _import_broker_definitions(stack)
    _add_redis_users(stack)
    spans = SpanSink()
    pg = conninfo_to_dict(urls.database_url)
    amqp = urllib.parse.urlsplit(urls.amqp_url)
    management = urllib.parse.urlsplit(stack.rabbitmq.management_url)
    redis_url = urllib.parse.urlsplit(urls.redis_url)
    addresses = {
        "postgres:5432/flashclaim": f"127.0.0.1:{pg['port']}/{database}",
        "rabbitmq:5672": f"127.0.0.1:{amqp.port}",
        "rabbitmq:15672": f"127.0.0.1:{management.port}",
        "redis:6379": f"127.0.0.1:{redis_url.port}",
        "jaeger:4318": f"127.0.0.1:{spans.port}",
    }
    deployment = Deployment(declared, addresses)
    # The checks see what the containers see: the same servers, database and names.
    env = deployment.environment("gateway", {})
    settings = urls.replace(
        database_url=env["FLASHCLAIM_DATABASE_URL"],
        amqp_url=env["FLASHCLAIM_AMQP_URL"],
        redis_url=env["FLASHCLAIM_REDIS_URL"],
    )
    ports = {
        "consumer": {"FLASHCLAIM_METRICS_PORT": free_port()},
        "relay": {"FLASHCLAIM_METRICS_PORT": free_port()},
        "gateway": {"FLASHCLAIM_HTTP_PORT": free_port()},
        "edge": {"FLASHCLAIM_EDGE_PORT": free_port(), "FLASHCLAIM_EDGE_METRICS_PORT": free_port()},
    }
    # The edge sends to the gateway's container.
    addresses["gateway:8080"] = f"127.0.0.1:{ports['gateway']['FLASHCLAIM_HTTP_PORT']}"
    try:
        # schema first (the others depend on its successful completion), as Compose does.
        assert declared["consumer"].depends_on["schema"] == "service_completed_successfully"
        schema = deployment.run_once("schema")
        assert schema.returncode == 0, schema.stdout + schema.stderr
        assert "applied " in schema.stderr, schema.stderr
        assert "granted to flashclaim_app" in schema.stderr, schema.stderr
        # The gateway's keys, made by their one-shot service (kept at a second run).
        assert declared["gateway"].depends_on["keys"] == "service_completed_successfully"
        for _ in range(2):
            keys = deployment.run_once("keys")
            assert keys.returncode == 0, keys.stdout + keys.stderr
        assert "(kept)" in keys.stdout, keys.stdout
        containers = {s: deployment.start(s, ports[s]) for s in (*SERVICES, "edge")}
        credentials = _credentials(deployment)
        yield Running(deployment, settings, containers, ports, spans, credentials)
    finally:
        for container in deployment.containers:
            log = ROOT / ".stack" / "test" / "services" / f"{container.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(container.logs())
        deployment.remove_all()
        spans.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


def test_the_image_is_labelled_with_its_version_and_revision() -> None:
    (image,) = json.loads(podman("image", "inspect", IMAGE).stdout)
    labels = image["Labels"]
    version = labels["org.opencontainers.image.version"]
    assert version != "unknown" and version in (ROOT / "pyproject.toml").read_text()
    assert len(labels["org.opencontainers.image.revision"].split("-")[0]) == 40, labels
    assert image["Config"]["User"] == "10001:10001"


def test_the_image_holds_exactly_the_production_lock() -> None:
    frozen = podman(
        "run", "--rm", "--network=none", *LIMITS, "--entrypoint", "pip", IMAGE,
        "freeze", "--exclude", "flashclaim", "--disable-pip-version-check",
    ).stdout  # fmt: skip
    installed = {line.split("==")[0].lower().replace("_", "-") for line in frozen.split()}
    environment = json.loads(
        podman(
            "run", "--rm", "--network=none", *LIMITS, "--entrypoint", "python", IMAGE, "-c",
            "import json; from pip._vendor.packaging.markers import default_environment as e;"
            " print(json.dumps(e()))",
        ).stdout
    )  # fmt: skip
    pinned = set()
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" not in line or line.startswith((" ", "#")):
            continue
        requirement = Requirement(line.rstrip(" \\"))
        # Packages for other platforms or Pythons (tzdata on Windows, async-timeout
        # before 3.11.3, say) are installed by the image's Python's markers only.
        if requirement.marker is None or requirement.marker.evaluate(environment):
            pinned.add(requirement.name.lower().replace("_", "-"))
    assert installed == pinned, installed ^ pinned


def test_every_service_starts_healthy_as_a_non_root_user(running: Running) -> None:
    for name, container in running.containers.items():
        running.healthy_after[name] = container.until_healthy()
        users = container.users()
        assert users and "root" not in users and "0" not in users, (name, users)
        assert users == {"flashclaim"}, (name, users)
    # The gateway runs its workers under gunicorn: all of them are the image's user.
    assert len(podman("top", running.containers["gateway"].name, "pid").stdout.split()) >= 3


async def test_the_edge_container_serves_the_contract_in_front_of_the_gateways(
    running: Running, http: aiohttp.ClientSession
) -> None:
    """Double Dip through the edge's container, as Compose publishes it: one grant, nine
    refusals; its health check passes while the gateway answers, and its metrics show
    the gateways' queue (empty, the sale over)."""
    dip = await scenarios.double_dip(
        http, running.edge_url, attempts=10, stock=100, credentials=running.credentials
    )
    assert dip.violations == [] and dict(dip.statuses) == {200: 1, 409: 9}, dip
    assert running.containers["edge"].probe()
    metrics = running.ports["edge"]["FLASHCLAIM_EDGE_METRICS_PORT"]
    async with http.get(f"http://127.0.0.1:{metrics}/metrics") as r:
        assert r.status == 200
        assert 'haproxy_backend_current_queue{proxy="gateways"} 0' in await r.text()


async def test_the_contract_scenarios_and_a_burst_through_the_gateway_container(
    running: Running, http: aiohttp.ClientSession
) -> None:
    # The relay's events: a queue of ours on the events exchange, bound before the sales.
    connection = await aio_pika.connect(running.settings.amqp_url)
    channel = await connection.channel()
    # Named in the services' namespace: their user, the test's too, may use no other.
    events = await channel.declare_queue(
        f"{running.settings.namespace}.image-test-{uuid.uuid4().hex[:6]}", exclusive=True
    )
    await events.bind(running.settings.topology().events_exchange, "coupon.#")
    try:
        auth = running.credentials
        flash = await scenarios.flash_sale(
            http, running.base_url, users=50, stock=5, credentials=auth
        )
        assert flash.violations == [] and dict(flash.statuses) == {200: 5, 400: 45}, flash
        dip = await scenarios.double_dip(
            http, running.base_url, attempts=10, stock=100, credentials=auth
        )
        assert dip.violations == [] and dict(dip.statuses) == {200: 1, 409: 9}, dip
        assert dip.coupon_state["remaining_amount"] == 99
        burst = await scenarios.flash_sale(
            http, running.base_url, users=2000, stock=100, credentials=auth
        )
        assert burst.violations == [], burst.violations
        assert (burst.statuses[200], burst.statuses[400]) == (100, 1900), burst.statuses
        for report in (flash, dip, burst):
            assert report.retried == 0 and set(report.seen) <= {200, 202, 400, 409}, report.seen
        running.audit()

        # Every change was published: a coupon.created each, a coupon.claimed for each
        # grant, a coupon.sold_out for the two sales that sold out.
        coupons = {flash.coupon, dip.coupon, burst.coupon}
        expected = Counter(
            {"coupon.created": 3, "coupon.claimed": 5 + 1 + 100, "coupon.sold_out": 2}
        )
        received: Counter[str] = Counter()
        claimed: set[tuple[str, str]] = set()
        async with asyncio.timeout(60):
            while received != expected:
                message = await events.get(fail=False, timeout=5)
                if message is None:
                    await asyncio.sleep(0.2)
                    continue
                await message.ack()
                for event in decode(message.content_type, message.body):
                    assert event["coupon_name"] in coupons, event
                    received[event["type"]] += 1
                    if event["type"] == "coupon.claimed":
                        claimed.add((event["coupon_name"], event["user_id"]))
        assert claimed == {
            (report.coupon, user) for report in (flash, dip, burst) for user in report.winners
        }
    finally:
        await connection.close()
    # Traced end to end (Compose points OTLP at Jaeger; here at a receiver of the test's).
    for _ in range(60):
        spans = await asyncio.to_thread(lambda: running.spans.by_service)
        if all(spans[f"flashclaim-{s}"] for s in SERVICES):
            break
        await asyncio.sleep(0.5)
    assert all(spans[f"flashclaim-{s}"] for s in SERVICES), spans


async def test_stopping_the_gateway_under_load_answers_every_claim_it_accepted(
    running: Running, http: aiohttp.ClientSession
) -> None:
    """`docker stop` of the gateway while claims are in flight: each claim the gateway
    took is answered before it exits; whoever got no answer holds no claim."""
    coupon = f"STOP_GW_{uuid.uuid4().hex[:8]}"
    async with http.post(
        f"{running.base_url}/api/coupons",
        json={"name": coupon, "amount": 100_000},
        headers=headers_of(running.credentials),
    ) as r:
        assert r.status == 201
    gateway = running.containers["gateway"]
    answers: dict[str, int] = {}
    unanswered: dict[str, str] = {}
    sent = 0

    async def claim(user: str) -> None:
        nonlocal sent
        sent += 1
        try:
            async with http.post(
                f"{running.base_url}/api/coupons/claim",
                json={"user_id": user, "coupon_name": coupon},
                headers=headers_of(running.credentials, user),
            ) as r:
                answers[user] = r.status
                await r.read()
        except aiohttp.ClientError as exc:
            unanswered[user] = type(exc).__name__

    async def load() -> None:
        gate = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with gate:
                await claim(f"u{i:05d}")

        await asyncio.gather(*(one(i) for i in range(6000)))

    traffic = asyncio.create_task(load())
    for _ in range(6000):
        if sent >= 600:
            break
        await asyncio.sleep(0.01)
    stopped = await asyncio.to_thread(gateway.stop)
    assert stopped.returncode == 0
    await traffic
    assert gateway.exit_code() == 0, gateway.logs()[-3000:]  # SIGTERM, not the SIGKILL
    assert len(answers) >= 600 and unanswered, (len(answers), len(unanswered))
    assert set(answers.values()) <= {200, 202}, Counter(answers.values())

    def holding() -> set[str]:
        with psycopg.connect(running.settings.database_url) as conn:
            rows = conn.execute("SELECT user_id FROM claims WHERE coupon_name = %s", (coupon,))
            return {r[0] for r in rows}

    holders = holding()
    answered = {u for u, status in answers.items() if status == 200}
    # 202s were accepted and are applied later by the consumer: wait for them.
    pending = {u for u, status in answers.items() if status == 202}
    async with asyncio.timeout(60):
        while not pending <= holders:
            await asyncio.sleep(0.2)
            holders = holding()
    # Every holder was answered (no claim applied for a request cut off), every 200 holds.
    assert holders == answered | pending, (
        sorted(holders - answered - pending)[:10],
        {u: unanswered.get(u) for u in list(holders - answered - pending)[:10]},
    )

    # The same container, started again, serves.
    await asyncio.to_thread(gateway.start)
    await asyncio.to_thread(gateway.until_healthy)
    report = await scenarios.flash_sale(
        http, running.base_url, users=20, stock=3, credentials=running.credentials
    )
    assert report.violations == [] and dict(report.statuses) == {200: 3, 400: 17}


async def test_stopping_the_consumer_under_load_loses_no_claim(
    running: Running, http: aiohttp.ClientSession
) -> None:
    """`docker stop` of the consumer mid-load, then `docker start`: every claim gets its
    final answer (the client follows 202s), the answers and the database agree, and the
    audit holds."""
    consumer = running.containers["consumer"]
    load = await Load(running.services, http, claims=3000, coupons=10, stock=250, users=900).start()
    await load.reached(0.3)
    window = Window(time.time())
    stopped = await asyncio.to_thread(consumer.stop)
    assert stopped.returncode == 0 and consumer.exit_code() == 0, consumer.logs()[-3000:]
    window.hit()
    await asyncio.sleep(2)  # claims queue up meanwhile (answered 202 if it lasts)
    await asyncio.to_thread(consumer.start)
    window.close()
    answers = await load.finish()
    await verify(running.settings, load, answers)
    # Claims in flight once it had stopped were answered only after it started again.
    waited = [a for a in window.reached(answers, delayed=False) if a.answered_at > window.end]
    assert len(waited) >= 10, f"only {len(waited)} claims waited for the stopped consumer"
    running.audit()
    await asyncio.to_thread(consumer.until_healthy)


def test_every_service_is_still_up_and_healthy(running: Running) -> None:
    for name, container in running.containers.items():
        state = container.inspect()
        assert state["State"]["Running"], (name, container.logs()[-3000:])
        assert state.get("RestartCount", 0) == 0, (name, state.get("RestartCount"))
        assert container.probe() and container.health() == "healthy", name


def test_a_consumer_refuses_the_gateways_metrics_folder(running: Running) -> None:
    """The image once set PROMETHEUS_MULTIPROC_DIR for every process, and the consumer
    and the relay crashed at start on a missing folder: now a clear error, exit 2."""
    result = podman(
        "run", "--rm", "--network=host", *LIMITS, "--env", "PROMETHEUS_MULTIPROC_DIR=/tmp/metrics",
        *(f"--env={k}={v}" for k, v in running.deployment.environment("consumer", {}).items()),
        IMAGE, "consumer", check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "PROMETHEUS_MULTIPROC_DIR is set" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
