"""Sessions moving between two hubs sharing one store and one LocalBus (two nodes, one process)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from bridge.cluster.bus import LocalBus
from bridge.fanout import Origin, encode_session_entry
from bridge.hub.handoff import CLAIMS_CHANNEL, Claim, decode, node_channel
from bridge.hub.persist import NODE_KEY
from bridge.store.memory import MemoryStore
from engine.types import Delta
from tests.hub.conftest import (
    ADMIN,
    TOKEN,
    Running,
    StartHub,
    close_code,
    crash,
    eventually,
    recv,
)
from tests.hub.fakes import FakeEngine, SlowEngine
from tests.hub.test_ws import submit

TERMINAL = ("done", "error")


async def two_nodes(
    start_hub: StartHub,
    pieces: int = 300,
    delay_s: float = 0.004,
    bus: LocalBus | None = None,
    **overrides: Any,
) -> tuple[Running, Running, MemoryStore, LocalBus]:
    store, bus = MemoryStore(), bus or LocalBus()
    nodes = [
        await start_hub(
            store=store,
            bus=bus,
            node_id=name,
            engine=SlowEngine(pieces=pieces, delay_s=delay_s),
            **overrides,
        )
        for name in ("A", "B")
    ]
    return nodes[0], nodes[1], store, bus


async def resume_on(run: Running, sid: str, last_seq: int) -> Any:
    """Resume session ``sid`` on ``run`` (a move); it must come back whole. The new socket."""
    ws, welcome = await run.hello(session=sid, last_seq=last_seq)
    assert welcome["resumed"] is True and welcome["missed"] == 0
    return ws


async def long_job_moved(a: Running, b: Running) -> tuple[str, list[dict[str, Any]], Any]:
    """A session on A runs job ``long``; 40 events in, the client resumes it on B.

    Returns the session id, the events seen so far and the socket on B.
    """
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await ws.send(submit("long"))
    got: list[dict[str, Any]] = []
    await take(ws, got, 40)
    await ws.close()
    return sid, got, await resume_on(b, sid, got[-1]["seq"])


async def take(ws: Any, got: list[dict[str, Any]], count: int) -> None:
    """Read up to ``count`` more events into ``got`` (fewer when the job ends)."""
    for _ in range(count):
        frame = await recv(ws, "event")
        got.append(frame)
        if frame["kind"] in TERMINAL:
            return


def check_stream(got: list[dict[str, Any]], pieces: int) -> None:
    """Seqs 1..n with no gap or duplicate, and the job's events in order ending with done."""
    assert [f["seq"] for f in got] == list(range(1, len(got) + 1))
    assert [f["kind"] for f in got[:2]] == ["queued", "started"]
    deltas = [f["text"] for f in got if f["kind"] == "delta"]
    assert deltas == [f"d{i} " for i in range(pieces)]
    assert got[-1]["kind"] == "done" and got[-1]["text"] == "".join(deltas)


async def test_a_job_follows_its_session_to_another_node_and_back(start_hub: StartHub) -> None:
    a, b, store, _ = await two_nodes(start_hub)
    sid, got, ws_b = await long_job_moved(a, b)
    assert await store.get_value(NODE_KEY + sid) == "B"
    await take(ws_b, got, 100)
    assert got[-1]["kind"] not in TERMINAL, "the job must still run on A (make it longer)"
    # Back to A while the client is still connected to B: B closes it with 4005.
    ws_a = await resume_on(a, sid, got[-1]["seq"])
    assert await close_code(ws_b) == 4005
    await take(ws_a, got, 10_000)
    check_stream(got, 300)
    assert a.hub.session_count == 1 and b.hub.session_count == 0


