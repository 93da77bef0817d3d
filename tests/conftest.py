"""Shared fixtures: the real servers of the ``test`` profile, and isolated namespaces.

The servers are started once per test session, on ports and in a folder of their own,
so a running ``make run`` stack is left alone. Where FLASHCLAIM_DATABASE_URL,
FLASHCLAIM_AMQP_URL or FLASHCLAIM_REDIS_URL is set, that server is used instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import astuple
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from flashclaim.core.db import queries
from flashclaim.core.schema_migrations import migrate
from flashclaim.core.settings import PREFIX, Settings
from flashclaim.devtools.devstack import ENV_URLS, PROFILES, Stack, leftovers, port_is_open

ROOT = Path(__file__).resolve().parents[1]
_URL_VARS = set(ENV_URLS.values())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--durable-servers",
        action="store_true",
        help="servers with durable settings (PostgreSQL fsync on): what `make test-faults` runs",
    )


@pytest.fixture(scope="session", autouse=True)
def clean_environment() -> Iterator[None]:
    """No FLASHCLAIM_* variable of the developer's shell may change an outcome."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    for key in saved:
        if key not in _URL_VARS:
            del os.environ[key]
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def stack(clean_environment: None, pytestconfig: pytest.Config) -> Iterator[Stack]:
    durable = bool(pytestconfig.getoption("--durable-servers"))
    servers = Stack("test", root=ROOT / ".stack", fresh=True, durable=durable)
    servers.start()
    try:
        migrate(Settings.from_env(servers.urls()).database_url)
        yield servers
    finally:
        servers.stop()
    left_behind(servers)


def left_behind(servers: Stack) -> None:
    """The session leaves nothing behind: no process of the suite's (a server's, a
    service's, a `flashclaim stack` of test_stack's) still running, no port of the
    test profile still bound. Those found are ended, and the session fails."""
    profiles = [PROFILES["test"], PROFILES["stacktest"]]
    ports = [p for ports in profiles for p in astuple(ports)]
    roots = [ROOT / ".stack" / "test", ROOT / ".stack" / "stacktest"]
    roots += [s.pgroot for s in [servers.postgres] if s is not None]
    found: list[tuple[int, str]] = []
    for _ in range(50):  # a process just stopped may take a moment to go
        found = leftovers(roots, ports)
        if not found:
            break
        time.sleep(0.1)
    for pid, _ in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    bound = (
        [p for p in astuple(PROFILES["test"]) if port_is_open(p)] if not servers.external else []
    )
    assert not found, f"processes the suite left running: {found}"
    assert not bound, f"ports of the test profile still bound: {bound}"


@pytest.fixture
def namespace() -> str:
    """A namespace of queues and Redis keys that no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


def make_settings(stack: Stack, namespace: str) -> Settings:
    return Settings.from_env(stack.urls()).replace(
        namespace=namespace,
        instance_id=f"test-{uuid.uuid4().hex[:8]}",
        claim_wait_seconds=10.0,
        shutdown_grace_seconds=5.0,
    )


@pytest.fixture
def settings(stack: Stack, namespace: str) -> Settings:
    return make_settings(stack, namespace)


@pytest.fixture
def new_database(stack: Stack, settings: Settings) -> Iterator[Callable[[], str]]:
    """Makes empty databases on the suite's server (owned by the services' role), all
    dropped afterwards."""
    if stack.postgres is None:
        pytest.skip("creates databases: needs the suite's own PostgreSQL")
    admin = make_conninfo(settings.database_url, user="postgres", dbname="postgres")
    owner = conninfo_to_dict(settings.database_url)["user"]
    made: list[str] = []

    def make() -> str:
        name = f"m_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        made.append(name)
        return make_conninfo(settings.database_url, dbname=name)

    yield make
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def own_settings(settings: Settings, new_database: Callable[[], str]) -> Settings:
    """``settings`` with a migrated database of their own. The outbox is the database's,
    not a namespace's: a relay publishes every pending row it finds, so a test that runs
    one must not share its database with the others' rows."""
    url = new_database()
    migrate(url)
    return settings.replace(database_url=url)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(settings.database_url, min_size=1, max_size=4, open=False) as p:
        yield p


@pytest.fixture
def coupon_name() -> str:
    return f"PROMO_{uuid.uuid4().hex[:10]}"


def create_coupon_row(database_url: str, name: str, amount: int) -> None:
    """A coupon, as the gateway creates it (with its coupon.created event)."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            queries()["create_coupon"].encode(),
            {"name": name, "amount": amount, "traceparent": None},
        )


@pytest.fixture
def exploding_user(settings: Settings) -> Iterator[str]:
    """A user whose claims the database refuses with an error no retry can cure."""
    user = f"boom-{uuid.uuid4().hex[:8]}"
    trigger = f"explode_{user.replace('-', '_')}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(f"""
            CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refusing claims of %', NEW.user_id; END $$;
            CREATE TRIGGER {trigger} BEFORE INSERT ON claims FOR EACH ROW
            WHEN (NEW.user_id = '{user}') EXECUTE FUNCTION {trigger}();
        """)
    yield user
    defuse(settings, user)


def defuse(settings: Settings, user: str) -> None:
    """Let the database take :func:`exploding_user`'s claims again (the fix an operator
    waits for before replaying them)."""
    trigger = f"explode_{user.replace('-', '_')}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            f"DROP TRIGGER IF EXISTS {trigger} ON claims; DROP FUNCTION IF EXISTS {trigger}();"
        )
