"""What the admin API process holds, shared by its JSON API (dlq_api.py) and its
console (console.py)."""

from __future__ import annotations

from aiohttp import web

from flashclaim.core.settings import Settings
from flashclaim.ops.deadletters import DeadLetterQueue

SETTINGS = web.AppKey("admin_settings", Settings)
DLQ = web.AppKey("dlq", DeadLetterQueue)
