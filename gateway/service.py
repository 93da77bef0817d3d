"""The gateway process: serve until SIGTERM, then drain in-flight requests and exit."""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from flashclaim.settings import Settings
from flashclaim.signals import stop_event_on_signals
from gateway.access_log import CanonicalAccessLogger
from gateway.admin import create_admin_app
from gateway.app import create_app

log = logging.getLogger(__name__)


async def run(
    settings: Settings, stop: asyncio.Event | None = None, reuse_port: bool = False
) -> None:
    """Serve one gateway process until ``stop`` is set (default: SIGTERM or SIGINT)."""
    stop = stop or stop_event_on_signals()
    if not settings.idempotency_secret:
        settings = settings.replace(idempotency_secret=shared_secret())
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
        reuse_port=reuse_port or None,
        # A flash sale opens thousands of connections in the same instant: a short
        # accept queue would drop SYNs and make clients wait seconds to retry them.
        backlog=4096,
    )
    await site.start()
    log.info("gateway listening", extra={"host": settings.http_host, "port": settings.http_port})
    admin = None
    if settings.admin_token:
        admin = web.AppRunner(
            create_admin_app(settings),
            access_log_class=CanonicalAccessLogger,
            access_log=logging.getLogger("flashclaim.access"),
        )
        await admin.setup()
        await web.TCPSite(
            admin, settings.admin_host, settings.admin_port, reuse_port=reuse_port or None
        ).start()
        log.info(
            "admin API listening",
            extra={"host": settings.admin_host, "port": settings.admin_port},
        )
    try:
        await stop.wait()
    finally:
        if admin is not None:
            await admin.cleanup()
        await runner.cleanup()
        log.info("gateway stopped")


def shared_secret() -> str:
    """A secret for gateway processes started together when none is configured."""
    from gateway.idempotency import random_secret

    log.warning(
        "FLASHCLAIM_IDEMPOTENCY_SECRET is not set: Idempotency-Key retries are recognised"
        " only by the gateway processes started now, until they restart"
    )
    return random_secret()


def supervise(settings: Settings) -> int:
    """Run ``gateway_workers`` gateway processes on one port and keep them running.

    The kernel spreads connections over the workers (SO_REUSEPORT). A worker that dies
    is started again; SIGTERM or SIGINT is passed on to every worker, which drains its
    in-flight requests before it exits.
    """
    import signal
    import subprocess
    import sys
    import time

    from flashclaim.processes import StopRequest, terminate

    stop = StopRequest()
    # Every worker must derive the same request id from an Idempotency-Key.
    secret = settings.idempotency_secret or shared_secret()

    def spawn(i: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "FLASHCLAIM_IDEMPOTENCY_SECRET": secret,
            "FLASHCLAIM_INSTANCE_ID": f"{settings.instance_id}-w{i}",
            "FLASHCLAIM_HTTP_PORT": str(settings.http_port),
        }
        return subprocess.Popen(
            [sys.executable, "-m", "flashclaim.cli", "gateway", "--worker"], env=env
        )

    workers = {i: spawn(i) for i in range(settings.gateway_workers)}
    log.info("gateway workers started", extra={"workers": len(workers)})
    while not stop.requested:
        time.sleep(0.2)
        for i, proc in list(workers.items()):
            if proc.poll() is not None and not stop.requested:
                log.error(
                    "gateway worker exited; restarting",
                    extra={"worker": i, "status": proc.returncode},
                )
                time.sleep(0.5)
                workers[i] = spawn(i)
    codes = terminate(workers.values(), settings.shutdown_grace_seconds + 10)
    # A worker still starting up when SIGTERM came has no handler yet and simply ends.
    return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1
