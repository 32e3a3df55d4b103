"""The job queue: local, and Redis Streams shared by two consumers, dead-node reclaim, restarts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bridge.cluster.jobs import MAX_JOB_BYTES, LocalJobQueue, QueueEntry
from bridge.cluster.redis_jobs import RedisJobQueue
from tests.redis_fixtures import RedisServer, unique_prefix


async def take(q: LocalJobQueue | RedisJobQueue, n: int, max_in_flight: int = 10,
               within: float = 15.0) -> list[QueueEntry]:  # fmt: skip
    """The next ``n`` entries of a fresh consume() (not acked)."""
    out: list[QueueEntry] = []
    async with asyncio.timeout(within):
        async for entry in q.consume(max_in_flight):
            out.append(entry)
            if len(out) == n:
                break
    return out


# --- local ---------------------------------------------------------------------------------------


async def test_local_queue_fifo_capacity_and_close() -> None:
    q = LocalJobQueue()
    for i in range(5):
        await q.put(f"j{i}", b"%d" % i)
    got: list[QueueEntry] = []

    async def consumer() -> None:
        async for entry in q.consume(max_in_flight=2):
            got.append(entry)

    task = asyncio.create_task(consumer())
    for _ in range(50):
        await asyncio.sleep(0)
    assert [e.job_id for e in got] == ["j0", "j1"] and q.in_flight == 2  # capacity respected
    await q.ack(got[0])
    for _ in range(50):
        await asyncio.sleep(0)
    assert [e.job_id for e in got] == ["j0", "j1", "j2"]
    await q.close()
    await asyncio.wait_for(task, 5)


async def test_bad_jobs_are_refused() -> None:
    q = LocalJobQueue()
    with pytest.raises(ValueError):
        await q.put("", b"x")
    with pytest.raises(TypeError):
        await q.put("j", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await q.put("j", b"x" * (MAX_JOB_BYTES + 1))
    with pytest.raises(ValueError):
        await take(q, 1, max_in_flight=0)


# --- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
async def queue_url(redis_cluster_url: str) -> AsyncIterator[str]:
    yield f"{redis_cluster_url}?prefix={unique_prefix()}"


async def _started(url: str, name: str, **kw: float) -> RedisJobQueue:
    q = RedisJobQueue(url, consumer=name, block_s=0.2, **kw)  # type: ignore[arg-type]
    await q.start()
    return q


async def test_two_consumers_share_work_exactly_once(queue_url: str) -> None:
    a = await _started(queue_url, "node-a")
    b = await _started(queue_url, "node-b")
    try:
        for i in range(20):
            await a.put(f"j{i}", b"p%d" % i)
        held = await take(a, 1, max_in_flight=1)  # a is now full: everything else goes to b
        rest = await take(b, 19, max_in_flight=50)
        for e in rest:
            await b.ack(e)
        await a.ack(held[0])
        ids = [e.job_id for e in held + rest]
        assert sorted(ids) == sorted(f"j{i}" for i in range(20))
        assert all(e.deliveries == 1 for e in held + rest)
        assert rest[0].payload.startswith(b"p")
        client = aioredis.Redis.from_url(queue_url.split("?")[0])
        prefix = queue_url.split("prefix=")[1]
        assert await client.xlen(f"{prefix}jobs") == 0  # acked entries are deleted
        await client.aclose()
    finally:
        await a.close()
        await b.close()


async def test_dead_node_job_is_claimed_by_the_other(queue_url: str) -> None:
    a = await _started(queue_url, "node-a", claim_idle_s=0.5)
    b = await _started(queue_url, "node-b", claim_idle_s=0.5)
    try:
        await a.put("job-1", b"x")
        (entry,) = await take(a, 1)
        await a.close()  # "dies" without acking
        (again,) = await take(b, 1)
        assert (again.job_id, again.entry_id) == ("job-1", entry.entry_id)
        assert again.deliveries == 2
        await b.ack(again)
    finally:
        await b.close()


async def test_live_node_keeps_its_long_job(queue_url: str) -> None:
    a = await _started(queue_url, "node-a", claim_idle_s=0.6)
    b = await _started(queue_url, "node-b", claim_idle_s=0.6)
    try:
        await a.put("long", b"x")
        (entry,) = await take(a, 1)
        with contextlib.suppress(TimeoutError):
            stolen = await take(b, 1, within=2.0)  # > 3 x claim_idle_s
            pytest.fail(f"live node's job was taken: {stolen}")
        await a.ack(entry)
    finally:
        await a.close()
        await b.close()


async def test_restarted_node_takes_its_own_backlog_at_once(queue_url: str) -> None:
    a = await _started(queue_url, "node-a", claim_idle_s=60)
    await a.put("j1", b"x")
    await a.put("j2", b"y")
    first = await take(a, 2)
    await a.close()
    a2 = await _started(queue_url, "node-a", claim_idle_s=60)
    try:
        again = await take(a2, 2, within=5)
        assert [e.job_id for e in again] == [e.job_id for e in first]
        assert all(e.deliveries >= 2 for e in again)
    finally:
        await a2.close()


async def test_poison_job_goes_to_dead_letter(queue_url: str) -> None:
    a = await _started(queue_url, "node-a", claim_idle_s=0.3, max_deliveries=1)
    b = await _started(queue_url, "node-b", claim_idle_s=0.3, max_deliveries=1)
    try:
        await a.put("poison", b"x")
        await take(a, 1)
        await a.close()
        await b.put("fine", b"y")
        seen: list[str] = []
        task: asyncio.Task[None] | None = None

        async def consume_b() -> None:
            async for entry in b.consume(4):
                seen.append(entry.job_id)
                await b.ack(entry)

        task = asyncio.create_task(consume_b())
        client = aioredis.Redis.from_url(queue_url.split("?")[0])
        prefix = queue_url.split("prefix=")[1]
        async with asyncio.timeout(10):
            while not await client.xlen(f"{prefix}jobs:dead"):  # noqa: ASYNC110 (polls Redis)
                await asyncio.sleep(0.05)
        dead: list[tuple[bytes, dict[bytes, bytes]]]
        dead = await client.xrange(f"{prefix}jobs:dead")  # type: ignore[assignment]
        await client.aclose()
        assert dead[0][1][b"job_id"] == b"poison"
        assert seen == ["fine"]  # the poison job never reached b's handler
    finally:
        await b.close()
        if task is not None:
            await asyncio.wait_for(task, 5)


async def test_redis_restart_mid_stream_loses_nothing_with_aof() -> None:
    server = RedisServer(appendonly=True)
    server.start()
    q = await _started(server.url(0), "node-a", claim_idle_s=30)
    try:
        for i in range(10):
            await q.put(f"j{i}", b"x")
        got: list[QueueEntry] = []
        async with asyncio.timeout(15):
            async for entry in q.consume(max_in_flight=4):
                got.append(entry)
                await q.ack(entry)
                if len(got) == 4:
                    server.stop()  # Redis goes away mid-stream
                    asyncio.get_running_loop().call_later(0.5, server.start)
                if len(got) == 10:
                    break
        await q.put("after-restart", b"y")
        (late,) = await take(q, 1)
        assert sorted(e.job_id for e in got) == sorted(f"j{i}" for i in range(10))
        assert late.job_id == "after-restart"
    finally:
        await q.close()
        server.cleanup()


async def test_redis_restart_without_persistence_recreates_the_group(
    private_redis: RedisServer,
) -> None:
    q = await _started(private_redis.url(0), "node-a")
    try:
        await q.put("j0", b"x")
        (entry,) = await take(q, 1)
        await q.ack(entry)
        private_redis.stop()
        private_redis.start()  # empty: stream and group are gone
        async with asyncio.timeout(15):
            while True:
                try:
                    await q.put("j1", b"y")
                    break
                except Exception:
                    await asyncio.sleep(0.05)
        (late,) = await take(q, 1)
        assert late.job_id == "j1"
    finally:
        await q.close()