async def test_a_job_that_ends_while_the_client_moves_is_replayed_on_the_new_node(
    start_hub: StartHub,
) -> None:
    a, b, _, _ = await two_nodes(start_hub, pieces=30, delay_s=0.002)
    ws, welcome = await a.hello()
    await ws.send(submit("j"))
    got: list[dict[str, Any]] = []
    await take(ws, got, 3)
    await ws.close()
    # Node A released nothing yet: wait until the job is over there, then resume on B.
    await eventually(lambda: not a.hub._registry.sessions[welcome["session"]].jobs)
    ws_b = await resume_on(b, welcome["session"], got[-1]["seq"])
    await take(ws_b, got, 10_000)
    check_stream(got, 30)


async def test_a_connected_client_is_taken_over_with_4005(start_hub: StartHub) -> None:
    a, b, _, _ = await two_nodes(start_hub)
    ws_a, welcome = await a.hello()
    ws_b, welcome_b = await b.hello(session=welcome["session"], last_seq=0)
    assert welcome_b["resumed"] is True
    assert await close_code(ws_a) == 4005
    await ws_b.send(json.dumps({"type": "ping", "ts": 1}))
    assert (await recv(ws_b, "pong"))["ts"] == 1


async def test_topic_events_reach_the_session_once_on_its_current_node(
    start_hub: StartHub,
) -> None:
    a, b, _, _ = await two_nodes(start_hub)
    ws, welcome = await a.hello()
    await ws.send(json.dumps({"type": "subscribe", "topic": "chat:feishu:c1"}))
    await recv(ws, "subscribed")
    await ws.close()
    ws_b, _ = await b.hello(session=welcome["session"], last_seq=0)
    for node in (a, b):  # the cluster fan-out hands every IM event to every node's hub
        await node.hub.publish("chat:feishu:c1", "im-1", Delta("hello"))
    frame = await recv(ws_b, "event")
    assert frame["topic"] == "chat:feishu:c1" and frame["seq"] == 1
    await ws_b.send(json.dumps({"type": "ping", "ts": 2}))
    assert (await recv(ws_b, "pong", "event"))["type"] == "pong"  # no second copy
    assert a.hub._registry.members("chat:feishu:c1") is None


async def test_a_dead_holder_costs_one_deadline_then_the_store_is_used(
    start_hub: StartHub,
) -> None:
    a, b, store, _ = await two_nodes(start_hub, handoff_timeout_s=0.1)
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await a.hub.flush()
    await ws.close()
    assert a.hub._moves is not None
    await a.hub._moves.handoff.stop(0.1)  # node A is gone from the bus: it never answers
    assert await store.get_value(NODE_KEY + sid) == "A"
    started = time.monotonic()
    _, welcome_b = await b.hello(session=sid, last_seq=0)
    assert welcome_b["resumed"] is True
    assert time.monotonic() - started >= 0.1


async def test_a_live_node_that_no_longer_holds_the_session_answers_at_once(
    start_hub: StartHub,
) -> None:
    a, b, store, _ = await two_nodes(start_hub, handoff_timeout_s=30.0)
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await a.hub.flush()
    await ws.close()
    a.hub._registry.release(sid)  # as after a restart: the store still names A
    assert await store.get_value(NODE_KEY + sid) == "A"
    started = time.monotonic()
    _, welcome_b = await b.hello(session=sid, last_seq=0)
    assert welcome_b["resumed"] is True and time.monotonic() - started < 10.0


async def test_another_token_cannot_move_a_session(start_hub: StartHub) -> None:
    a, b, _, _ = await two_nodes(start_hub)
    ws_a, welcome = await a.hello()
    _, stranger = await b.hello(token=ADMIN, session=welcome["session"], last_seq=0)
    assert stranger["resumed"] is False and stranger["session"] != welcome["session"]
    await ws_a.send(json.dumps({"type": "ping", "ts": 3}))
    assert (await recv(ws_a, "pong"))["ts"] == 3  # still connected on A
    assert welcome["session"] in a.hub._registry.sessions


