"""The bus: local fan-out, and Redis pub/sub between two nodes, across a Redis restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bridge.cluster.bus import MAX_MESSAGE_BYTES, LocalBus
from bridge.cluster.redis_bus import RedisBus
from bridge.store.base import StoreUnavailable
from tests.redis_fixtures import RedisServer, unique_prefix


class Inbox:
    """Collects (topic, payload) deliveries and lets a test wait for a number of them."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes) -> None:
        self.got.append((topic, payload))
        self._changed.set()

    async def wait_for(self, n: int, within: float = 10.0) -> list[tuple[str, bytes]]:
        async with asyncio.timeout(within):
            while len(self.got) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.got


async def test_local_bus_fans_out_in_order_and_unsubscribes() -> None:
    bus = LocalBus()
    a, b = Inbox(), Inbox()
    sa = await bus.subscribe("chat:feishu:oc_1", a)
    await bus.subscribe("chat:feishu:oc_1", b)
    await bus.subscribe("ops", b)
    for i in range(3):
        await bus.publish("chat:feishu:oc_1", b"%d" % i)
    await bus.publish("nobody", b"x")
    assert [p for _, p in a.got] == [b"0", b"1", b"2"]
    await bus.unsubscribe(sa)
    await bus.unsubscribe(sa)  # repeated: ignored
    await bus.publish("chat:feishu:oc_1", b"3")
    assert len(a.got) == 3 and len(b.got) == 4


async def test_failing_callback_does_not_stop_others() -> None:
    bus = LocalBus()
    good = Inbox()

    def bad(topic: str, payload: bytes) -> None:
        raise RuntimeError("boom")

    await bus.subscribe("t", bad)
    await bus.subscribe("t", good)
    await bus.publish("t", b"x")
    assert good.got == [("t", b"x")]


async def test_bad_messages_are_refused() -> None:
    bus = LocalBus()
    with pytest.raises(ValueError):
        await bus.publish("", b"x")
    with pytest.raises(TypeError):
        await bus.publish("t", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await bus.publish("t", b"x" * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(ValueError):
        await bus.subscribe("", Inbox())


@pytest.fixture
async def two_nodes(redis_cluster_url: str) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    url = f"{redis_cluster_url}?prefix={unique_prefix()}"
    a, b = RedisBus(url), RedisBus(url)
    await a.start()
    await b.start()
    await asyncio.wait_for(a.connected.wait(), 10)
    await asyncio.wait_for(b.connected.wait(), 10)
    yield a, b
    await a.close()
    await b.close()


async def test_redis_bus_delivers_across_nodes_in_order(
    two_nodes: tuple[RedisBus, RedisBus],
) -> None:
    a, b = two_nodes
    got = Inbox()
    sub = await a.subscribe("chat:feishu:oc_1", got)
    payloads = [bytes([i % 256]) * (i + 1) for i in range(200)]
    for p in payloads:
        await b.publish("chat:feishu:oc_1", p)
    await b.publish("chat:feishu:other", b"not for a")
    await got.wait_for(200)
    assert got.got == [("chat:feishu:oc_1", p) for p in payloads]
    await a.unsubscribe(sub)
    await b.publish("chat:feishu:oc_1", b"after")
    marker = Inbox()
    await a.subscribe("marker", marker)
    await b.publish("marker", b"m")
    await marker.wait_for(1)  # pub/sub is ordered: "after" would have arrived before this
    assert len(got.got) == 200


async def test_prefixes_keep_deployments_apart(redis_cluster_url: str) -> None:
    a = RedisBus(f"{redis_cluster_url}?prefix={unique_prefix()}")
    b = RedisBus(f"{redis_cluster_url}?prefix={unique_prefix()}")
    await a.start()
    await b.start()
    try:
        await asyncio.wait_for(a.connected.wait(), 10)
        got, own = Inbox(), Inbox()
        await a.subscribe("ops", got)
        await a.subscribe("own", own)
        await b.publish("ops", b"other deployment")
        await a.publish("own", b"mine")
        await own.wait_for(1)
        assert got.got == []
    finally:
        await a.close()
        await b.close()


async def test_redis_bus_resubscribes_after_redis_restart(private_redis: RedisServer) -> None:
    url = private_redis.url(0)
    a, b = RedisBus(url), RedisBus(url)
    await a.start()
    await b.start()
    try:
        await asyncio.wait_for(a.connected.wait(), 10)
        got = Inbox()
        await a.subscribe("chat:feishu:oc_9", got)
        await b.publish("chat:feishu:oc_9", b"before")
        await got.wait_for(1)
        private_redis.stop()
        with pytest.raises(StoreUnavailable):
            await b.publish("chat:feishu:oc_9", b"lost")
        late = Inbox()
        await a.subscribe("subscribed-while-down", late)  # no error; applied on reconnect
        private_redis.start()
        async with asyncio.timeout(15):
            while not a.connected.is_set() or a.last_error is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        async with asyncio.timeout(15):  # b's pool reconnects on its next publish
            while True:
                try:
                    await b.publish("chat:feishu:oc_9", b"after")
                    await b.publish("subscribed-while-down", b"late")
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.05)
        await got.wait_for(2)
        await late.wait_for(1)
        assert got.got[-1] == ("chat:feishu:oc_9", b"after")
    finally:
        await a.close()
        await b.close()
