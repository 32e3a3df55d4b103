"""The hub's per-event and per-connection state stays lean: nothing the GC must walk per event,
no containers an idle connection does not use (see docs/benchmarks.md, fan-out and idle)."""

from __future__ import annotations

import asyncio
import gc
from collections import deque
from typing import Any

import pytest

from bridge.hub.config import HubConfig
from bridge.hub.connection import ConnectionCore
from bridge.hub.frame_gate import FrameGate
from bridge.hub.inflight import InflightBudget
from bridge.hub.persist import FLUSH_CONCURRENCY, WriteBehind
from bridge.hub.replay import ReplayBuffer
from bridge.hub.session import Session
from bridge.hub.ws import WRITE_HIGH_WATER, Connection
from bridge.store.base import StoredEvent
from bridge.store.memory import MemoryStore

TAIL = '"id":"j","kind":"delta","text":"hi","topic":"chat:a:b"}'


def containers(obj: object) -> list[object]:
    """The sets, dicts and deques ``obj`` refers to directly."""
    return [r for r in gc.get_referents(obj) if isinstance(r, set | dict | deque)]


def test_replay_entries_are_untracked_atoms_and_seqs_are_implicit() -> None:
    buf = ReplayBuffer(100, 10**6, 60.0)
    session = Session(id="s", owner="o", admin=False, replay=buf)
    frames = [session.emit(TAIL, wall_now=1000.0 + i) for i in range(50)]
    gc.collect()
    entries = list(buf.entries())
    assert len(entries) == 100  # a frame and a time per event, no event objects
    assert not any(gc.is_tracked(e) for e in entries)
    expected = [StoredEvent(seq, 999.0 + seq, frames[seq - 1]) for seq in (48, 49, 50)]
    assert buf.since(47) == (expected, 0)
    assert session.resume_from(48) == (frames[48:], 0)


def test_write_behind_batches_hold_no_event_objects() -> None:
    session = Session(id="s", owner="o", admin=False, replay=ReplayBuffer(100, 10**6, 60.0))
    for _ in range(10):
        session.emit(TAIL, wall_now=5.0)
    batch = session.take_batch(6.0)
    assert batch is not None and batch.first_seq == 1
    gc.collect()
    held = batch.frames + batch.stamps
    assert len(held) == 20 and not any(gc.is_tracked(x) for x in held)
    assert [ev.seq for ev in batch.events] == list(range(1, 11))
    assert batch.events[0] == StoredEvent(1, 5.0, '{"type":"event","seq":1,' + TAIL)
    session.batch_done(batch)
    for i in range(3):
        session.emit(TAIL, wall_now=7.0 + i)
    later = session.take_batch(8.0)  # only the new events, taken from the buffer's newest end
    assert later is not None and later.first_seq == 11 and later.stamps == [7.0, 8.0, 9.0]
    assert [ev.seq for ev in later.events] == [11, 12, 13]
    small = Session(id="t", owner="o", admin=False, replay=ReplayBuffer(5, 10**6, 60.0))
    for _ in range(8):
        small.emit(TAIL, wall_now=1.0)
    bounded = small.take_batch(2.0)  # 1-3 fell out of the buffer before the flush
    assert bounded is not None and [ev.seq for ev in bounded.events] == [4, 5, 6, 7, 8]


def test_an_idle_replay_buffer_holds_no_deque_and_gives_it_back_when_acked() -> None:
    buf = ReplayBuffer(10, 10**6, 60.0)
    assert containers(buf) == [] and len(buf) == 0 and buf.oldest_seq == 1
    buf.push("a", 1.0)
    buf.push("b", 2.0)
    assert len(containers(buf)) == 2 and buf.oldest_seq == 1
    buf.ack(2)
    assert containers(buf) == [] and buf.first_seq == 3 and buf.since(0) == ([], 2)
    buf.push("c", 3.0)
    buf.trim_age(now=100.0)
    assert containers(buf) == [] and buf.first_seq == 4 and buf.last_seq == 3


def test_a_new_session_makes_its_sets_only_when_used() -> None:
    session = Session(id="s", owner="o", admin=False, replay=ReplayBuffer(10, 10**6, 60.0))
    session.emit(TAIL, wall_now=1.0)
    assert session.take_batch(2.0) is not None  # writes the header: reads topics and open jobs
    assert not session.knows_job("j") and not session.follows_topics
    assert sorted(session.topic_names) == []  # what the dashboard reads
    assert containers(session) == []
    session.topics.add("chat:a:b")
    assert session.follows_topics and session.topics == {"chat:a:b"}
    assert list(session.topic_names) == ["chat:a:b"]
    assert session.open_job("j1") and session.open_jobs == {"j1"}
    session.emit(TAIL, wall_now=3.0, closes="j1")
    assert session.open_jobs == set() and session.header_dirty
    session.pending_orphans.intersection_update({"x"})  # a real set, as callers expect
    assert session.pending_orphans == set()