async def test_hostile_bus_messages_are_ignored(start_hub: StartHub) -> None:
    a, _, _, bus = await two_nodes(start_hub)
    ws, welcome = await a.hello()
    for junk in (
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"t":"claim"}',
        b'{"t":"claim","sid":"","node":"X","req":"r"}',
        json.dumps({"t": "event", "sid": welcome["session"], "tail": 5}).encode(),
        json.dumps({"t": "released", "sid": "s", "node": "X", "req": "r", "last_seq": -1}).encode(),
        json.dumps({"t": "nope", "sid": "s", "node": "X", "req": "r"}).encode(),
    ):
        await bus.publish(CLAIMS_CHANNEL, junk)
        await bus.publish(node_channel("A"), junk)
    # Claims for a session A does not hold, or by a token that does not own it, change nothing.
    for sid, owner in (("s_unknown", "tok-x"), (welcome["session"], "tok-not-the-owner")):
        claim = {"t": "claim", "sid": sid, "node": "X", "req": "r", "owner": owner}
        await bus.publish(CLAIMS_CHANNEL, json.dumps(claim).encode())
    await ws.send(json.dumps({"type": "ping", "ts": 4}))
    assert (await recv(ws, "pong"))["ts"] == 4


@pytest.mark.parametrize(
    "payload",
    [
        b"null",
        b'{"t":"event","sid":"s","tail":"x"}',
        b'{"t":"claim","sid":"s","node":1}',
        b'{"t":"released","sid":"s","node":"A","req":"r","orphans":"J"}',
        b'{"t":"released","sid":"s","node":"A","req":"r","orphans":[1]}',
        # Cancels and events travel on the cluster's event log now, never on the bus.
        b'{"t":"cancel","sid":"s","job":"J","owner":"tok-1","node":"B"}',
        b'{"t":"released","sid":"s","node":"A","req":"r","cursor":7}',
        b'{"t":"released","sid":"s","node":"A","req":"r","cursor":"x-y"}',
        b'{"t":"released","sid":"s","node":"A","req":"r","cursor":""}',
    ],
)
def test_decode_refuses_malformed_messages(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode(payload)


def test_decode_reads_a_claim() -> None:
    msg = decode(b'{"t":"claim","sid":"s","node":"B","req":"r1","owner":"tok-1","expect":"A"}')
    assert msg == Claim("s", "B", "r1", "tok-1", "A")


def test_decode_reads_the_cursor_of_a_release() -> None:
    from bridge.hub.handoff import Answer

    msg = decode(b'{"t":"released","sid":"s","node":"A","req":"r","last_seq":4,"cursor":"17-3"}')
    assert msg == Answer("released", "s", "A", "r", 4, (), "17-3")


def test_decode_reads_an_answer_with_or_without_orphans() -> None:
    from bridge.hub.handoff import Answer

    msg = decode(b'{"t":"released","sid":"s","node":"A","req":"r","last_seq":4,"orphans":["J"]}')
    assert msg == Answer("released", "s", "A", "r", 4, ("J",))
    old = decode(b'{"t":"released","sid":"s","node":"A","req":"r","last_seq":4}')
    assert old == Answer("released", "s", "A", "r", 4, ())


async def test_single_node_hub_has_no_cluster_state(start_hub: StartHub) -> None:
    run = await start_hub()
    ws, welcome = await run.hello(token=TOKEN)
    await run.hub.flush()
    assert run.hub._moves is None
    assert await run.store.get_value(NODE_KEY + welcome["session"]) is None
    await ws.close()


async def test_a_holder_that_could_not_store_its_last_events_never_has_its_seqs_reused(
    start_hub: StartHub,
) -> None:
    from bridge.hub.handoff import Answer

    a, _, store, _ = await two_nodes(start_hub)
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await ws.close()
    await a.hub.flush()
    session = a.hub._registry.sessions[sid]
    assert a.hub._moves is not None
    # As if node B held the session up to seq 9 but its store write failed before it let go.
    a.hub._moves.adopted(sid, session, Answer("released", sid, "B", "r", last_seq=9))
    assert session.last_seq == 9 and session.resume_from(3) == ([], 6)
    a.hub.emit_into(session, '"id":"x","kind":"started"}')
    assert session.last_seq == 10
    await a.hub.flush()
    record = await store.load_session(sid)
    assert record is not None and record.last_seq == 10


async def test_a_job_still_running_on_the_old_node_after_a_move_is_no_orphan(
    start_hub: StartHub,
) -> None:
    a, b, store, _ = await two_nodes(start_hub)
    sid, got, ws_b = await long_job_moved(a, b)
    session_b = b.hub._registry.sessions[sid]
    assert session_b.open_jobs == {"long"} and not session_b.pending_orphans
    await take(ws_b, got, 10_000)
    check_stream(got, 300)  # no error event: the job's own done, forwarded once, ends it
    assert [f["kind"] for f in got].count("error") == 0
    assert session_b.open_jobs == set()  # the forwarded terminal event closed it
    await b.hub.flush()
    record = await store.load_session(sid)
    assert record is not None and record.open_jobs == []
    ws_again, _ = await b.hello(session=sid, last_seq=got[-1]["seq"])
    await ws_again.send(json.dumps({"type": "ping", "ts": 5}))
    assert (await recv(ws_again, "pong", "event"))["type"] == "pong"


async def test_a_restarted_holder_that_releases_a_session_names_the_jobs_lost_in_its_crash(
    start_hub: StartHub,
) -> None:
    store, bus = MemoryStore(), LocalBus()
    a, b, _ = await stuck_nodes(start_hub, store, bus)
    ws, welcome = await a.hello()
    sid = welcome["session"]
    await ws.send(json.dumps({"type": "subscribe", "topic": "chat:feishu:c1"}))
    await recv(ws, "subscribed")
    await ws.send(submit("J"))
    assert [(await recv(ws, "event"))["kind"] for _ in range(2)] == ["queued", "started"]
    await a.hub.flush()
    await a.hub._registry.save_subscribed()
    await crash(a)
    # Node A comes back and preloads the session (it follows a topic); the client goes to B.
    a2 = await start_hub(store=store, bus=bus, node_id="A")
    assert sid in a2.hub._registry.sessions
    ws_b = await resume_on(b, sid, 2)
    error = await recv(ws_b, "event")
    assert (error["seq"], error["id"]) == (3, "J")
    assert (error["kind"], error["code"]) == ("error", "internal")
    await ws_b.send(json.dumps({"type": "ping", "ts": 6}))
    assert (await recv(ws_b, "pong", "event"))["type"] == "pong"
    assert b.hub._registry.sessions[sid].open_jobs == set()


# --- cancel of a job that runs on another node than the one holding its session -------------


async def stuck_nodes(
    start_hub: StartHub, store: MemoryStore | None = None, bus: LocalBus | None = None
) -> tuple[Running, Running, FakeEngine]:
    """Nodes A and B on one store and bus; A's jobs stop after ``started`` until cancelled."""
    store, bus = store or MemoryStore(), bus or LocalBus()
    stuck = FakeEngine()
    stuck.gate = asyncio.Event()  # never set: a job waits for its first delta until cancelled
    a = await start_hub(store=store, bus=bus, node_id="A", engine=stuck)
    b = await start_hub(store=store, bus=bus, node_id="B")
    return a, b, stuck


async def started_on(run: Running, job_id: str) -> tuple[str, Any]:
    """A new session on ``run`` with job ``job_id`` started (seqs 1, 2); its id and socket."""
    ws, welcome = await run.hello()
    await ws.send(submit(job_id))
    assert [(await recv(ws, "event"))["kind"] for _ in range(2)] == ["queued", "started"]
    return welcome["session"], ws


def cancel(job_id: str) -> str:
    return json.dumps({"type": "cancel", "id": job_id})


async def nothing_more(ws: Any, ts: int) -> None:
    """The next frame after a ping of ours is its pong: no stray event or error came first."""
    await ws.send(json.dumps({"type": "ping", "ts": ts}))
    assert await recv(ws, "pong", "event", "error") == {"type": "pong", "ts": ts}


def check_cancelled(frame: dict[str, Any], seq: int, job_id: str) -> None:
    assert frame["type"] == "event", frame
    assert (frame["seq"], frame["id"], frame["kind"]) == (seq, job_id, "error")
    assert frame["code"] == "cancelled"


async def test_a_cancel_on_the_new_node_stops_the_job_still_running_on_the_old_one(
    start_hub: StartHub,
) -> None:
    a, b, stuck = await stuck_nodes(start_hub)
    sid, ws = await started_on(a, "J")
    await ws.close()
    ws_b = await resume_on(b, sid, 2)
    session_b = b.hub._registry.sessions[sid]
    assert session_b.open_jobs == {"J"} and not session_b.jobs  # open, but it runs on A
    await ws_b.send(cancel("J"))
    check_cancelled(await recv(ws_b, "event", "error"), 3, "J")  # forwarded from A, once
    await nothing_more(ws_b, 7)
    assert stuck.handles[f"ws:{sid}:J"].cancelled
    await eventually(lambda: not a.hub._live.is_live(sid, "J"))
    assert session_b.open_jobs == set()
    await ws_b.send(cancel("J"))  # it has ended: unknown now, as on a single node
    assert (await recv(ws_b, "event", "error"))["code"] == "unknown_job"


async def test_a_cancel_after_the_session_came_back_stops_the_job_its_old_object_runs(
    start_hub: StartHub,
) -> None:
    a, b, stuck = await stuck_nodes(start_hub)
    sid, ws = await started_on(a, "J")
    await ws.close()
    await b.hello(session=sid, last_seq=2)
    ws_a, welcome_a = await a.hello(session=sid, last_seq=2)  # back on A: a new Session object
    assert welcome_a["resumed"] is True and "J" not in a.hub._registry.sessions[sid].jobs
    await ws_a.send(cancel("J"))
    check_cancelled(await recv(ws_a, "event", "error"), 3, "J")
    await nothing_more(ws_a, 8)
    assert stuck.handles[f"ws:{sid}:J"].cancelled


async def test_a_cancel_for_an_id_never_submitted_is_still_unknown_job_after_a_move(
    start_hub: StartHub,
) -> None:
    a, b, stuck = await stuck_nodes(start_hub)
    sid, ws = await started_on(a, "J")
    await ws.close()
    ws_b, _ = await b.hello(session=sid, last_seq=2)
    await ws_b.send(cancel("nope"))
    error = await recv(ws_b, "event", "error")
    assert (error["type"], error["code"], error["id"]) == ("error", "unknown_job", "nope")
    await nothing_more(ws_b, 9)
    assert not stuck.handles[f"ws:{sid}:J"].cancelled and a.hub._live.is_live(sid, "J")


async def test_a_cancel_on_the_event_log_stops_a_job_only_for_its_owner(
    start_hub: StartHub,
) -> None:
    a, _, stuck = await stuck_nodes(start_hub)
    sid, ws = await started_on(a, "J")
    owner = a.hub._registry.sessions[sid].owner
    handle = stuck.handles[f"ws:{sid}:J"]
    assert a.hub.fanout is not None
    events = a.hub.fanout._events
    seqs = iter(range(1, 100))

    async def request(owner: str, node: str) -> None:
        origin = Origin(node, "run-1" if node != "A" else a.hub.fanout._run, next(seqs))
        await events.append(encode_session_entry(origin, sid, cancel="J", owner=owner))

    for wrong, node in (("tok-not-the-owner", "X"), ("t\u00f6k", "X"), (owner, "A")):
        await request(wrong, node)  # a stranger's, a non-ASCII label, or A's own echo
    await nothing_more(ws, 10)
    assert not handle.cancelled and a.hub._live.is_live(sid, "J")
    await request(owner, "X")
    check_cancelled(await recv(ws, "event", "error"), 3, "J")
    assert handle.cancelled
