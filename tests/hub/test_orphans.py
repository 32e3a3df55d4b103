"""Jobs that die with their node (kill -9): the resumed session ends each with one error event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.hub import protocol as p
from bridge.hub.orphans import ORPHAN_MESSAGE, closed_job, settle
from bridge.hub.replay import ReplayBuffer
from bridge.hub.session import Session
from bridge.store.base import SessionRecord, StoredEvent
from bridge.store.sqlite import SqliteStore
from engine.types import Delta, Done, Failed, Queued, Started, Usage
from tests.hub.conftest import StartHub, crash, recv
from tests.hub.fakes import FakeEngine
from tests.hub.test_ws import job_events, submit

TOPIC = "chat:feishu:c1"
OpenStore = Callable[[], Awaitable[SqliteStore]]


@pytest.fixture
async def sqlite_file(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens stores on one SQLite file, as each restarted process would (closed at the end)."""
    opened: list[SqliteStore] = []

    async def open_one() -> SqliteStore:
        store = SqliteStore(f"sqlite:///{tmp_path}/bridge.db")
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


def stuck_engine() -> FakeEngine:
    """An engine whose jobs send ``queued`` and ``started`` and then never finish."""
    engine = FakeEngine()
    engine.gate = asyncio.Event()  # never set: every job waits before its first delta
    return engine


def orphan_error(seq: int, job_id: str) -> dict[str, Any]:
    return {
        "type": "event",
        "seq": seq,
        "id": job_id,
        "kind": "error",
        "code": "internal",
        "message": ORPHAN_MESSAGE,
    }


async def nothing_more(ws: Any) -> None:
    """The server has sent nothing else: the answer to a ping comes before any other event."""
    await ws.send(json.dumps({"type": "ping", "ts": 7}))
    frame = await recv(ws, "pong", "event")
    assert frame == {"type": "pong", "ts": 7}, frame


async def test_a_job_cut_off_by_a_crash_ends_once_with_an_internal_error_on_resume(
    sqlite_file: OpenStore, start_hub: StartHub
) -> None:
    store1 = await sqlite_file()
    run1 = await start_hub(store=store1, engine=stuck_engine())
    ws, welcome = await run1.hello()
    sid = welcome["session"]
    await ws.send(submit("J"))
    first = await recv(ws, "event")
    assert (first["seq"], first["id"], first["kind"]) == (1, "J", "queued")
    assert (await recv(ws, "event"))["kind"] == "started"  # then the job hangs
    await run1.hub.flush()
    await crash(run1)
    await store1.close()

    store2 = await sqlite_file()
    run2 = await start_hub(store=store2)
    ws2, back = await run2.hello(session=sid, last_seq=2)
    assert back["resumed"] is True and back["missed"] == 0
    error = await recv(ws2, "event")
    assert error == orphan_error(3, "J")
    await nothing_more(ws2)
    # A second resume replays the error and adds no other.
    ws3, again = await run2.hello(session=sid, last_seq=2)
    assert again["resumed"] is True
    assert await recv(ws3, "event") == error
    await nothing_more(ws3)
    assert run2.engine.requests == []  # the job is not run again
    await ws3.send(submit("J"))  # its id stays used
    assert (await recv(ws3, "error"))["code"] == "duplicate_id"

    # The store now says J is over: a third process loading the session ends nothing again.
    await run2.hub.flush()
    record = await store2.load_session(sid)
    assert record is not None and record.open_jobs == [] and record.last_seq == 3
    await crash(run2)
    await store2.close()
    run3 = await start_hub(store=await sqlite_file())
    ws4, _ = await run3.hello(session=sid, last_seq=3)
    await nothing_more(ws4)
    ws5, _ = await run3.hello(session=sid, last_seq=2)
    assert await recv(ws5, "event") == error
    await nothing_more(ws5)


async def test_the_orphan_error_numbers_above_a_client_ahead_of_the_store(
    sqlite_file: OpenStore, start_hub: StartHub
) -> None:
    store1 = await sqlite_file()
    # Only explicit flushes write: the store loses whatever came after the last one.
    run1 = await start_hub(store=store1, engine=stuck_engine(), flush_interval_s=3600.0)
    ws, welcome = await run1.hello()
    sid = welcome["session"]
    await ws.send(json.dumps({"type": "subscribe", "topic": TOPIC}))
    await recv(ws, "subscribed")
    await ws.send(submit("J"))
    assert [(await recv(ws, "event"))["kind"] for _ in range(2)] == ["queued", "started"]
    await run1.hub.flush()
    await run1.hub._registry.save_subscribed()  # the next process preloads the session
    for text in ("a", "b"):  # the client gets seqs 3 and 4; the store never does
        await run1.hub.publish(TOPIC, "im-1", Delta(text))
    assert [(await recv(ws, "event"))["seq"] for _ in range(2)] == [3, 4]
    await crash(run1)
    await store1.close()

    store2 = await sqlite_file()
    record = await store2.load_session(sid)
    assert record is not None and record.last_seq == 2 and record.open_jobs == ["J"]
    run2 = await start_hub(store=store2)
    assert sid in run2.hub._registry.sessions  # preloaded at start, ended only on resume
    ws2, back = await run2.hello(session=sid, last_seq=4)
    assert back["resumed"] is True and back["missed"] == 0
    assert await recv(ws2, "event") == orphan_error(5, "J")
    await nothing_more(ws2)


