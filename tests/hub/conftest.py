"""Fixtures for hub tests: a real hub on a loopback aiohttp server with short timers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.cluster.eventlog import LocalEventLog
from bridge.hub import Hub, HubConfig
from bridge.metrics import Metrics
from bridge.store.memory import MemoryStore
from tests.hub.fakes import FakeEngine
from tests.redis_fixtures import redis_base_url

__all__ = ["redis_base_url"]

# One scaled time unit: every timer in the functional tests is a multiple of it.
UNIT = 0.1
TOKEN = "token-1"
ADMIN = "admin-1"


def hub_config(**overrides: Any) -> HubConfig:
    base: dict[str, Any] = {
        "tokens": frozenset({TOKEN}),
        "admin_tokens": frozenset({ADMIN}),
        "heartbeat_s": 3 * UNIT,
        "heartbeat_timeout_s": 2 * UNIT,
        "hello_timeout_s": 3 * UNIT,
        "flush_interval_s": 0.5 * UNIT,
        # The client token may follow every chat topic unless a test says otherwise.
        "topic_grants": ((TOKEN, "chat:*"),),
    }
    base.update(overrides)
    return HubConfig(**base)


@dataclass
class Running:
    hub: Hub
    server: TestServer
    engine: FakeEngine
    store: Any
    metrics: Metrics
    url: str
    clients: list[Any] = field(default_factory=list)

    async def connect(self, **kwargs: Any) -> Any:
        ws = await websockets.connect(self.url, ping_interval=None, compression=None, **kwargs)
        self.clients.append(ws)
        return ws

    async def hello(
        self,
        token: str = TOKEN,
        session: str | None = None,
        last_seq: int | None = None,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        ws = await self.connect(**kwargs)
        await ws.send(
            json.dumps({"type": "hello", "token": token, "session": session, "last_seq": last_seq})
        )
        welcome = await recv(ws, "welcome")
        return ws, welcome


async def recv(
    ws: Any, *types: str, within: float = 5.0, answer_pings: bool = True
) -> dict[str, Any]:
    """The next frame of one of ``types`` (answering pings on the way unless told not to)."""
    async with asyncio.timeout(within):
        while True:
            frame: dict[str, Any] = json.loads(await ws.recv())
            if frame["type"] == "ping" and answer_pings and "ping" not in types:
                # The server may be closing already (shutdown right after the first ping): the
                # frames it sent before closing are still there to read.
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(json.dumps({"type": "pong", "ts": frame["ts"]}))
                continue
            if not types or frame["type"] in types:
                return frame


async def close_code(ws: Any, within: float = 5.0) -> int | None:
    """Read until the server closes; return its close code."""
    async with asyncio.timeout(within):
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``check`` until it holds (a generous deadline for slow machines)."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polls state owned by other tasks
            await asyncio.sleep(0.01)


StartHub = Callable[..., Awaitable[Running]]


async def crash(run: Running) -> None:
    """Abandon ``run`` as ``kill -9`` would: no ``bye``, no job errors, no last store write.

    Its write-behind and jobs stop without emitting anything, its clients' connections drop, it
    leaves the cluster bus unanswered; the fixture's graceful shutdown then does nothing. The store
    keeps exactly what was flushed before.
    """
    hub = run.hub
    hub._stopping = True  # refuses new connections; makes the teardown's shutdown a no-op
    for task in hub._tasks:  # the write-behind: nothing more reaches the store
        task.cancel()
    await asyncio.gather(*hub._tasks, return_exceptions=True)
    hub._tasks.clear()
    hub._jobs._emit = lambda *args: None  # a dead process numbers no more events
    for job in list(hub._jobs.tasks):
        job.cancel()
    await asyncio.gather(*hub._jobs.tasks, return_exceptions=True)
    if hub._moves is not None:
        await hub._moves.handoff.stop(0.0)
    await run.server.close()
    if hub._timer is not None:
        hub._timer.close()


@pytest.fixture
async def start_hub() -> AsyncIterator[StartHub]:
    running: list[Running] = []
    # Nodes on one bus share one cluster event log (each node gets its own handle on it).
    logs: dict[int, LocalEventLog] = {}

    async def start(
        *,
        store: Any = None,
        port: int | None = None,
        pieces: int = 3,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        engine: Any = None,
        bus: Any = None,
        events: Any = None,
        node_id: str | None = None,
        **overrides: Any,
    ) -> Running:
        cfg = hub_config(**overrides)
        engine = engine or FakeEngine(pieces=pieces)
        store = store or MemoryStore()
        metrics = Metrics()
        if bus is not None and events is None:
            events = logs.setdefault(id(bus), LocalEventLog()).follower()
        hub = Hub(
            cfg,
            engine=engine,
            store=store,
            metrics=metrics,
            clock=clock,
            wall=wall,
            bus=bus,
            events=events,
            node_id=node_id,
        )
        await hub.start()
        app = web.Application()
        app.router.add_get("/ws", hub.handle)
        server = (
            TestServer(app, host="127.0.0.1", port=port)
            if port
            else TestServer(app, host="127.0.0.1")
        )
        await server.start_server()
        run = Running(hub, server, engine, store, metrics, f"ws://127.0.0.1:{server.port}/ws")
        running.append(run)
        return run

    yield start
    for run in running:
        for ws in run.clients:
            await ws.close()
        await run.hub.shutdown(grace_s=0.5)
        await run.server.close()
