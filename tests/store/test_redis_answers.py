"""The cluster-wide answer cache on real Redis: sharing, TTL, the byte bound, LRU, hostile values,
Redis down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from bridge.store.redis import RedisStore
from bridge.store.redis_answers import RedisAnswerCache, decode_answer, encode_answer
from engine.cache import CachedAnswer, cache_key
from tests.redis_fixtures import RedisServer, delete_prefix, unique_prefix


def key(n: int) -> str:
    return cache_key(f"image {n}".encode(), "what is this?", 32, "tiny")


def answer(text: str) -> CachedAnswer:
    return CachedAnswer(text, 12, len(text))


@pytest.fixture
async def store_url(redis_store_url: str) -> AsyncIterator[str]:
    """A store URL with a prefix no other test uses (its keys are deleted afterwards)."""
    prefix = unique_prefix()
    yield f"{redis_store_url}?prefix={prefix}"
    delete_prefix(redis_store_url, prefix)


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[list[RedisStore]]:
    """Two stores on the same Redis and prefix: two nodes."""
    opened = [RedisStore(store_url), RedisStore(store_url)]
    for store in opened:
        await store.open()
    yield opened
    for store in opened:
        await store.close()


async def test_an_answer_written_by_one_node_is_read_by_another(stores: list[RedisStore]) -> None:
    a, b = RedisAnswerCache(stores[0]), RedisAnswerCache(stores[1])
    assert await b.get(key(1)) is None
    await a.put(key(1), answer("a cat on a sofa"))
    assert await b.get(key(1)) == answer("a cat on a sofa")
    assert await b.get(key(2)) is None
    text = "猫 🐈 \u00e9"
    await b.put(key(3), answer(text))
    assert await a.get(key(3)) == answer(text)


async def test_entries_expire_after_the_ttl(stores: list[RedisStore]) -> None:
    cache = RedisAnswerCache(stores[0], ttl_s=0.3)
    await cache.put(key(1), answer("soon gone"))
    assert await cache.get(key(1)) is not None
    assert await cache.accounted_bytes() > 0
    deadline = time.monotonic() + 10
    while await cache.get(key(1)) is not None:
        assert time.monotonic() < deadline, "the entry never expired"
        await asyncio.sleep(0.05)
    # The lookup that found it gone settled its bytes.
    assert await cache.accounted_bytes() == 0


async def test_the_byte_bound_evicts_least_recently_used(stores: list[RedisStore]) -> None:
    one = len(encode_answer(answer("x" * 300))) + len(key(0)) + 200  # accounted bytes per entry
    cache = RedisAnswerCache(stores[0], max_bytes=3 * one + 10)
    other_node = RedisAnswerCache(stores[1], max_bytes=3 * one + 10)
    for n in range(3):
        await cache.put(key(n), answer("x" * 300))
    assert await other_node.get(key(0)) is not None  # key 0 is now the most recently used
    await other_node.put(key(3), answer("x" * 300))
    assert await cache.get(key(1)) is None  # the least recently used went
    for n in (0, 2, 3):
        assert await cache.get(key(n)) is not None
    assert other_node.evictions == 1
    assert await cache.accounted_bytes() <= 3 * one + 10
    for n in range(4, 40):  # many writes: the bound holds throughout
        await cache.put(key(n), answer("x" * 300))
        assert await cache.accounted_bytes() <= 3 * one + 10


async def test_rewriting_an_entry_does_not_count_it_twice(stores: list[RedisStore]) -> None:
    cache = RedisAnswerCache(stores[0])
    await cache.put(key(1), answer("first"))
    once = await cache.accounted_bytes()
    await cache.put(key(1), answer("first"))
    assert await cache.accounted_bytes() == once


async def test_an_oversized_answer_is_not_shared(stores: list[RedisStore]) -> None:
    cache = RedisAnswerCache(stores[0], max_entry_bytes=1000)
    await cache.put(key(1), answer("y" * 2000))
    assert await cache.get(key(1)) is None
    assert await cache.accounted_bytes() == 0


async def test_hostile_values_and_keys_are_misses(stores: list[RedisStore], store_url: str) -> None:
    cache = RedisAnswerCache(stores[0])
    prefix = stores[0].prefix
    client = aioredis.Redis.from_url(store_url.split("?")[0])
    try:
        for n, raw in enumerate(
            [b"not json", b"[1,2]", b'{"t":1,"p":1,"c":1}', b'{"t":"x","p":-1,"c":1}', b"\xff"]
        ):
            await client.set(f"{prefix}ans:v:{key(n)}", raw)
            assert await cache.get(key(n)) is None
        # A corrupt size field makes the script fail: still a miss / a dropped write.
        await client.hset(f"{prefix}ans:size", key(9), "NaN")
        await client.zadd(f"{prefix}ans:lru", {key(9): 1})
        assert await cache.get(key(9)) is None
        await cache.put(key(10), answer("fine"))
    finally:
        await client.aclose()
    for bad in ("", "../../etc", "K" * 64, "a" * 200):
        assert await cache.get(bad) is None
        await cache.put(bad, answer("x"))


async def test_redis_down_is_a_fast_miss(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url(0), connect_timeout_s=0.5, op_timeout_s=1.0)
    await store.open()
    cache = RedisAnswerCache(store)
    try:
        await cache.put(key(1), answer("kept"))
        assert await cache.get(key(1)) == answer("kept")
        private_redis.stop()
        assert await cache.get(key(1)) is None
        await cache.put(key(2), answer("dropped"))  # no exception
        started = time.monotonic()
        for _ in range(20):  # the breaker is open: no connect timeout per call
            assert await cache.get(key(1)) is None
        assert time.monotonic() - started < 2.0
    finally:
        await store.close()


@given(st.binary(max_size=300))
def test_decode_never_raises(raw: bytes) -> None:
    result = decode_answer(raw)
    assert result is None or isinstance(result, CachedAnswer)


@given(st.text(), st.integers(0, 2**40), st.integers(0, 2**40))
def test_encode_decode_round_trip(text: str, prompt: int, completion: int) -> None:
    original = CachedAnswer(text, prompt, completion)
    assert decode_answer(encode_answer(original)) == original
