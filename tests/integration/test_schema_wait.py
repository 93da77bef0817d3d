"""`flashclaim schema apply --wait`: a database that is not up yet (a container started
beside its server, a Job beside a new cluster) is waited for, bounded, with backoff."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from flashclaim.core.schema_migrations import pending_migrations
from flashclaim.core.settings import Settings
from tests.acceptance.conftest import service_env
from tests.proxy import Proxy


def _proxied(database: str) -> tuple[Proxy, str]:
    proxy = Proxy(int(conninfo_to_dict(database)["port"] or 5432)).start()
    return proxy, make_conninfo(database, host="127.0.0.1", port=proxy.port)


def _schema(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flashclaim.cli", "schema", *args],
        env=service_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_apply_waits_for_a_database_that_comes_up(
    settings: Settings, new_database: Callable[[], str]
) -> None:
    database = new_database()
    proxy, url = _proxied(database)
    try:
        proxy.cut()  # refused, as a server that is still starting
        apply = _schema(settings.replace(database_url=url), "apply", "--wait", "60")
        time.sleep(2.5)
        assert apply.poll() is None, apply.communicate()
        proxy.restore()
        _, err = apply.communicate(timeout=30)
    finally:
        proxy.close()
    assert apply.returncode == 0, err
    assert "database not reachable yet" in err and "trying again in" in err, err
    assert "applied " in err, err
    assert pending_migrations(database) == []


def test_apply_gives_up_after_the_wait_with_exit_2(
    settings: Settings, new_database: Callable[[], str]
) -> None:
    proxy, url = _proxied(new_database())
    try:
        proxy.cut()
        started = time.monotonic()
        apply = _schema(settings.replace(database_url=url), "apply", "--wait", "2")
        _, err = apply.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert apply.returncode == 2, err
    assert "cannot reach the database: waited 2 s" in err, err
    # Bounded: the wait, one backoff step at most, and the interpreter's start.
    assert elapsed < 15, elapsed
    # One line per try, no traceback.
    assert "Traceback" not in err, err