class _FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0
        self.written: list[bytes] = []

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _FakeWs:
    closed = False
    close_code = None

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_str(self, text: str) -> None:
        await asyncio.sleep(0)
        self.sent.append(text)


async def test_a_connection_makes_its_send_queue_only_while_frames_wait() -> None:
    transport = _FakeTransport()
    ws: Any = _FakeWs()
    core = ConnectionCore("c", HubConfig(), 0.0)
    conn = Connection("c", ws, core, "?", 16, transport, 1 << 20)  # type: ignore[arg-type]
    assert conn.send("fast") and transport.written == [b"\x81\x04fast"]
    assert conn.queue == () and not any(isinstance(r, deque) for r in gc.get_referents(conn))
    transport.buffered = WRITE_HIGH_WATER  # the socket is behind: frames queue for the writer
    assert conn.send("one") and conn.send("two")
    assert list(conn.queue) == ["one", "two"] and conn.queued_chars == 6
    assert conn.writer is not None
    await conn.writer
    assert ws.sent == ["one", "two"] and conn.queue == () and conn.queued_chars == 0
    assert not any(isinstance(r, deque) for r in gc.get_referents(conn))


def test_text_frames_use_the_right_header_for_each_length() -> None:
    from bridge.hub.ws import text_frame

    assert text_frame("x" * 125)[:2] == b"\x81\x7d"
    assert text_frame("x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame("é")[:2] == b"\x81\x02"  # the length is in bytes, not characters
    assert text_frame("x" * 70_000)[:2] == b"\x81\x7f" and len(text_frame("x" * 70_000)) == 70_010


def test_a_frame_gate_holds_no_deque_while_nothing_is_reserved() -> None:
    class Inner:
        def feed_data(self, data: Any) -> tuple[bool, bytes]:
            return False, b""

        def feed_eof(self) -> None:
            return None

    budget = InflightBudget(1 << 20)
    gate = FrameGate(Inner(), budget, max_frame_bytes=1 << 20)
    assert gate.reserved == ()
    gate.feed_data(b"\x81\x83abcd" + bytes(3))  # a masked 3-byte text frame
    assert list(gate.reserved) == [3] and budget.used == 3
    gate.done()
    assert gate.reserved == () and budget.used == 0


class _CountingStore(MemoryStore):
    def __init__(self, fail_for: str | None = None) -> None:
        super().__init__()
        self.fail_for = fail_for
        self.calls = 0

    async def append_events(self, session_id: str, events: Any, ttl_s: float) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        if session_id == self.fail_for:
            raise ConnectionError("store down for this one")
        await super().append_events(session_id, events, ttl_s)


@pytest.mark.parametrize("count", [1, FLUSH_CONCURRENCY + 37])
async def test_write_behind_workers_write_every_session(count: int) -> None:
    store = _CountingStore()
    writes = WriteBehind(store, 60.0, lambda: 100.0)
    sessions = []
    for i in range(count):
        session = Session(id=f"s{i}", owner="o", admin=False, replay=ReplayBuffer(9, 10**6, 60.0))
        session.emit(TAIL, wall_now=1.0)
        session.emit(TAIL, wall_now=2.0)
        writes.mark(session)
        sessions.append(session)
    assert await writes.flush()
    assert store.calls == count and writes.written == count and not writes.dirty
    record = await store.load_session(f"s{count - 1}")
    assert record is not None and [ev.seq for ev in record.events] == [1, 2]
    assert not any(s.needs_save() for s in sessions)


async def test_a_failed_flush_gives_every_unwritten_batch_back() -> None:
    store = _CountingStore(fail_for="s3")
    writes = WriteBehind(store, 60.0, lambda: 100.0)
    sessions = []
    for i in range(FLUSH_CONCURRENCY * 2):
        session = Session(id=f"s{i}", owner="o", admin=False, replay=ReplayBuffer(9, 10**6, 60.0))
        session.emit(TAIL, wall_now=1.0)
        writes.mark(session)
        sessions.append(session)
    assert not await writes.flush()
    unwritten = [s for s in sessions if s.needs_save()]
    assert sessions[3] in unwritten and set(unwritten) == writes.dirty
    assert writes.written + len(unwritten) == len(sessions)
    store.fail_for = None
    assert await writes.flush()
    assert not any(s.needs_save() for s in sessions)
    record = await store.load_session("s3")
    assert record is not None and [ev.seq for ev in record.events] == [1]
