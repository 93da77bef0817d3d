"""What the admin API process holds, shared by its JSON API (dlq_api.py) and its
console (console.py)."""

from __future__ import annotations

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from flashclaim.core.settings import Settings
from flashclaim.ops.deadletters import DeadLetterQueue

SETTINGS = web.AppKey("admin_settings", Settings)
DLQ = web.AppKey("dlq", DeadLetterQueue)
BROKER = web.AppKey("admin_broker", AbstractRobustConnection)
# A small pool for the console's pages that refresh (the live view of a sale); opened
# without waiting, so that the admin API starts while the database is away.
DATABASE = web.AppKey("admin_database", AsyncConnectionPool)
