"""Functional tests: a real hub on loopback, real ``websockets`` clients."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import socket
import time
from typing import Any

import websockets

from bridge.hub.config import token_label
from engine.types import Delta, Done, Usage
from tests.hub.conftest import ADMIN, TOKEN, UNIT, StartHub, close_code, eventually, recv

IMAGE = base64.b64encode(b"\x89PNG fake image").decode()


def submit(job_id: str, image: str = IMAGE, **extra: Any) -> str:
    return json.dumps(
        {"type": "submit", "id": job_id, "prompt": "what is it?", "image": image, **extra}
    )


async def job_events(ws: Any, job_id: str) -> list[dict[str, Any]]:
    out = []
    while True:
        frame = await recv(ws, "event")
        if frame["id"] == job_id:
            out.append(frame)
            if frame["kind"] in ("done", "error"):
                return out


async def test_hello_submit_and_one_terminal_event(start_hub: StartHub) -> None:
    run = await start_hub()
    ws, welcome = await run.hello()
    assert welcome["resumed"] is False and welcome["missed"] == 0
    assert welcome["heartbeat"] == 3 * UNIT and welcome["session"].startswith("s_")
    await ws.send(submit("j1"))
    events = await job_events(ws, "j1")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["kind"] for e in events][:2] == ["queued", "started"]
    assert [e["kind"] for e in events].count("done") == 1
    deltas = "".join(e["text"] for e in events if e["kind"] == "delta")
    assert deltas == events[-1]["text"] and events[-1]["usage"]["prompt_tokens"] == 7
    assert run.engine.requests[0].image == base64.b64decode(IMAGE)
    info = run.hub.connections()[0]
    assert info.session == welcome["session"] and info.token_label == token_label(TOKEN)
    assert TOKEN not in repr(info)


async def test_unauthorized_hellos_close_4001(start_hub: StartHub) -> None:
    run = await start_hub()
    for first in (
        {"type": "hello", "token": "wrong"},
        {"type": "hello"},
        {"type": "ping"},
        "not json",
    ):
        ws = await run.connect()
        await ws.send(first if isinstance(first, str) else json.dumps(first))
        assert await close_code(ws) == 4001
    silent = await run.connect()  # says nothing: the hello deadline closes it
    started = time.monotonic()
    assert await close_code(silent) == 4001
    assert time.monotonic() - started >= 3 * UNIT * 0.9
    still = await run.connect()
    await still.send(b"\x00binary first")
    assert await close_code(still) == 4001


async def test_no_configured_tokens_refuse_every_hello(start_hub: StartHub) -> None:
    run = await start_hub(tokens=frozenset(), admin_tokens=frozenset())
    ws = await run.connect()
    await ws.send(json.dumps({"type": "hello", "token": ""}))
    assert await close_code(ws) == 4001


async def test_pings_arrive_at_the_interval_and_pongs_record_rtt(start_hub: StartHub) -> None:
    run = await start_hub()
    ws, _ = await run.hello()
    times = []
    for _ in range(3):
        ping = await recv(ws, "ping")
        times.append(time.monotonic())
        await ws.send(json.dumps({"type": "pong", "ts": ping["ts"]}))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(3 * UNIT * 0.9 <= gap <= 3 * UNIT + 1.0 for gap in gaps), gaps
    await eventually(lambda: run.hub.connections()[0].rtt_ms is not None)
    info = run.hub.connections()[0]
    assert info.last_pong_at is not None and 0 <= (info.rtt_ms or 0) < 1000
    # Each answered ping is one observation of the RTT histogram (docs/dashboard.md).
    registry = run.metrics.registry
    await eventually(
        lambda: registry.get_sample_value("bridge_ws_heartbeat_rtt_seconds_count") == 3
    )
    # Client pings and protocol-level pings are answered too.
    await ws.send(json.dumps({"type": "ping", "ts": 5}))
    assert await recv(ws, "pong") == {"type": "pong", "ts": 5}
    pong_waiter = await ws.ping(b"x")
    async with asyncio.timeout(5):
        await pong_waiter


async def test_a_prompt_pong_keeps_the_ping_interval_free_of_the_pong_deadline(
    start_hub: StartHub,
) -> None:
    # Regression: the wheel kept the pong deadline after the pong came, so every ping went out
    # heartbeat + heartbeat_timeout after the previous one (55 s instead of 45 s by default).
    run = await start_hub(heartbeat_s=3 * UNIT, heartbeat_timeout_s=30 * UNIT)
    ws, _ = await run.hello()
    times = []
    for _ in range(3):
        ping = await recv(ws, "ping", within=10)
        times.append(time.monotonic())
        await ws.send(json.dumps({"type": "pong", "ts": ping["ts"]}))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(3 * UNIT * 0.9 <= gap < 15 * UNIT for gap in gaps), gaps


async def test_silent_client_is_closed_4002_within_interval_plus_deadline(
    start_hub: StartHub,
) -> None:
    run = await start_hub()
    ws, _ = await run.hello()
    started = time.monotonic()
    ping = await recv(ws, "ping")
    assert ping["type"] == "ping"
    code = await close_code(ws)  # reads on, never answers
    elapsed = time.monotonic() - started
    assert code == 4002
    assert elapsed <= 5 * UNIT + 1.0, elapsed
    await eventually(lambda: not run.hub.connections())
    assert run.metrics.ws_heartbeat_timeouts._value.get() == 1


async def test_socket_open_but_silent_is_freed(start_hub: StartHub) -> None:
    run = await start_hub()
    ws, _ = await run.hello()  # and then never reads nor writes again
    started = time.monotonic()
    await eventually(lambda: not run.hub.connections(), within=5)
    assert time.monotonic() - started <= 5 * UNIT + 1.0
    assert run.metrics.ws_closes.labels(code="4002")._value.get() == 1
    del ws


async def test_resume_after_a_drop_mid_job_loses_and_duplicates_nothing(
    start_hub: StartHub,
) -> None:
    run = await start_hub(pieces=400)
    run.engine.gate = asyncio.Event()
    ws, welcome = await run.hello()
    await ws.send(submit("big"))
    seen: list[dict[str, Any]] = []
    while len(seen) < 2:  # queued, started
        seen.append(await recv(ws, "event"))
    run.engine.gate.set()
    while len(seen) < 100:
        seen.append(await recv(ws, "event"))
    ws.transport.abort()  # the network drops; the job goes on while the client is away
    await eventually(lambda: not run.hub.connections())
    session = run.hub._registry.sessions[welcome["session"]]
    await eventually(lambda: session.last_seq > 200)  # the job went on while the client was away
    ws2, again = await run.hello(session=welcome["session"], last_seq=seen[-1]["seq"])
    assert (
        again["resumed"] is True and again["missed"] == 0 and again["session"] == welcome["session"]
    )
    while seen[-1]["kind"] != "done":
        seen.append(await recv(ws2, "event"))
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, len(seen) + 1)) and len(seen) > 400
    text = "".join(e["text"] for e in seen if e["kind"] == "delta")
    assert text == seen[-1]["text"]


async def test_job_finished_while_away_is_replayed_and_missed_is_honest(
    start_hub: StartHub,
) -> None:
    run = await start_hub(replay_max_events=4)
    ws, welcome = await run.hello()
    await ws.close()
    await eventually(lambda: not run.hub.connections())
    await run.hub.publish("chat:feishu:none", "x", Delta("nobody listens"))  # no subscribers: no-op
    ws, _ = await run.hello(session=welcome["session"], last_seq=0)
    await ws.send(json.dumps({"type": "subscribe", "topic": "chat:feishu:oc_1"}))
    await recv(ws, "subscribed")
    await ws.close()
    await eventually(lambda: not run.hub.connections())
    for i in range(6):
        await run.hub.publish("chat:feishu:oc_1", "feishu:om_1", Delta(f"p{i}"))
    ws, back = await run.hello(session=welcome["session"], last_seq=0)
    assert back["resumed"] is True and back["missed"] == 2
    frames = [await recv(ws, "event") for _ in range(4)]
    assert [f["seq"] for f in frames] == [3, 4, 5, 6]
    assert all(f["topic"] == "chat:feishu:oc_1" for f in frames)


async def test_unknown_session_gets_a_new_one(start_hub: StartHub) -> None:
    run = await start_hub()
    _, welcome = await run.hello(session="s_unknown", last_seq=17)
    assert (
        welcome["resumed"] is False and welcome["session"] != "s_unknown" and welcome["missed"] == 0
    )


async def test_takeover_closes_the_older_connection(start_hub: StartHub) -> None:
    run = await start_hub()
    first, welcome = await run.hello()
    second, again = await run.hello(session=welcome["session"], last_seq=0)
    assert again["resumed"] is True
    assert await close_code(first) == 4005
    await run.hub.publish("chat:x:y", "j", Delta("nothing"))
    await second.send(json.dumps({"type": "ping"}))
    assert (await recv(second, "pong"))["type"] == "pong"
    assert len(run.hub.connections()) == 1


async def test_another_token_cannot_resume_a_session(start_hub: StartHub) -> None:
    run = await start_hub()
    _, welcome = await run.hello()
    _, other = await run.hello(token=ADMIN, session=welcome["session"], last_seq=0)
    assert other["resumed"] is False and other["session"] != welcome["session"]


async def test_slow_consumer_is_closed_4003_and_its_events_stay_replayable(
    start_hub: StartHub,
) -> None:
    run = await start_hub(
        send_queue_max=8, heartbeat_s=30.0, heartbeat_timeout_s=10.0, replay_max_bytes=64 * 2**20
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
    await ws.send(json.dumps({"type": "subscribe", "topic": "chat:feishu:busy"}))
    await recv(ws, "subscribed")
    big = "x" * 64 * 1024
    for i in range(400):  # the client reads nothing more
        await run.hub.publish("chat:feishu:busy", f"m{i}", Delta(big))
        await asyncio.sleep(0)
        if not run.hub.connections():
            break
    await eventually(lambda: not run.hub.connections(), within=10)
    assert run.metrics.ws_closes.labels(code="4003")._value.get() == 1
    ws.transport.abort()  # its buffers are full of frames it will never read
    ws2, back = await run.hello(session=welcome["session"], last_seq=0, max_size=None)
    assert back["resumed"] is True and back["missed"] == 0
    first = await recv(ws2, "event")
    assert first["seq"] == 1 and first["text"] == big
    ws2.transport.abort()  # the rest of the replay is not read


async def test_bad_input_gets_error_frames_and_others_carry_on(start_hub: StartHub) -> None:
    run = await start_hub(max_image_bytes=64)
    bystander, _ = await run.hello()
    ws, _ = await run.hello()
    cases: list[tuple[str | bytes, str]] = [
        ("{", "bad_frame"),
        ("[]", "bad_frame"),
        (json.dumps({"type": "teleport"}), "unknown_type"),
        (json.dumps({"type": "submit", "prompt": "p", "image": IMAGE}), "bad_frame"),
        (json.dumps({"type": "submit", "id": 5, "prompt": "p", "image": IMAGE}), "bad_frame"),
        (submit("b1", image="%%%not base64%%%"), "bad_image"),
        (submit("b2", image=base64.b64encode(b"z" * 65).decode()), "too_large"),
        (submit("b3", image="A" * 4000), "too_large"),
        (json.dumps({"type": "cancel", "id": "nope"}), "unknown_job"),
        (json.dumps({"type": "subscribe", "topic": "ops"}), "forbidden"),
        (json.dumps({"type": "ack", "seq": 99}), "bad_frame"),
        (json.dumps({"type": "hello", "token": TOKEN}), "bad_frame"),
        (b"\x01\x02", "bad_frame"),
    ]
    for frame, code in cases:
        await ws.send(frame)
        error = await recv(ws, "error")
        assert error["code"] == code, (frame, error)
    await ws.send(submit("dup"))
    await ws.send(submit("dup"))
    error = await recv(ws, "error")
    assert error["code"] == "duplicate_id" and error["id"] == "dup"
    run.engine.busy = True
    await ws.send(submit("busy1"))
    assert (await recv(ws, "error"))["code"] == "busy"
    run.engine.busy = False
    await ws.send(submit("busy1"))  # a refused id may be retried
    assert (await job_events(ws, "busy1"))[-1]["kind"] == "done"
    # Invalid UTF-8 in a text frame: the standard close code 1007, nothing else is hurt.
    await ws.send(b"\xff\xfe", text=True)
    assert await close_code(ws) == 1007
    await bystander.send(json.dumps({"type": "ping"}))
    assert (await recv(bystander, "pong"))["type"] == "pong"


async def test_oversized_frame_closes_4004(start_hub: StartHub) -> None:
    run = await start_hub(max_frame_bytes=1024)
    ws, _ = await run.hello()
    await ws.send("x" * 2000)
    assert await close_code(ws) == 4004


async def test_submit_rate_limit_and_frame_flood(start_hub: StartHub) -> None:
    run = await start_hub(submit_rate=1.0, submit_burst=3, frame_rate=5.0, frame_burst=40)
    ws, _ = await run.hello()
    for i in range(5):
        await ws.send(submit(f"r{i}"))
    errors: list[dict[str, Any]] = []
    done = 0
    while done < 3 or len(errors) < 2:
        frame = await recv(ws, "event", "error")
        if frame["type"] == "error":
            errors.append(frame)
        elif frame["kind"] == "done":
            done += 1
    assert [e["code"] for e in errors] == ["rate_limited", "rate_limited"]
    assert {e["id"] for e in errors} == {"r3", "r4"}
    for _ in range(60):
        await ws.send(json.dumps({"type": "ping"}))
    assert await close_code(ws) == 4008


async def test_connection_cap_per_token(start_hub: StartHub) -> None:
    run = await start_hub(max_connections_per_token=2)
    await run.hello()
    await run.hello()
    ws = await run.connect()
    await ws.send(json.dumps({"type": "hello", "token": TOKEN}))
    assert await close_code(ws) == 4008
    _, admin = await run.hello(token=ADMIN)  # other tokens are not affected
    assert admin["type"] == "welcome"


async def test_cancel_ends_the_job_with_one_error_event(start_hub: StartHub) -> None:
    run = await start_hub(pieces=5)
    run.engine.gate = asyncio.Event()
    ws, _ = await run.hello()
    await ws.send(submit("c1"))
    await recv(ws, "event")
    await ws.send(json.dumps({"type": "cancel", "id": "c1"}))
    events = await job_events(ws, "c1")
    assert events[-1]["kind"] == "error" and events[-1]["code"] == "cancelled"


async def test_topics_ops_kick_and_metrics(start_hub: StartHub) -> None:
    run = await start_hub()
    ws, _ = await run.hello()
    admin, _ = await run.hello(token=ADMIN)
    await ws.send(json.dumps({"type": "subscribe", "topic": "chat:feishu:oc_9"}))
    assert await recv(ws, "subscribed") == {"type": "subscribed", "topic": "chat:feishu:oc_9"}
    await admin.send(json.dumps({"type": "subscribe", "topic": "ops"}))
    await recv(admin, "subscribed")
    await run.hub.publish("chat:feishu:oc_9", "feishu:om_1", Done("ok", Usage(1, 1)))
    frame = await recv(ws, "event")
    assert (
        frame["topic"] == "chat:feishu:oc_9"
        and frame["id"] == "feishu:om_1"
        and frame["kind"] == "done"
    )
    await run.hub.publish_ops({"connections": 2})
    assert await recv(admin, "ops") == {"type": "ops", "data": {"connections": 2}}
    await ws.send(json.dumps({"type": "unsubscribe", "topic": "chat:feishu:oc_9"}))
    await recv(ws, "unsubscribed")
    info = {c.token_label: c for c in run.hub.connections()}
    assert info[token_label(ADMIN)].topics == ["ops"]
    assert run.metrics.ws_connections._value.get() == 2
    target = info[token_label(TOKEN)].id
    assert await run.hub.kick(target) is True
    assert await close_code(ws) == 4000
    assert await run.hub.kick(target) is False
    await eventually(lambda: run.metrics.ws_connections._value.get() == 1)
    await eventually(lambda: run.metrics.ws_frames.labels(direction="in")._value.get() >= 4)


async def test_shutdown_says_bye_closes_1001_and_sessions_resume_on_the_next_hub(
    start_hub: StartHub,
) -> None:
    run = await start_hub()
    ws, welcome = await run.hello()
    await ws.send(submit("s1"))
    events = await job_events(ws, "s1")
    await run.hub.shutdown(reason="deploy", grace_s=2.0)
    assert await recv(ws, "bye") == {"type": "bye", "reason": "deploy"}
    assert await close_code(ws) == 1001
    record = await run.store.load_session(welcome["session"])
    assert record is not None and record.last_seq == len(events)
    nxt = await start_hub(store=run.store)
    ws2, back = await nxt.hello(session=welcome["session"], last_seq=2)
    assert back["resumed"] is True and back["missed"] == 0
    replay = [await recv(ws2, "event") for _ in range(len(events) - 2)]
    assert [json.dumps(e) for e in replay] == [json.dumps(e) for e in events[2:]]
    await ws2.send(submit("s2"))
    more = await job_events(ws2, "s2")
    assert more[0]["seq"] == len(events) + 1


async def test_hub_refuses_new_connections_after_shutdown(start_hub: StartHub) -> None:
    run = await start_hub()
    await run.hub.shutdown(grace_s=0.1)
    try:
        await websockets.connect(run.url)
    except websockets.InvalidStatus as exc:
        assert exc.response.status_code == 503
    else:
        raise AssertionError("connected to a stopped hub")
