"""Redis store specifics: URL options, key prefix, two nodes at once, and Redis going away."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from bridge.store import open_store
from bridge.store.base import InboxEntry, SessionRecord, StoredEvent, StoreUnavailable
from bridge.store.redis import RedisStore
from bridge.store.redis_client import split_redis_url
from tests.redis_fixtures import RedisServer, delete_prefix, unique_prefix


def test_url_prefix_option() -> None:
    assert split_redis_url("redis://h:1/2") == ("redis://h:1/2", "bridge:")
    assert split_redis_url("redis://h:1/2?prefix=x:&health_check_interval=3") == (
        "redis://h:1/2?health_check_interval=3",
        "x:",
    )
    for bad in ["http://h/1", "redis://h/1?prefix="]:
        with pytest.raises(ValueError):
            split_redis_url(bad)


async def test_all_keys_live_under_the_prefix(redis_store_url: str) -> None:
    prefix = unique_prefix()
    store = open_store(f"{redis_store_url}?prefix={prefix}")
    assert isinstance(store, RedisStore)
    await store.open()
    try:
        await store.claim("a", 60)
        await store.set_value("b", "v", 60)
        await store.incr("c", 60)
        await store.inbox_add(InboxEntry("d", b"x", 1.0))
        await store.inbox_add(InboxEntry("e", b"x", 1.0))
        await store.inbox_complete("e")
        await store.append_events("f", [StoredEvent(1, 1.0, "x")], 60)
        client = aioredis.Redis.from_url(redis_store_url)
        keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}*")]
        await client.aclose()
        assert len(keys) == 8
        ttls_ok = True
        client = aioredis.Redis.from_url(redis_store_url)
        for key in keys:
            if not key.endswith("inbox:pending") and not key.startswith(f"{prefix}inbox:e:"):
                ttls_ok &= await client.pttl(key) > 0  # everything but live inbox data expires
        await client.aclose()
        assert ttls_ok
    finally:
        await store.close()
        delete_prefix(redis_store_url, prefix)


async def test_a_session_header_without_open_jobs_reads_as_none(redis_store_url: str) -> None:
    prefix = unique_prefix()
    store = RedisStore(f"{redis_store_url}?prefix={prefix}")
    await store.open()
    try:
        await store.save_session(SessionRecord("s", last_seq=0, open_jobs=["j"]), 60)
        client = aioredis.Redis.from_url(redis_store_url)
        try:  # as a header written before the field existed
            assert await client.hdel(f"{prefix}sess:h:s", "open_jobs") == 1
        finally:
            await client.aclose()
        rec = await store.load_session("s")
        assert rec is not None and rec.open_jobs == [] and rec.last_seq == 0
    finally:
        await store.close()
        delete_prefix(redis_store_url, prefix)


async def test_two_nodes_race_for_one_claim(redis_store_url: str) -> None:
    prefix = unique_prefix()
    nodes = [RedisStore(f"{redis_store_url}?prefix={prefix}") for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        results = await asyncio.gather(*(nodes[i % 2].claim("feishu:om_1", 60) for i in range(60)))
        assert results.count(True) == 1
        await nodes[0].append_events("s", [StoredEvent(1, 1.0, "a")], 60)
        rec = await nodes[1].load_session("s")  # a session resumes on the other node
        assert rec is not None and [e.frame for e in rec.events] == ["a"]
    finally:
        for node in nodes:
            await node.close()
        delete_prefix(redis_store_url, prefix)


async def _eventually_ok(store: RedisStore, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await store.ping()
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_redis_down_fails_fast_then_recovers_without_new_store(
    private_redis: RedisServer,
) -> None:
    store = RedisStore(private_redis.url(0), connect_timeout_s=0.5, op_timeout_s=1.0)
    await store.open()
    try:
        assert await store.claim("before", 60)
        private_redis.stop()
        for call in (
            lambda: store.claim("k", 60),
            lambda: store.inbox_add(InboxEntry("m", b"x", 1.0)),
            lambda: store.load_session("s"),
            lambda: store.ping(),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 2.0
        private_redis.start()
        await _eventually_ok(store)
        assert await store.claim("after", 60)  # same store object, reconnected by itself
        await store.inbox_add(InboxEntry("m", b"x", 1.0))
        assert [e.entry_id for e in await store.inbox_pending()] == ["m"]
    finally:
        await store.close()


async def test_open_with_redis_down_does_not_raise(private_redis: RedisServer) -> None:
    private_redis.stop()
    store = RedisStore(private_redis.url(0), connect_timeout_s=0.5, op_timeout_s=1.0)
    await store.open()
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        private_redis.start()
        await _eventually_ok(store)
    finally:
        await store.close()


async def test_not_open_is_unavailable(redis_store_url: str) -> None:
    store = RedisStore(redis_store_url)
    with pytest.raises(StoreUnavailable):
        await store.claim("k", 1)
