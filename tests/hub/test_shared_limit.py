"""The per-token submit limit shared by every node through the store (MemoryStore and Redis)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import structlog

from bridge.hub.config import token_label
from bridge.hub.submitlimit import SharedSubmitLimit
from bridge.store.memory import MemoryStore
from bridge.store.redis import RedisStore
from tests.hub.conftest import TOKEN, Running, StartHub, recv
from tests.hub.fakes import FakeClock
from tests.redis_fixtures import delete_prefix, unique_prefix

IMAGE = base64.b64encode(b"\x89PNG fake image").decode()
# The tests leave event frames unread; a deep client queue keeps the closing handshake quick.
DEEP: dict[str, Any] = {"max_queue": 1024}
HUB_LIMITS: dict[str, Any] = {"submit_rate": 100.0, "submit_burst": 100, "token_submit_rate": 5.0}


def submit(job_id: str) -> str:
    return json.dumps({"type": "submit", "id": job_id, "prompt": "p", "image": IMAGE})


async def outcomes(ws: Any, ids: list[str]) -> dict[str, str]:
    """Per job id: ``accepted`` (its queued event came) or the error code it got."""
    out: dict[str, str] = {}
    while len(out) < len(ids):
        frame = await recv(ws, "event", "error")
        if frame["type"] == "error":
            out[frame["id"]] = frame["code"]
        elif frame["kind"] == "queued":
            out[frame["id"]] = "accepted"
    return out


async def test_two_hubs_sharing_a_store_share_the_token_limit(start_hub: StartHub) -> None:
    wall = FakeClock(1_700_000_000.0)  # one window that never ends: no timing assumptions
    store = MemoryStore(clock=wall)
    node_a = await start_hub(store=store, **HUB_LIMITS)
    node_b = await start_hub(store=store, **HUB_LIMITS)
    ws_a, _ = await node_a.hello(**DEEP)
    ws_b, _ = await node_b.hello(**DEEP)
    for i in range(4):
        await ws_a.send(submit(f"a{i}"))
    got_a = await outcomes(ws_a, [f"a{i}" for i in range(4)])
    for i in range(4):
        await ws_b.send(submit(f"b{i}"))
    got_b = await outcomes(ws_b, [f"b{i}" for i in range(4)])
    assert list(got_a.values()) == ["accepted"] * 4
    assert sorted(got_b.values()) == ["accepted", "rate_limited", "rate_limited", "rate_limited"]
    assert got_b["b0"] == "accepted"
    assert len(node_a.engine.requests) + len(node_b.engine.requests) == 5
    # A new window lets the token submit again; a refused id was not used up.
    wall.advance(1.5)
    await ws_b.send(submit("b1"))
    assert (await outcomes(ws_b, ["b1"])) == {"b1": "accepted"}
    # Another token has its own window.
    ws_c, _ = await node_a.hello(token="admin-1", **DEEP)
    await ws_c.send(submit("c0"))
    assert (await outcomes(ws_c, ["c0"])) == {"c0": "accepted"}


async def test_a_store_outage_lets_submits_through_and_warns_once(start_hub: StartHub) -> None:
    store = MemoryStore(clock=FakeClock(1_700_000_000.0))
    run = await start_hub(store=store, **{**HUB_LIMITS, "token_submit_rate": 1.0})
    ws, _ = await run.hello(**DEEP)
    store.available = False
    with structlog.testing.capture_logs() as logs:
        for i in range(4):
            await ws.send(submit(f"o{i}"))
        got = await outcomes(ws, [f"o{i}" for i in range(4)])
    assert list(got.values()) == ["accepted"] * 4
    warnings = [e for e in logs if e["event"] == "hub_shared_limit_unavailable"]
    assert len(warnings) == 1 and TOKEN not in repr(warnings)
    store.available = True  # so the hub's shutdown can persist its sessions at once


async def test_disabled_limit_and_recovery_without_a_hub() -> None:
    clock, wall = FakeClock(), FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=wall)  # the store's window moves only when ``wall`` does
    assert all([await SharedSubmitLimit(store, 0.0, clock).allow("tok-x") for _ in range(100)])
    limit = SharedSubmitLimit(store, 2.0, clock)
    assert [await limit.allow("tok-x") for _ in range(3)] == [True, True, False]
    store.available = False
    assert await limit.allow("tok-x") and limit.failing
    store.available = True
    assert await limit.allow("tok-x")  # within the pause after a failure: not even asked
    clock.advance(1.0)
    assert not await limit.allow("tok-x") and not limit.failing  # asked again: window still full
    wall.advance(1.0)
    assert await limit.allow("tok-x")


async def test_the_limit_holds_across_hubs_on_real_redis(
    start_hub: StartHub, redis_base_url: str
) -> None:
    prefix = unique_prefix()
    url = f"{redis_base_url}/14?prefix={prefix}"
    stores = [RedisStore(url), RedisStore(url)]
    nodes: list[Running] = []
    try:
        for store in stores:
            await store.open()
        nodes += [await start_hub(store=s, **HUB_LIMITS) for s in stores]
        sockets = [(await node.hello(**DEEP))[0] for node in nodes]
        started = time.monotonic()
        for i in range(8):
            await sockets[i % 2].send(submit(f"r{i}"))
        got = {**await outcomes(sockets[0], [f"r{i}" for i in range(0, 8, 2)])}
        got.update(await outcomes(sockets[1], [f"r{i}" for i in range(1, 8, 2)]))
        elapsed = time.monotonic() - started
        accepted = [k for k, v in got.items() if v == "accepted"]
        assert set(got.values()) <= {"accepted", "rate_limited"}
        if elapsed < 1.0:  # one window held them all: exactly the limit got through
            assert len(accepted) == 5
        else:  # a slow machine: they straddled two windows at most (the test took < 2 s)
            assert elapsed < 2.0 and 5 <= len(accepted) <= 8
        counter = f"{prefix}ctr:hub:submit-rate:{token_label(TOKEN)}"
        assert any(counter in key for key in await _keys(stores[0], prefix))
    finally:
        for node in nodes:  # persist before the stores close, not against closed ones
            await node.hub.shutdown(grace_s=0.5)
        for store in stores:
            await store.close()
        delete_prefix(f"{redis_base_url}/14", prefix)


async def _keys(store: RedisStore, prefix: str) -> list[str]:
    client = store._client
    assert client is not None
    return [k.decode() if isinstance(k, bytes) else k async for k in client.scan_iter(f"{prefix}*")]
