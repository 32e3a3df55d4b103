"""One job life, asserted the same way through every entry point: /ws, IM and HTTP.

Each entry point gets a small harness with one interface (submit, the events seen, cancel), all
on the same scripted engine and a :class:`JobRunner` whose ``on_end`` counts every job's end, as
the adapters' conformance suite does for platforms (see :mod:`tests.jobs.harness`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.types import BusyError, Failed, JobRequest, Queued, Started
from tests.jobs.fakes import ANSWER, Step, answer_script
from tests.jobs.harness import FULL, HARNESSES, Harness, until


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = HARNESSES[request.param]()
    await h.open()
    try:
        yield h
    finally:
        await h.close()


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


def terminals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] in ("done", "error")]


def crash_script(_request: JobRequest) -> list[Step]:
    return [Queued(0), Started(), *answer_script()[2:3], RuntimeError("the stream broke")]


# --- the suite -------------------------------------------------------------------------------
async def test_a_job_streams_queued_started_deltas_and_one_done(harness: Harness) -> None:
    assert await harness.submit("j1") is None
    events = await harness.finished("j1")
    assert kinds(events) == FULL
    assert events[0] == {"kind": "queued", "position": 0}
    assert "".join(e["text"] for e in events if e["kind"] == "delta") == ANSWER
    assert events[-1]["text"] == ANSWER and events[-1]["usage"]["completion_tokens"] == 3
    assert harness.ends.calls == [(harness.job_id("j1"), harness.origin, "done")]
    await until(lambda: harness.held() == 0)


async def test_a_cancel_ends_the_job_with_one_cancelled_event(harness: Harness) -> None:
    hold = asyncio.Event()
    harness.engine.script = lambda _r: answer_script(hold)
    assert await harness.submit("j1") is None

    async def started() -> bool:
        return "started" in kinds(await harness.seen("j1"))

    async with asyncio.timeout(10):
        while not await started():  # noqa: ASYNC110 - polls what the client has seen
            await asyncio.sleep(0.005)
    await harness.cancel("j1")
    events = await harness.finished("j1")
    assert kinds(events) == ["queued", "started", "error"]
    assert terminals(events) == [events[-1]] and events[-1]["code"] == "cancelled"
    assert harness.engine.handles[harness.job_id("j1")].cancels >= 1
    assert harness.ends.calls == [(harness.job_id("j1"), harness.origin, "cancelled")]
    await until(lambda: harness.held() == 0)


async def test_a_busy_engine_is_refused_or_waited_out_by_policy(harness: Harness) -> None:
    harness.engine.refuse(BusyError(retry_after=0.5))
    refused = await harness.submit("j1")
    if harness.waits_when_busy:
        assert refused is None
        events = await harness.finished("j1")
        assert kinds(events) == FULL and harness.sleeps.delays == [0.5]
        assert harness.engine.submits == 2
    else:
        assert refused == "busy" and harness.sleeps.delays == []
        assert harness.engine.submits == 1 and harness.ends.calls == []
        await until(lambda: harness.held() == 0)  # a refused job holds nothing
        # The client may submit it again: the same id is accepted once the engine has room.
        assert await harness.submit("j1") is None
        assert kinds(await harness.finished("j1")) == FULL
    assert harness.ends.calls == [(harness.job_id("j1"), harness.origin, "done")]


async def test_a_crashed_engine_stream_ends_the_job_with_one_internal_error(
    harness: Harness,
) -> None:
    harness.engine.script = crash_script
    assert await harness.submit("j1") is None
    events = await harness.finished("j1")
    assert kinds(events) == ["queued", "started", "delta", "error"]
    assert terminals(events) == [events[-1]] and events[-1]["code"] == "internal"
    assert harness.ends.calls == [(harness.job_id("j1"), harness.origin, "internal")]
    await until(lambda: harness.held() == 0)


async def test_an_engine_failure_reaches_the_client_once(harness: Harness) -> None:
    harness.engine.script = lambda _r: [Queued(1), Failed("timeout", "the job took too long")]
    assert await harness.submit("j1") is None
    events = await harness.finished("j1")
    assert events == [
        {"kind": "queued", "position": 1},
        {"kind": "error", "code": "timeout", "message": "the job took too long"},
    ]
    assert harness.ends.calls == [(harness.job_id("j1"), harness.origin, "timeout")]


async def test_every_job_end_is_counted_once_with_its_origin(harness: Harness) -> None:
    names = ["a", "b", "c"]
    for name in names:
        assert await harness.submit(name) is None
    for name in names:
        assert kinds(await harness.finished(name)) == FULL
    assert sorted(harness.ends.calls) == [
        (harness.job_id(name), harness.origin, "done") for name in names
    ]
    assert harness.engine.submits == 3 and harness.runner.live_count() == 0
