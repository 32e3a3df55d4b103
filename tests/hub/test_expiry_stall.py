"""Session expiry after the TTL (fake clocks) and the send-stall (``send_timeout_s``) 4003."""

from __future__ import annotations

import asyncio
import base64
import json
import socket

import websockets

from bridge.hub.config import HubConfig
from bridge.hub.persist import WriteBehind
from bridge.hub.registry import SessionRegistry
from bridge.store.memory import MemoryStore
from engine.types import Delta
from tests.hub.conftest import TOKEN, UNIT, StartHub, eventually, recv
from tests.hub.fakes import FakeClock

IMAGE = base64.b64encode(b"\x89PNG fake image").decode()
TOPIC = "chat:feishu:expiry"


def test_registry_forgets_a_detached_session_only_after_the_ttl() -> None:
    clock, wall = FakeClock(), FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=wall)
    cfg = HubConfig(tokens=frozenset({"t"}), session_ttl_s=60.0)
    registry = SessionRegistry(cfg, store, WriteBehind(store, 60.0, wall), clock, wall)
    attached = registry.new_session("tok-a", admin=False)
    attached.conn = object()  # a live connection: never expires, however long
    away = registry.new_session("tok-a", admin=False)
    registry.add_topic(away, TOPIC)
    away.detached_at = clock()
    clock.advance(60.0)
    registry.sweep()
    assert registry.sessions.keys() == {attached.id, away.id}  # exactly the TTL: still kept
    clock.advance(0.001)
    registry.sweep()
    assert registry.sessions.keys() == {attached.id}
    assert registry.members(TOPIC) is None and registry.subs_dirty
    assert away not in registry.writes.dirty


async def test_expired_session_is_dropped_its_job_cancelled_and_resume_gets_a_new_one(
    start_hub: StartHub,
) -> None:
    clock, wall = FakeClock(), FakeClock(1_700_000_000.0)
    store = MemoryStore(clock=wall)
    run = await start_hub(store=store, clock=clock, wall=wall, session_ttl_s=30.0)
    run.engine.gate = asyncio.Event()  # the job stays live while the client is away
    ws, welcome = await run.hello()
    await ws.send(json.dumps({"type": "subscribe", "topic": TOPIC}))
    await recv(ws, "subscribed")
    await ws.send(json.dumps({"type": "submit", "id": "j1", "prompt": "p", "image": IMAGE}))
    assert (await recv(ws, "event"))["kind"] == "queued"
    await ws.close()
    await eventually(lambda: not run.hub.connections())
    await run.hub.flush()
    assert run.hub.session_count == 1
    [handle] = run.engine.handles.values()

    clock.advance(29.0)
    wall.advance(29.0)
    await run.hub.flush()
    assert run.hub.session_count == 1  # detached, but within the TTL: a resume would find it
    clock.advance(2.0)
    wall.advance(2.0)
    await eventually(lambda: run.hub.session_count == 0)  # the background sweep expired it
    assert handle.cancelled
    assert run.hub._registry.members(TOPIC) is None
    await run.hub.publish(TOPIC, "im-1", Delta("nobody listens"))  # routes nowhere, no error

    _, again = await run.hello(session=welcome["session"], last_seq=3)
    assert again["resumed"] is False and again["session"] != welcome["session"]
    assert again["missed"] == 0


async def test_a_write_stalled_past_send_timeout_closes_4003(start_hub: StartHub) -> None:
    # The queue bound is far away and the pong deadline later than the stall: only the send
    # deadline can close this connection.
    run = await start_hub(
        send_queue_max=100_000,
        send_timeout_s=1 * UNIT,
        heartbeat_s=10 * UNIT,
        heartbeat_timeout_s=10 * UNIT,
        replay_max_bytes=64 * 2**20,
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", run.server.port))
    ws = await websockets.connect(
        run.url, sock=sock, ping_interval=None, compression=None, max_queue=1, max_size=None
    )
    run.clients.append(ws)
    await ws.send(json.dumps({"type": "hello", "token": TOKEN}))
    welcome = await recv(ws, "welcome")
    await ws.send(json.dumps({"type": "subscribe", "topic": TOPIC}))
    await recv(ws, "subscribed")
    [conn] = run.hub._conns.values()
    big = "x" * 64 * 1024
    published = 0
    while conn.write_since is None:  # the client reads nothing more: the writer blocks
        await run.hub.publish(TOPIC, f"m{published}", Delta(big))
        published += 1
        await asyncio.sleep(0)
        assert published < 2000, "the writer never blocked"
    await eventually(lambda: not run.hub.connections(), within=10)
    assert run.metrics.ws_closes.labels(code="4003")._value.get() == 1
    assert run.metrics.ws_closes.labels(code="4002")._value.get() == 0
    assert len(conn.queue) < run.hub.cfg.send_queue_max
    ws.transport.abort()  # its buffers are full of frames it will never read
    # Nothing published was lost: a resume replays all of it.
    ws2, back = await run.hello(session=welcome["session"], last_seq=0, max_size=None)
    assert back["resumed"] is True and back["missed"] == 0
    seqs = [(await recv(ws2, "event"))["seq"] for _ in range(published)]
    assert seqs == list(range(1, published + 1))
