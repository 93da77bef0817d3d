"""One Redis subscription per gateway process, resolving every waiting claim request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import redis.asyncio as aioredis

from flashclaim.core.messages import ClaimResult

log = logging.getLogger(__name__)


class ReplyListener:
    """Listens on this gateway's reply channel and hands each result to its waiters.

    Several requests may wait on the same request id (a retried request with the same
    Idempotency-Key): all of them get the one result.
    """

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        self._redis = client
        self.channel = channel
        self._waiters: dict[uuid.UUID, list[asyncio.Future[ClaimResult]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self, timeout: float = 5.0) -> None:
        """Subscribe, waiting at most ``timeout``: without Redis the gateway still starts
        (claims then answer 202 and are found later) and the subscription follows."""
        self._task = asyncio.create_task(self._listen(), name="reply-listener")
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        except TimeoutError:
            log.warning("reply channel not subscribed yet; continuing")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiters in self._waiters.values():
            for fut in waiters:
                fut.cancel()

    def expect(self, request_id: uuid.UUID) -> asyncio.Future[ClaimResult]:
        """Register interest *before* publishing, so that a fast reply is never missed;
        :meth:`forget` it once answered or given up (the future, then, is left alone)."""
        fut: asyncio.Future[ClaimResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(fut)
        return fut

    def forget(self, request_id: uuid.UUID, fut: asyncio.Future[ClaimResult]) -> None:
        waiters = self._waiters.get(request_id)
        if waiters is None:
            return
        if fut in waiters:
            waiters.remove(fut)
        if not waiters:
            del self._waiters[request_id]

    def _resolve(self, result: ClaimResult) -> None:
        for fut in self._waiters.pop(result.request_id, []):
            if not fut.done():
                fut.set_result(result)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None:
                        continue
                    try:
                        results = ClaimResult.loads_many(message["data"])
                    except (ValueError, KeyError, TypeError):
                        log.warning("malformed reply ignored")
                        continue
                    for result in results:
                        self._resolve(result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the listener must outlive any fault: it resubscribes
                # Redis away: waiting requests will answer 202 and be found later in
                # Redis or the inbox; keep trying to subscribe again.
                self._subscribed.clear()
                log.warning("reply subscription lost", extra={"error": repr(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
