"""The gateway's own reads and writes against PostgreSQL (claims go through the queue)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from flashclaim.core import tracing
from flashclaim.core.db import queries
from flashclaim.core.errors import CouponExists, CouponNotFound, DependencyUnavailable
from flashclaim.core.messages import ClaimResult, Outcome
from gateway.nextflight import NextFlight


class Repository:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        # Concurrent reads of one coupon share a query (see gateway/nextflight.py).
        self._coupons: NextFlight[str, dict[str, Any] | None] = NextFlight(self._read_coupon)

    def pool_stats(self) -> dict[str, int]:
        return self._pool.get_stats()

    async def create_coupon(self, name: str, amount: int) -> dict[str, Any]:
        row = await self._fetchone(
            queries()["create_coupon"],
            {"name": name, "amount": amount, "traceparent": tracing.current_traceparent()},
        )
        if row is None:
            raise CouponExists(f"coupon {name!r} already exists")
        return {**row, "claimed_by": []}

    async def get_coupon(self, name: str) -> dict[str, Any]:
        row = await self._coupons.get(name)
        if row is None:
            raise CouponNotFound(f"no coupon named {name!r}")
        return row

    async def holders(self, name: str) -> list[str]:
        return list((await self.get_coupon(name))["claimed_by"])

    async def remaining(self, name: str) -> int | None:
        """The coupon's stock now (``None``: no such coupon)."""
        row = await self._fetchone(queries()["coupon_remaining"], {"name": name})
        return None if row is None else int(row["remaining_amount"])

    async def _read_coupon(self, name: str) -> dict[str, Any] | None:
        return await self._fetchone(queries()["get_coupon"], {"name": name})

    async def recorded_result(
        self, request_id: uuid.UUID
    ) -> tuple[str, str | None, ClaimResult | None]:
        """``(inbox status, the claim's user, result)``; status ``"UNKNOWN"`` when the
        inbox has no row."""
        row = await self._fetchone(queries()["inbox_result"], {"message_id": request_id})
        if row is None:
            return "UNKNOWN", None, None
        if row["status"] != "PROCESSED":
            return row["status"], row["user_id"], None
        result = ClaimResult(
            request_id, Outcome.of_code(row["outcome"]), row["user_id"], row["coupon_name"]
        )
        return row["status"], row["user_id"], result

    async def ping(self) -> None:
        await self._fetchone("SELECT 1 AS ok", {})

    async def _fetchone(self, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
        try:
            async with self._pool.connection(timeout=5.0) as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(sql.encode(), params)
                return await cur.fetchone()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DependencyUnavailable("database", type(exc).__name__) from exc
