"""The gateway process: serve until SIGTERM, then drain in-flight requests and exit."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from flashclaim.settings import Settings
from flashclaim.signals import stop_event_on_signals
from gateway.access_log import CanonicalAccessLogger
from gateway.app import create_app

log = logging.getLogger(__name__)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_event_on_signals()
    runner = web.AppRunner(
        create_app(settings),
        access_log_class=CanonicalAccessLogger,
        access_log=logging.getLogger("flashclaim.access"),
    )
    await runner.setup()
    # On cleanup the site stops listening, lets in-flight requests finish for at most
    # the grace period, then closes connections and the app's resources.
    site = web.TCPSite(
        runner,
        settings.http_host,
        settings.http_port,
        shutdown_timeout=settings.shutdown_grace_seconds,
    )
    await site.start()
    log.info("gateway listening", extra={"host": settings.http_host, "port": settings.http_port})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("gateway stopped")
