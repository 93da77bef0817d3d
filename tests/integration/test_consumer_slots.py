"""Consumers started as identical replicas (CONSUMER_INDEX=auto) share the partitions
through slots held in PostgreSQL."""

from __future__ import annotations

import asyncio

import psycopg

from consumer import service
from consumer.slots import ConsumerSlot, lock_key
from flashclaim.core.settings import Settings


async def test_each_replica_takes_a_free_slot_and_a_dead_ones_slot_is_freed(
    settings: Settings,
) -> None:
    slots = [ConsumerSlot(settings.database_url, settings.namespace, 2) for _ in range(3)]
    try:
        assert [await s.take() for s in slots] == [0, 1, None]
        await slots[0].release()  # the connection ends: as if its consumer died
        again = ConsumerSlot(settings.database_url, settings.namespace, 2)
        slots.append(again)
        assert await again.take() == 0
        # Another namespace's slots are its own.
        other = ConsumerSlot(settings.database_url, f"{settings.namespace}-other", 2)
        slots.append(other)
        assert await other.take() == 0
    finally:
        for s in slots:
            await s.release()


def held_slots(settings: Settings) -> list[int]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid"
            " AND granted ORDER BY objid",
            (lock_key(settings.namespace) % 2**32,),
        ).fetchall()
    return [int(r[0]) for r in rows]


async def test_consumers_with_an_automatic_index_take_slots_zero_and_one(
    settings: Settings,
) -> None:
    auto = settings.replace(consumer_index="auto", consumer_count=2)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(service.run(auto.replace(instance_id=f"{auto.instance_id}-{i}"), stop))
        for i in range(2)
    ]
    try:
        async with asyncio.timeout(20):
            while True:  # the locks are the servers' to tell: polled
                if held_slots(settings) == [0, 1]:
                    break
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert held_slots(settings) == []  # released at stop
