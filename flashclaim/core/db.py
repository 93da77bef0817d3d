"""PostgreSQL access: the named queries, the connection pool and the schema."""

from __future__ import annotations

import functools
import importlib.resources
import re

import psycopg
from psycopg_pool import AsyncConnectionPool

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@functools.cache
def queries() -> dict[str, str]:
    """Every statement of ``queries.sql`` by name, parsed once."""
    text = importlib.resources.files("flashclaim.core").joinpath("queries.sql").read_text()
    parts = _NAME.split(text)
    return {
        name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def schema_sql() -> str:
    return importlib.resources.files("flashclaim.core").joinpath("schema.sql").read_text()


def apply_schema(conninfo: str) -> None:
    """Apply ``schema.sql`` (idempotent) in one transaction."""
    with psycopg.connect(conninfo, autocommit=False) as conn:
        # Serialize concurrent appliers: CREATE ... IF NOT EXISTS is not race-free.
        conn.execute("SELECT pg_advisory_xact_lock(4232017)")
        conn.execute(schema_sql().encode())


def create_pool(conninfo: str, min_size: int, max_size: int, name: str) -> AsyncConnectionPool:
    """A pool that is opened by the caller (``await pool.open()``)."""
    return AsyncConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=name,
        kwargs={"application_name": name},
        # A connection that died with its server is detected before it is handed out.
        check=AsyncConnectionPool.check_connection,
    )
