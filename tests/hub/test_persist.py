"""Write-behind to the store: batches, trims, owner binding, and surviving a store outage."""

from __future__ import annotations

from bridge.hub import protocol as p
from bridge.hub.persist import WriteBehind
from bridge.hub.replay import ReplayBuffer
from bridge.hub.session import Session
from bridge.store.memory import MemoryStore
from engine.types import Queued, Started


async def test_write_behind_survives_an_outage_and_trims() -> None:
    store = MemoryStore()
    writes = WriteBehind(store, ttl_s=60.0, wall=lambda: 100.0)
    session = Session(id="s1", owner="tok-a", admin=False, replay=ReplayBuffer(5, 10_000, 60.0))
    session.topics.add("chat:feishu:x")
    for _ in range(3):
        session.emit('"id":"j","kind":"started"}', 100.0)
    writes.mark(session)
    store.available = False
    await writes.flush()
    assert writes.failures == 1 and session in writes.dirty
    for _ in range(4):
        session.emit('"id":"j","kind":"started"}', 100.0)
    store.available = True
    await writes.flush()
    record = await store.load_session("s1")
    assert record is not None and record.last_seq == 7 and record.first_seq == 3
    assert [e.seq for e in record.events] == [3, 4, 5, 6, 7]
    assert record.topics == ["chat:feishu:x"]
    assert await writes.owner_of("s1") == "tok-a"
    session.ack(5)
    writes.mark(session)
    await writes.flush()
    record = await store.load_session("s1")
    assert record is not None and [e.seq for e in record.events] == [6, 7]
    assert not writes.dirty


async def test_a_restored_session_still_refuses_job_ids_it_kept_events_of() -> None:
    store = MemoryStore()
    writes = WriteBehind(store, ttl_s=60.0, wall=lambda: 100.0)
    session = Session(id="s2", owner="tok-a", admin=False, replay=ReplayBuffer(50, 10_000, 60.0))
    session.emit(p.event_tail("job-1", Queued(position=0)), 100.0)
    session.emit(p.event_tail("job-2", Started()), 100.0)
    session.emit(p.event_tail("im-7", Started(), topic="chat:feishu:x"), 100.0)
    session.emit(p.event_tail("job-3", Started()), 100.0)
    session.ack(1)  # job-1's only event is gone: its id is no longer known after a restart
    writes.mark(session)
    await writes.flush()
    record = await store.load_session("s2")
    assert record is not None
    back = Session.from_record(
        record, owner="tok-a", admin=False, replay=ReplayBuffer(50, 10_000, 60.0)
    )
    assert back.knows_job("job-2") and back.knows_job("job-3")
    assert not back.knows_job("job-1") and not back.knows_job("im-7")


async def test_a_cancel_that_meets_an_early_flush_request_still_stops_the_wait() -> None:
    """The hub's background loop must end on cancel even when a job's end asked for a flush at
    the same moment (``wait_for`` on Python 3.11 swallowed that cancel and shutdown hung)."""
    import asyncio

    writes = WriteBehind(MemoryStore(), ttl_s=60.0, wall=lambda: 100.0)
    session = Session(id="s1", owner="t", admin=False, replay=ReplayBuffer(100, 1 << 20, 3600.0))
    waiter = asyncio.create_task(writes.wait_due(3600.0))
    await asyncio.sleep(0)  # the waiter is parked on the event
    writes.mark_soon(session)  # sets the event ...
    waiter.cancel()  # ... and the shutdown cancels in the same loop turn
    done, _ = await asyncio.wait({waiter}, timeout=5.0)
    assert done and waiter.cancelled()
