"""Two hubs on two loopback ports sharing a real Redis (RedisStore + RedisBus): a session and its
running job move A → B → A with every event delivered once, in order, with no gap; a cancel sent
to B stops the job still running on A."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bridge.cluster.redis_bus import RedisBus
from bridge.cluster.redis_eventlog import RedisEventLog
from bridge.hub.persist import NODE_KEY
from bridge.store.redis import RedisStore
from tests.hub.conftest import Running, StartHub, close_code, recv
from tests.hub.fakes import FakeEngine, SlowEngine
from tests.hub.test_handoff import (
    TERMINAL,
    cancel,
    check_cancelled,
    check_stream,
    resume_on,
    started_on,
    take,
)
from tests.hub.test_ws import submit
from tests.redis_fixtures import delete_prefix, unique_prefix

HUB_DB = 13
PIECES = 400


@contextlib.asynccontextmanager
async def redis_pair(
    start_hub: StartHub, redis_base_url: str, engine: Callable[[], FakeEngine]
) -> AsyncIterator[tuple[Running, Running]]:
    """Nodes A and B on one Redis (own prefix), each with its own ``engine()``."""
    prefix = unique_prefix()
    url = f"{redis_base_url}/{HUB_DB}?prefix={prefix}"
    stores = [RedisStore(url), RedisStore(url)]
    buses = [RedisBus(url), RedisBus(url)]
    nodes: list[Running] = []
    try:
        for store in stores:
            await store.open()
        nodes += [
            await start_hub(
                store=store,
                bus=bus,
                events=RedisEventLog(url, client_name=f"test-events-{name}"),
                node_id=name,
                engine=engine(),
                handoff_timeout_s=2.0,
                hello_timeout_s=5.0,
            )
            for name, store, bus in zip(("A", "B"), stores, buses, strict=True)
        ]
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            await node.hub.shutdown(grace_s=0.5)
        for bus in buses:
            await bus.close()
        for store in stores:
            await store.close()
        delete_prefix(f"{redis_base_url}/{HUB_DB}", prefix)


@pytest.fixture
async def redis_nodes(
    start_hub: StartHub, redis_base_url: str
) -> AsyncIterator[tuple[Running, Running]]:
    async with redis_pair(
        start_hub, redis_base_url, lambda: SlowEngine(pieces=PIECES, delay_s=0.004)
    ) as nodes:
        yield nodes


def stuck_engine() -> FakeEngine:
    """Jobs stop after ``started`` until cancelled."""
    engine = FakeEngine()
    engine.gate = asyncio.Event()
    return engine


async def test_a_running_job_follows_its_session_across_nodes_on_redis(
    redis_nodes: tuple[Running, Running],
) -> None:
    a, b = redis_nodes
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await ws.send(submit("long"))
    got: list[dict[str, Any]] = []
    await take(ws, got, 60)
    await ws.close()  # the client drops mid-job
    ws_b, welcome_b = await b.hello(session=sid, last_seq=got[-1]["seq"])
    assert welcome_b["resumed"] is True and welcome_b["missed"] == 0
    await take(ws_b, got, 150)
    assert got[-1]["kind"] not in TERMINAL, "the job must still run on A (make it longer)"
    assert await b.store.get_value(NODE_KEY + sid) == "B"
    ws_a, welcome_a = await a.hello(session=sid, last_seq=got[-1]["seq"])  # and back
    assert welcome_a["resumed"] is True and welcome_a["missed"] == 0
    assert await close_code(ws_b) == 4005
    await take(ws_a, got, 10_000)
    check_stream(got, PIECES)
    assert len(got) == PIECES + 3


async def test_a_cancel_on_the_new_node_stops_the_job_on_the_old_one_on_redis(
    start_hub: StartHub, redis_base_url: str
) -> None:
    async with redis_pair(start_hub, redis_base_url, stuck_engine) as (a, b):
        sid, ws = await started_on(a, "J")
        await ws.close()
        ws_b = await resume_on(b, sid, 2)
        await ws_b.send(cancel("J"))
        check_cancelled(await recv(ws_b, "event", "error"), 3, "J")
        await ws_b.send(json.dumps({"type": "ping", "ts": 1}))
        assert await recv(ws_b, "pong", "event", "error") == {"type": "pong", "ts": 1}
        assert a.engine.handles[f"ws:{sid}:J"].cancelled


async def test_a_moved_sessions_events_survive_killed_pubsub_connections_on_redis(
    redis_nodes: tuple[Running, Running], redis_base_url: str
) -> None:
    """The bus is at most once; the job events of a moved session do not ride on it."""
    import redis.asyncio as aioredis

    a, b = redis_nodes
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await ws.send(submit("long"))
    got: list[dict[str, Any]] = []
    await take(ws, got, 60)
    await ws.close()
    ws_b, welcome_b = await b.hello(session=sid, last_seq=got[-1]["seq"])
    assert welcome_b["resumed"] is True
    admin = aioredis.from_url(f"{redis_base_url}/{HUB_DB}")
    try:
        for _ in range(3):  # every pub/sub connection dies, more than once, while the job runs
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await take(ws_b, got, 40)
    finally:
        await admin.aclose()
    await take(ws_b, got, 10_000)
    check_stream(got, PIECES)
    assert len(got) == PIECES + 3