async def test_a_job_that_finished_before_the_crash_gets_no_orphan_error(
    sqlite_file: OpenStore, start_hub: StartHub
) -> None:
    store1 = await sqlite_file()
    run1 = await start_hub(store=store1)
    ws, welcome = await run1.hello()
    sid = welcome["session"]
    await ws.send(submit("J"))
    events = await job_events(ws, "J")
    assert events[-1]["kind"] == "done"
    await run1.hub.flush()
    record = await store1.load_session(sid)
    assert record is not None and record.open_jobs == []
    await crash(run1)
    await store1.close()

    run2 = await start_hub(store=await sqlite_file())
    ws2, back = await run2.hello(session=sid, last_seq=0)
    assert back["resumed"] is True
    assert [await recv(ws2, "event") for _ in events] == events
    await nothing_more(ws2)


def _replay() -> ReplayBuffer:
    return ReplayBuffer(100, 10**6, 3600.0)


def test_a_stored_terminal_event_outranks_a_header_that_still_lists_its_job() -> None:
    # The events of a flush were written, the header after them was not (the store failed).
    frames = [
        p.event_frame(1, p.event_tail("J", Queued(position=0))),
        p.event_frame(2, p.event_tail("K", Started())),
        p.event_frame(3, p.event_tail("J", Done("x", Usage(1, 1)))),
        p.event_frame(4, p.event_tail("im", Failed("internal", "x"), topic=TOPIC)),
    ]
    record = SessionRecord(
        "s1",
        last_seq=4,
        events=[StoredEvent(i + 1, 0.0, f) for i, f in enumerate(frames)],
        open_jobs=["J", "K", "im"],
    )
    session = Session.from_record(record, owner="o", admin=False, replay=_replay())
    assert session.open_jobs == {"K", "im"} and session.pending_orphans == {"K", "im"}
    assert session.header_dirty  # the corrected list goes to the store with the next write
    ended = settle(session, lambda sid, job: job == "im", 1.0)  # "im" runs on this node
    assert ended == ["K"]
    assert session.open_jobs == {"im"} and not session.pending_orphans
    assert settle(session, lambda sid, job: False, 2.0) == []  # exactly once
    assert session.record(3.0).open_jobs == ["im"]


def test_closed_job_reads_only_own_terminal_events() -> None:
    assert closed_job(p.event_tail("J", Done("t", Usage(1, 1)))) == "J"
    assert closed_job(p.event_tail("J", Failed("cancelled", "c"))) == "J"
    assert closed_job(p.event_tail("J", Started())) is None
    assert closed_job(p.event_tail("J", Delta('"kind":"done"'))) is None  # text is escaped
    assert closed_job(p.event_tail("im", Done("t", Usage(1, 1)), topic=TOPIC)) is None
    assert closed_job('"kind":"done",broken') is None


def test_open_jobs_are_bounded() -> None:
    from bridge.store.base import MAX_OPEN_JOBS

    session = Session(id="s", owner="o", admin=False, replay=_replay())
    assert all(session.open_job(f"j{i}") for i in range(MAX_OPEN_JOBS))
    assert not session.open_job("one-too-many")
    assert len(session.record(0.0).open_jobs) == MAX_OPEN_JOBS
    session.emit(p.event_tail("j0", Done("t", Usage(1, 1))), 1.0, closes="j0")
    assert "j0" not in session.open_jobs and session.open_job("one-more")


async def test_a_job_end_is_stored_at_once_not_at_the_next_interval(
    sqlite_file: OpenStore, start_hub: StartHub
) -> None:
    """The crash window for a second terminal event is the store's write, not the interval.

    With an hour-long write-behind interval only the flush a job's end asks for can store it:
    the stored header stops listing the job and the terminal event is kept for replay.
    """
    store = await sqlite_file()
    run = await start_hub(store=store, flush_interval_s=3600.0)
    ws, welcome = await run.hello()
    sid = welcome["session"]
    await ws.send(submit("J"))
    frames = await job_events(ws, "J")
    assert frames[-1]["kind"] == "done"
    last = frames[-1]["seq"]

    async def stored() -> tuple[int, list[str]] | None:
        record = await store.load_session(sid)
        if record is None:
            return None  # not written yet
        return max([record.last_seq, *(e.seq for e in record.events)]), record.open_jobs

    async with asyncio.timeout(10):
        while await stored() != (last, []):  # noqa: ASYNC110 - polls what another task writes
            await asyncio.sleep(0.01)


async def test_an_accepted_job_is_stored_as_open_at_once(
    sqlite_file: OpenStore, start_hub: StartHub
) -> None:
    """A crash just after a job was accepted can still end it: its acceptance is not left for
    the next write-behind interval (an hour here)."""
    store = await sqlite_file()
    run = await start_hub(store=store, engine=stuck_engine(), flush_interval_s=3600.0)
    ws, welcome = await run.hello()
    sid = welcome["session"]
    await ws.send(submit("J"))
    assert (await recv(ws, "event"))["kind"] == "queued"

    async def open_jobs() -> list[str] | None:
        record = await store.load_session(sid)
        return None if record is None else record.open_jobs

    async with asyncio.timeout(10):
        while await open_jobs() != ["J"]:  # noqa: ASYNC110 - polls what another task writes
            await asyncio.sleep(0.01)
