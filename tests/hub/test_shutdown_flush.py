"""Shutdown with many sessions: only unsaved ones are written, and writes run concurrently."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence

from bridge.hub import protocol as p
from bridge.hub.persist import FLUSH_CONCURRENCY, WriteBehind
from bridge.hub.replay import ReplayBuffer
from bridge.hub.session import Session
from bridge.store.base import SessionRecord, StoredEvent
from bridge.store.memory import MemoryStore
from engine.types import Started
from tests.hub.conftest import StartHub

TAIL = p.event_tail("j", Started())


class CountingStore(MemoryStore):
    """A memory store that counts session writes per session id, optionally slowly."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.writes: Counter[str] = Counter()
        self.in_flight = 0
        self.most_in_flight = 0

    async def _slow(self, session_id: str) -> None:
        self.writes[session_id] += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1

    async def set_value(self, key: str, value: str, ttl_s: float | None = None) -> None:
        if key.startswith("hub:session-"):
            await self._slow(key.rsplit(":", 1)[1])
        await super().set_value(key, value, ttl_s)

    async def save_session(self, record: SessionRecord, ttl_s: float) -> None:
        await self._slow(record.session_id)
        await super().save_session(record, ttl_s)

    async def append_events(
        self, session_id: str, events: Sequence[StoredEvent], ttl_s: float
    ) -> None:
        await self._slow(session_id)
        await super().append_events(session_id, events, ttl_s)

    async def trim_events(self, session_id: str, through_seq: int) -> None:
        await self._slow(session_id)
        await super().trim_events(session_id, through_seq)


async def test_shutdown_writes_only_sessions_with_unsaved_changes(start_hub: StartHub) -> None:
    store = CountingStore()
    run = await start_hub(store=store)
    registry = run.hub._registry
    sessions = [registry.new_session("tok-a", False) for _ in range(3000)]
    await run.hub.flush()
    assert len(store.writes) == 3000
    store.writes.clear()
    busy = sessions[::500]
    for session in busy:
        run.hub.emit_into(session, TAIL)
    await run.hub.shutdown(grace_s=0.5)
    assert set(store.writes) == {s.id for s in busy}
    for session in busy:
        record = await store.load_session(session.id)
        assert record is not None and record.last_seq == 1


async def test_a_flush_of_many_sessions_runs_writes_concurrently() -> None:
    store = CountingStore(delay_s=0.01)
    writes = WriteBehind(store, ttl_s=60.0, wall=lambda: 100.0)
    for i in range(2000):
        session = Session(id=f"s{i}", owner="o", admin=False, replay=ReplayBuffer(5, 10**4, 60.0))
        session.emit(TAIL, 100.0)
        writes.mark(session)
    started = time.monotonic()
    await writes.flush()
    elapsed = time.monotonic() - started
    # One write after another would take 2000 x 3 x 10 ms = 60 s (and hit the flush deadline).
    assert writes.failures == 0 and not writes.dirty
    assert store.most_in_flight == FLUSH_CONCURRENCY
    assert elapsed < 5.0
    assert sum(store.writes.values()) == 2000 * 3  # owner, events, header


async def test_the_shutdown_flush_continues_while_it_makes_progress() -> None:
    store = CountingStore(delay_s=0.05)
    writes = WriteBehind(store, ttl_s=60.0, wall=lambda: 100.0)
    for i in range(8 * FLUSH_CONCURRENCY):
        session = Session(id=f"s{i}", owner="o", admin=False, replay=ReplayBuffer(5, 10**4, 60.0))
        writes.mark(session)
    # 8 waves of writes (owner + header: 0.1 s each) need 0.8 s; one attempt may take 0.3 s.
    real = writes.flush

    async def short_flush(timeout_s: float = 0.3) -> bool:
        return await real(min(timeout_s, 0.3))

    writes.flush = short_flush  # type: ignore[method-assign]
    assert await writes.flush_all(timeout_s=30.0)
    assert writes.failures >= 1 and not writes.dirty
    assert writes.written == 8 * FLUSH_CONCURRENCY


async def test_the_shutdown_flush_gives_up_at_once_when_the_store_is_down() -> None:
    store = CountingStore()
    writes = WriteBehind(store, ttl_s=60.0, wall=lambda: 100.0)
    session = Session(id="s1", owner="o", admin=False, replay=ReplayBuffer(5, 10**4, 60.0))
    writes.mark(session)
    store.available = False
    started = time.monotonic()
    assert not await writes.flush_all(timeout_s=30.0)
    assert time.monotonic() - started < 5.0
    assert session in writes.dirty and session.needs_save()


async def test_what_a_drain_publishes_during_shutdown_is_in_the_last_store_write(
    start_hub: StartHub,
) -> None:
    """The relay drains beside the hub's jobs; its late topic events still reach the store."""
    store = MemoryStore()
    run = await start_hub(store=store)
    session = run.hub._registry.new_session("tok-a", False)
    run.hub._registry.add_topic(session, "chat:feishu:c1")
    await run.hub.flush()
    given: list[float] = []

    async def drain(left_s: float) -> None:
        given.append(left_s)
        await asyncio.sleep(0)  # the relay's last answer finishes while the hub shuts down
        await run.hub.publish("chat:feishu:c1", "feishu:om_1", Started())

    await run.hub.shutdown(grace_s=3.0, drain=drain)
    assert given and 0 < given[0] <= 3.0
    record = await store.load_session(session.id)
    assert record is not None and record.last_seq == 1
    assert '"id":"feishu:om_1"' in record.events[-1].frame
