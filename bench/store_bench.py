"""Store and job-queue benchmark: ops/s and latency of memory, SQLite, Redis; local vs Redis queue.

Run: ``python bench/store_bench.py [--redis redis://127.0.0.1:6379/12] [--ops 2000]``.
Prints one Markdown table per measurement, ready to paste into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from bridge.cluster.jobs import LocalJobQueue
from bridge.cluster.redis_jobs import RedisJobQueue
from bridge.store.base import InboxEntry, Store, StoredEvent
from bridge.store.memory import MemoryStore
from bridge.store.redis import RedisStore
from bridge.store.sqlite import SqliteStore

Op = Callable[[int], Awaitable[object]]


def _ops(store: Store) -> dict[str, Op]:
    run = uuid.uuid4().hex[:8]
    return {
        "claim": lambda i: store.claim(f"{run}:k{i}", 3600),
        "append_events": lambda i: store.append_events(
            f"{run}:s{i % 100}", [StoredEvent(i + 1, time.time(), '{"type":"event"}' * 8)], 3600
        ),
        "inbox_add": lambda i: store.inbox_add(
            InboxEntry(f"{run}:e{i}", b"x" * 512, accepted_at=time.time())
        ),
    }


async def _sequential(op: Op, n: int) -> tuple[float, float, float]:
    """(ops/s, p50 ms, p99 ms) of ``n`` calls one after another."""
    lat = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        lat.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    q = statistics.quantiles(lat, n=100)
    return n / total, q[49] * 1000, q[98] * 1000


async def _concurrent(op: Op, n: int, workers: int) -> float:
    """ops/s of ``n`` calls from ``workers`` concurrent tasks."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await op(n + i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return n / (time.perf_counter() - start)


async def bench_store(name: str, store: Store, n: int) -> list[str]:
    await store.open()
    rows = []
    try:
        for op_name, op in _ops(store).items():
            rate, p50, p99 = await _sequential(op, n)
            crate = await _concurrent(op, n * 2, 64)
            rows.append(
                f"| {name} | {op_name} | {rate:,.0f} | {p50:.3f} | {p99:.3f} | {crate:,.0f} |"
            )
    finally:
        await store.close()
    return rows


async def bench_queue(name: str, q: LocalJobQueue | RedisJobQueue, n: int) -> str:
    """Round trip put → consume → ack, one job at a time (added latency per job)."""
    await q.start()
    lat = []
    try:
        consumer = q.consume(max_in_flight=1)
        for i in range(n):
            t0 = time.perf_counter()
            await q.put(f"j{i}", b"x" * 256)
            entry = await anext(consumer)
            await q.ack(entry)
            lat.append(time.perf_counter() - t0)
        await consumer.aclose()  # type: ignore[attr-defined]
        # throughput: producer and a consumer with capacity 16 running together
        done = 0
        start = time.perf_counter()

        async def produce() -> None:
            for i in range(n):
                await q.put(f"t{i}", b"x" * 256)

        async def consume() -> None:
            nonlocal done
            async for entry in q.consume(max_in_flight=16):
                await q.ack(entry)
                done += 1
                if done == n:
                    return

        await asyncio.gather(produce(), consume())
        rate = n / (time.perf_counter() - start)
    finally:
        await q.close()
    qs = statistics.quantiles(lat, n=100)
    return f"| {name} | {qs[49] * 1000:.3f} | {qs[98] * 1000:.3f} | {rate:,.0f} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:6]}:"
    redis_url = f"{args.redis}?prefix={prefix}"
    with tempfile.TemporaryDirectory() as tmp:
        stores: list[tuple[str, Store]] = [
            ("memory", MemoryStore()),
            ("sqlite FULL", SqliteStore(f"sqlite:///{Path(tmp)}/full.db")),
            ("sqlite NORMAL", SqliteStore(f"sqlite:///{Path(tmp)}/normal.db?synchronous=normal")),
            ("redis", RedisStore(redis_url)),
        ]
        print("| backend | op | seq ops/s | p50 ms | p99 ms | 64-way ops/s |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for name, store in stores:
            for row in await bench_store(name, store, args.ops):
                print(row, flush=True)
    print()
    print("| queue | round-trip p50 ms | p99 ms | jobs/s (cap 16) |")
    print("| --- | ---: | ---: | ---: |")
    print(await bench_queue("local", LocalJobQueue(), args.ops))
    print(await bench_queue("redis", RedisJobQueue(redis_url, consumer="bench"), args.ops))
    await _cleanup(args.redis, prefix)


async def _cleanup(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
