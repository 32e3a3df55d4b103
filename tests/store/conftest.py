"""Store test fixtures: a real Redis (shared DB 11 or private) and a store per backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.store.base import Store
from bridge.store.memory import MemoryStore
from bridge.store.redis import RedisStore
from bridge.store.sqlite import SqliteStore
from tests.redis_fixtures import (
    delete_prefix,
    private_redis,
    redis_base_url,
    redis_cluster_url,
    redis_store_url,
    unique_prefix,
)

__all__ = ["private_redis", "redis_base_url", "redis_cluster_url", "redis_store_url"]


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """One backend under test, with a way to let a short TTL run out on its own terms.

    ``ttl`` is a TTL short enough to run out in the test; ``long_ttl`` one that will not.
    """

    kind: str
    store: Store
    ttl: float
    long_ttl: float
    clock: FakeClock | None

    async def pass_ttl(self) -> None:
        """Move past ``ttl``: jump the fake clock, or (Redis) leave it to real time and polling."""
        if self.clock is not None:
            self.clock.now += self.ttl + 1

    async def eventually(self, check: Callable[[], Awaitable[bool]], within: float = 10.0) -> bool:
        """``check()`` now (fake clock) or polled until true ``within`` seconds (real TTLs)."""
        if self.clock is not None:
            return await check()
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if await check():
                return True
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def harness(
    request: pytest.FixtureRequest, tmp_path: Path, redis_store_url: str
) -> AsyncIterator[Harness]:
    """Each backend in turn, opened, then closed (and its Redis keys deleted)."""
    kind: str = request.param
    if kind == "memory":
        clock = FakeClock()
        yield Harness(kind, MemoryStore(clock=clock), 10.0, 3600.0, clock)
        return
    if kind == "sqlite":
        clock = FakeClock()
        store = SqliteStore(f"sqlite:///{tmp_path}/bridge.db", clock=clock)
        await store.open()
        try:
            yield Harness(kind, store, 10.0, 3600.0, clock)
        finally:
            await store.close()
        return
    prefix = unique_prefix()
    rstore = RedisStore(f"{redis_store_url}?prefix={prefix}")
    await rstore.open()
    try:
        yield Harness(kind, rstore, 0.5, 3600.0, None)
    finally:
        await rstore.close()
        delete_prefix(redis_store_url, prefix)
