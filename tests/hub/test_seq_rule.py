"""The seq rule after a crash: a resume beyond the store's last seq never reuses a seq."""

from __future__ import annotations

import json

from bridge.hub import protocol as p
from bridge.hub.hub import MAX_SEQ_AHEAD
from bridge.hub.persist import OWNER_KEY
from bridge.hub.replay import ReplayBuffer
from bridge.hub.session import Session
from bridge.store.base import SessionRecord, StoredEvent
from bridge.store.memory import MemoryStore
from engine.types import Started
from tests.hub.conftest import TOKEN, StartHub, recv
from tests.hub.fakes import FakeClock
from tests.hub.test_ws import submit

TAIL = p.event_tail("j", Started())


def _session(clock: FakeClock, events: int) -> Session:
    session = Session(id="s1", owner="o", admin=False, replay=ReplayBuffer(100, 10**6, 3600.0))
    for _ in range(events):
        session.emit(TAIL, clock())
    return session


def test_advance_moves_the_counter_past_what_the_client_saw() -> None:
    clock = FakeClock()
    session = _session(clock, 5)
    assert session.advance(9)
    assert session.resume_from(9) == ([], 0)  # the client has 6..9 already: nothing is missed
    frame = json.loads(session.emit(TAIL, clock.advance(1)))
    assert frame["seq"] == 10
    record = session.record(clock())
    assert record.last_seq == 10 and record.first_seq == 10


def test_advance_is_a_no_op_at_or_below_the_last_seq() -> None:
    clock = FakeClock()
    session = _session(clock, 5)
    session.header_dirty = False
    assert not session.advance(5) and not session.advance(2)
    assert not session.header_dirty
    assert [json.loads(f)["seq"] for f in session.resume_from(2)[0]] == [3, 4, 5]


def test_advance_reports_missed_honestly_to_a_client_further_behind() -> None:
    clock = FakeClock()
    session = _session(clock, 5)
    session.advance(9)  # the previous holder numbered 6..9 but never stored them
    assert session.resume_from(3) == ([], 6)  # 4..9 are gone


def test_replay_buffer_advance_keeps_the_buffer_gap_free() -> None:
    buf = ReplayBuffer(10, 10**6, 60.0)
    for seq in (1, 2, 3):
        buf.append(StoredEvent(seq=seq, ts=0.0, frame="x"))
    buf.advance(7)
    assert len(buf) == 0 and buf.bytes == 0 and buf.first_seq == 8 and buf.last_seq == 7
    buf.append(StoredEvent(seq=8, ts=0.0, frame="y"))
    assert [e.seq for e in buf.since(7)[0]] == [8]


async def _stale_store(last_seq: int) -> MemoryStore:
    """A store as a kill -9 leaves it: the record stops at ``last_seq``, the client saw more."""
    from bridge.hub.config import token_label

    store = MemoryStore()
    events = [
        StoredEvent(seq=s, ts=0.0, frame=p.event_frame(s, TAIL)) for s in range(1, last_seq + 1)
    ]
    await store.save_session(
        SessionRecord(session_id="s_stale", last_seq=0, first_seq=1, updated_at=0.0), 60.0
    )
    await store.append_events("s_stale", events, 60.0)
    await store.set_value(OWNER_KEY + "s_stale", token_label(TOKEN), 60.0)
    return store


async def test_a_stale_store_and_a_client_ahead_give_fresh_higher_seqs(
    start_hub: StartHub,
) -> None:
    store = await _stale_store(3)
    run = await start_hub(store=store)
    ws, welcome = await run.hello(session="s_stale", last_seq=8)
    assert welcome["resumed"] is True and welcome["missed"] == 0
    await ws.send(submit("j2"))
    seqs = []
    while True:
        frame = await recv(ws, "event")
        seqs.append(frame["seq"])
        if frame["kind"] in ("done", "error"):
            break
    assert seqs == list(range(9, 9 + len(seqs)))
    await run.hub.flush()
    record = await store.load_session("s_stale")
    assert record is not None and record.last_seq == seqs[-1]
    assert [e.seq for e in record.events] == seqs  # the advanced counter reached the store


async def test_a_client_behind_the_stale_store_gets_a_normal_replay(start_hub: StartHub) -> None:
    store = await _stale_store(3)
    run = await start_hub(store=store)
    ws, welcome = await run.hello(session="s_stale", last_seq=1)
    assert welcome["resumed"] is True and welcome["missed"] == 0
    assert [(await recv(ws, "event"))["seq"] for _ in range(2)] == [2, 3]


async def test_an_impossible_last_seq_gets_a_new_session(start_hub: StartHub) -> None:
    store = await _stale_store(3)
    run = await start_hub(store=store)
    too_far = 3 + run.hub.cfg.replay_max_events + MAX_SEQ_AHEAD + 1
    _, welcome = await run.hello(session="s_stale", last_seq=too_far)
    assert welcome["resumed"] is False and welcome["session"] != "s_stale"
    # The refused session is intact: a plausible resume still works.
    _, again = await run.hello(session="s_stale", last_seq=3 + run.hub.cfg.replay_max_events)
    assert again["resumed"] is True and again["session"] == "s_stale"
