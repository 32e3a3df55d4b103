"""TokenCache: refresh ahead of expiry, single-flight fetches, invalidation, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from adapters.tokens import TokenCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Issuer:
    """Hands out ``t1``, ``t2``, ... each living ``lifetime`` seconds; may be held or failing."""

    def __init__(self, lifetime: float = 7200.0) -> None:
        self.lifetime = lifetime
        self.issued = 0
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def __call__(self) -> tuple[str, float]:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.issued += 1
        return f"t{self.issued}", self.lifetime


async def test_cached_until_the_margin_before_expiry_then_refreshed() -> None:
    clock, issuer = Clock(), Issuer(lifetime=7200.0)
    cache = TokenCache(issuer, refresh_margin_s=300.0, clock=clock)
    assert cache.cached() is None
    assert await cache.get() == "t1"
    clock.now += 6899.0
    assert await cache.get() == "t1" and issuer.issued == 1
    clock.now += 1.0  # 300 s before the stated expiry: refreshed ahead of it
    assert await cache.get() == "t2" and cache.fetches == 2


async def test_concurrent_callers_share_one_fetch() -> None:
    issuer = Issuer()
    issuer.gate = asyncio.Event()
    cache = TokenCache(issuer, clock=Clock())
    waiters = [asyncio.create_task(cache.get()) for _ in range(20)]
    await asyncio.sleep(0)
    issuer.gate.set()
    assert await asyncio.gather(*waiters) == ["t1"] * 20
    assert issuer.issued == 1 and cache.fetches == 1


async def test_a_failed_fetch_reaches_every_waiter_and_the_next_call_tries_again() -> None:
    issuer = Issuer()
    issuer.gate = asyncio.Event()
    issuer.fail = RuntimeError("refused")
    cache = TokenCache(issuer, clock=Clock())
    waiters = [asyncio.create_task(cache.get()) for _ in range(3)]
    await asyncio.sleep(0)
    issuer.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results) and cache.fetches == 1
    issuer.fail = None
    assert await cache.get() == "t1" and cache.fetches == 2


async def test_a_cancelled_caller_does_not_cancel_the_fetch_for_others() -> None:
    issuer = Issuer()
    issuer.gate = asyncio.Event()
    cache = TokenCache(issuer, clock=Clock())
    first = asyncio.create_task(cache.get())
    second = asyncio.create_task(cache.get())
    await asyncio.sleep(0)
    first.cancel()
    issuer.gate.set()
    assert await second == "t1"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert cache.fetches == 1


async def test_invalidate_drops_only_the_token_it_names() -> None:
    cache = TokenCache(Issuer(), clock=Clock())
    old = await cache.get()
    cache.invalidate(old)
    new = await cache.get()
    assert (old, new) == ("t1", "t2")
    cache.invalidate(old)  # a late refusal of the old token keeps the new one
    assert cache.cached() == "t2"
    cache.invalidate()
    assert cache.cached() is None and await cache.get() == "t3"


async def test_a_lifetime_shorter_than_the_margin_is_fetched_every_time() -> None:
    issuer = Issuer(lifetime=60.0)
    cache = TokenCache(issuer, refresh_margin_s=300.0, clock=Clock())
    assert [await cache.get() for _ in range(3)] == ["t1", "t2", "t3"]
