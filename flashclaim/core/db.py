"""PostgreSQL access: the named queries and the connection pool (the schema's
migrations are flashclaim/core/schema_migrations.py: no service loads them)."""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


_LEADING_COMMENTS = re.compile(r"\A(?:\s*--[^\n]*\n)+\s*")


@functools.cache
def queries() -> dict[str, str]:
    """Every statement of ``queries.sql`` by name, parsed once; the comment above a
    statement stays in the file (the statement's name is what traces and logs show)."""
    text = importlib.resources.files("flashclaim.core").joinpath("queries.sql").read_text()
    parts = _NAME.split(text)
    return {
        name: _LEADING_COMMENTS.sub("", body.strip()).rstrip(";")
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def schema_sql() -> str:
    """The whole schema, readable in one file (what the migrations add up to)."""
    return importlib.resources.files("flashclaim.core").joinpath("schema.sql").read_text()


async def configure_session(conn: psycopg.AsyncConnection[Any]) -> None:
    """Settings of every service connection.

    ``plan_cache_mode = force_custom_plan``: psycopg prepares a statement after a few
    executions, and PostgreSQL would then reuse one generic plan, made when the tables
    were as small as at the start of a sale. A plan that scans a table of a hundred rows
    goes on scanning it at a hundred thousand until autovacuum's next analyze (up to a
    minute later): a batch's probes of the claims then took 144 ms instead of 0.1. Each
    execution is planned for the tables as they are (planning these statements costs
    a few tens of microseconds).
    """
    await conn.execute("SET plan_cache_mode = force_custom_plan")
    await conn.commit()


async def opened(pool: AsyncConnectionPool, timeout: float = 30) -> bool:
    """Open ``pool`` and wait for its first connections; ``True`` (for
    :meth:`flashclaim.core.runtime.Runtime.until_stopped`)."""
    await pool.open(wait=True, timeout=timeout)
    return True


def create_pool(
    conninfo: str,
    min_size: int,
    max_size: int,
    name: str,
    configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] = configure_session,
) -> AsyncConnectionPool:
    """A pool that is opened by the caller (``await pool.open()``); ``configure`` sets
    up each new connection (a service adding settings of its own calls
    :func:`configure_session` from it)."""
    return AsyncConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
        kwargs={"application_name": name},
        configure=configure,
        # A connection that died with its server is detected before it is handed out.
        check=AsyncConnectionPool.check_connection,
    )
