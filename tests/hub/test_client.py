"""The reference client against a real hub: reconnect, resume, dead-server detection."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.retry import Backoff
from bridge.client import HubClient, HubClientError
from engine.types import Delta
from tests.hub.conftest import TOKEN, StartHub, eventually


def fast_client(url: str, token: str = TOKEN, **kwargs: Any) -> HubClient:
    return HubClient(
        url,
        token,
        heartbeat_timeout_s=0.2,
        backoff_initial_s=0.02,
        backoff_max_s=0.2,
        open_timeout_s=3.0,
        rng=random.Random(7),
        **kwargs,
    )


def test_backoff_is_jittered_capped_and_exponential() -> None:
    client = HubClient("ws://unused/ws", "t", backoff_initial_s=0.5, rng=random.Random(1))
    backoff = client.backoff
    assert isinstance(backoff, Backoff)
    delays = [backoff.next_delay() for _ in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 30.0 for d in delays) and delays[-1] >= 15.0
    assert 2.0 <= backoff.delay(3) <= 4.0
    assert len(set(delays)) == len(delays)  # jittered: no two waits alike
    backoff.reset()
    assert backoff.failures == 0 and 0.25 <= backoff.next_delay() <= 0.5


async def collect_until_done(
    client: HubClient, job_id: str, kick: Any = None
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        async for frame in client.frames():
            if frame["type"] != "event":
                continue
            seen.append(frame)
            if kick is not None:
                await kick(len(seen))
            if frame["id"] == job_id and frame["kind"] == "done":
                return seen
    raise AssertionError("stream ended")


async def test_reconnects_after_drops_and_never_duplicates(start_hub: StartHub) -> None:
    run = await start_hub(pieces=300)
    run.engine.gate = asyncio.Event()
    run.engine.gate.set()

    async def kick(count: int) -> None:
        if count in (50, 150, 250):
            for conn in run.hub.connections():
                await run.hub.kick(conn.id)

    async with fast_client(run.url) as client:
        await client.submit("long", "describe", b"img")
        seen = await collect_until_done(client, "long", kick)
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    assert "".join(e["text"] for e in seen if e["kind"] == "delta") == seen[-1]["text"]
    assert client.connects >= 2 and client.resumes >= 1
    assert len(run.engine.requests) == 1  # the resent submit was recognised as a duplicate


async def test_notices_a_silent_server_and_reconnects() -> None:
    hellos = 0

    async def silent(request: web.Request) -> web.WebSocketResponse:
        nonlocal hellos
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        hellos += 1
        await ws.send_str(
            json.dumps(
                {
                    "type": "welcome",
                    "session": "s_x",
                    "resumed": hellos > 1,
                    "heartbeat": 0.2,
                    "missed": 0,
                }
            )
        )
        async for _ in ws:  # then never sends anything again
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", silent)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with fast_client(f"ws://127.0.0.1:{server.port}/ws") as client:
            await eventually(lambda: client.connects >= 3, within=10)
    finally:
        await server.close()


async def test_resumes_on_the_next_process_after_shutdown(start_hub: StartHub) -> None:
    run = await start_hub()
    port = run.server.port
    async with fast_client(run.url) as client:
        await client.subscribe("chat:feishu:oc_7")
        await eventually(
            lambda: (
                bool(run.hub.connections())
                and run.hub.connections()[0].topics == ["chat:feishu:oc_7"]
            )
        )
        for i in range(5):
            await run.hub.publish("chat:feishu:oc_7", "feishu:m1", Delta(f"a{i}"))
        frames = client.frames()
        async with asyncio.timeout(10):
            first = [await anext(frames) for _ in range(6)]
        assert first[0]["type"] == "subscribed" and [f["seq"] for f in first[1:]] == [1, 2, 3, 4, 5]
        session = client.session
        await run.hub.shutdown(grace_s=1.0)
        await run.server.close()
        nxt = await start_hub(store=run.store, port=port)
        # Published before the client is back: the restarted hub preloaded the subscribed session.
        for i in range(5, 8):
            await nxt.hub.publish("chat:feishu:oc_7", "feishu:m1", Delta(f"a{i}"))
        rest: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while len(rest) < 3:
                frame = await anext(frames)
                if frame["type"] == "event":
                    rest.append(frame)
        assert [f["seq"] for f in rest] == [6, 7, 8] and client.session == session
        assert [f["text"] for f in rest] == ["a5", "a6", "a7"]


async def test_bad_token_stops_the_client(start_hub: StartHub) -> None:
    run = await start_hub()
    async with fast_client(run.url, token="wrong") as client:
        with pytest.raises(HubClientError) as info:
            async with asyncio.timeout(10):
                async for _ in client.frames():
                    pass
    assert info.value.code == 4001
