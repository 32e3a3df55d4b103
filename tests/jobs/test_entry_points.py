"""One job life, asserted the same way through every entry point: /ws, IM and HTTP.

Each entry point gets a small harness with one interface (submit, the events seen, cancel), all
on the same scripted engine and a :class:`JobRunner` whose ``on_end`` counts every job's end, as
the adapters' conformance suite does for platforms.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import pytest
import websockets
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.http import sse
from bridge.http.jobs import HttpJob, HttpJobs
from bridge.hub import Hub
from bridge.jobs.events import event_fields
from bridge.jobs.im import FAILED_REPLY
from bridge.jobs.runner import JobRunner, JobSpec
from bridge.metrics import Metrics
from bridge.relay import Relay
from bridge.store.memory import MemoryStore
from engine.types import BusyError, EngineError, Failed, JobRequest, Queued, Started
from tests.app.test_relay import FakeAdapter, Recorder, message
from tests.hub.conftest import TOKEN, hub_config
from tests.jobs.fakes import ANSWER, ScriptedEngine, Sleeps, Step, answer_script

IMAGE = b"\x89PNG fake image bytes"
FULL = ["queued", "started", "delta", "delta", "delta", "done"]
#: What a frame or chunk carries besides the event's own fields.
ENVELOPE = ("type", "seq", "id", "topic")


class Ends:
    """The runner's on_end hook: (job id, origin, outcome) of every ended job."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, spec: JobSpec, outcome: str) -> None:
        self.calls.append((spec.id, spec.origin, outcome))

    def of(self, job_id: str) -> list[str]:
        return [outcome for jid, _, outcome in self.calls if jid == job_id]


class Harness(Protocol):
    """One entry point driven the same way as the others."""

    origin: str
    #: Whether a busy engine is waited out (IM) rather than refused (/ws, HTTP).
    waits_when_busy: bool
    engine: ScriptedEngine
    runner: JobRunner
    ends: Ends
    sleeps: Sleeps

    def job_id(self, name: str) -> str:
        """The runner's id of the job the test calls ``name``."""
        ...

    async def submit(self, name: str) -> str | None:
        """Submit a job; None once accepted, else the refusal's error code."""
        ...

    async def seen(self, name: str) -> list[dict[str, Any]]:
        """The job's events seen so far, as event fields."""
        ...

    async def finished(self, name: str) -> list[dict[str, Any]]:
        """Wait until the job's end was counted; all its events, as event fields."""
        ...

    async def cancel(self, name: str) -> None:
        """Cancel the job through the entry point's own surface."""
        ...

    def held(self) -> int:
        """Image bytes still reserved for jobs."""
        ...

    async def close(self) -> None: ...


def _fields(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ENVELOPE}


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    """Let the loop run until ``check()`` holds (a generous bound for slow machines)."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polls state owned by other tasks
            await asyncio.sleep(0.005)


def _runner(engine: ScriptedEngine) -> tuple[JobRunner, Ends, Sleeps]:
    ends, sleeps = Ends(), Sleeps()
    return JobRunner(engine, on_end=ends, sleep=sleeps), ends, sleeps


class WsHarness:
    """A real hub on loopback and a real ``websockets`` client of one session."""

    origin = "ws"
    waits_when_busy = False

    def __init__(self) -> None:
        self.engine = ScriptedEngine()
        self.runner, self.ends, self.sleeps = _runner(self.engine)
        self.hub = Hub(
            # No heartbeat deadline within a test: the harness reads frames only when asked.
            hub_config(heartbeat_s=60.0, heartbeat_timeout_s=60.0),
            engine=self.engine,
            store=MemoryStore(),
            metrics=Metrics(),
            runner=self.runner,
        )
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.refusals: dict[str, str] = {}
        self._pings = itertools.count(1)

    async def open(self) -> None:
        await self.hub.start()
        app = web.Application()
        app.router.add_get("/ws", self.hub.handle)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        url = f"ws://127.0.0.1:{self.server.port}/ws"
        self.ws = await websockets.connect(url, ping_interval=None, compression=None)
        await self.ws.send(json.dumps({"type": "hello", "token": TOKEN}))
        welcome = await self._next()
        assert welcome["type"] == "welcome"
        self.session = welcome["session"]

    def job_id(self, name: str) -> str:
        return f"ws:{self.session}:{name}"

    async def _next(self) -> dict[str, Any]:
        async with asyncio.timeout(10):
            frame: dict[str, Any] = json.loads(await self.ws.recv())
        return frame

    async def _read_until(self, done: Callable[[dict[str, Any]], bool]) -> None:
        """Read frames, filing events and refusals, until ``done(frame)``."""
        while True:
            frame = await self._next()
            if frame["type"] == "event":
                self.events.setdefault(frame["id"], []).append(frame)
            elif frame["type"] == "ping":
                await self.ws.send(json.dumps({"type": "pong", "ts": frame["ts"]}))
            elif frame["type"] == "error" and frame.get("id"):
                self.refusals[frame["id"]] = frame["code"]
            if done(frame):
                return

    async def _sync(self) -> None:
        """Read everything the hub sent before now (a ping's pong comes after it all)."""
        ts = next(self._pings)
        await self.ws.send(json.dumps({"type": "ping", "ts": ts}))
        await self._read_until(lambda f: f["type"] == "pong" and f.get("ts") == ts)

    async def submit(self, name: str) -> str | None:
        frame = {"type": "submit", "id": name, "prompt": "what?"}
        frame["image"] = base64.b64encode(IMAGE).decode()
        await self.ws.send(json.dumps(frame))
        await self._read_until(lambda f: f.get("id") == name)
        return self.refusals.pop(name, None)

    async def seen(self, name: str) -> list[dict[str, Any]]:
        await self._sync()
        return [_fields(f) for f in self.events.get(name, [])]

    async def finished(self, name: str) -> list[dict[str, Any]]:
        await until(lambda: bool(self.ends.of(self.job_id(name))))
        events = self.events.get(name, [])
        seqs = [f["seq"] for f in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        return await self.seen(name)

    async def cancel(self, name: str) -> None:
        await self.ws.send(json.dumps({"type": "cancel", "id": name}))

    def held(self) -> int:
        return self.hub.inflight.used

    async def close(self) -> None:
        await self.ws.close()
        await self.hub.shutdown(grace_s=0.5)
        await self.server.close()


class ImHarness:
    """A relay with a fake Feishu adapter: the chat topic's events and the reply card."""

    origin = "feishu"
    waits_when_busy = True

    def __init__(self) -> None:
        self.engine = ScriptedEngine()
        self.runner, self.ends, self.sleeps = _runner(self.engine)
        self.store = MemoryStore()
        self.adapter = FakeAdapter(image=IMAGE)
        self.topic = Recorder()
        self.relay = Relay(self.store, self.engine, self.topic, [self.adapter], runner=self.runner)

    async def open(self) -> None:
        await self.store.open()

    def job_id(self, name: str) -> str:
        return f"feishu:{name}"

    async def submit(self, name: str) -> str | None:
        assert await self.relay.accept(message(mid=name, eid=f"ev-{name}"))
        return None  # an IM message is never refused: it waits for the engine

    async def seen(self, name: str) -> list[dict[str, Any]]:
        return [
            event_fields(event)
            for topic, job_id, event in self.topic.events
            if job_id == self.job_id(name) and topic == "chat:feishu:oc_chat"
        ]

    async def finished(self, name: str) -> list[dict[str, Any]]:
        await until(lambda: bool(self.ends.of(self.job_id(name))))
        await until(lambda: not self.relay._tasks)  # the entry is marked answered
        events = await self.seen(name)
        card = self.adapter.replies[name]
        last = events[-1]
        # The card agrees with the terminal event the topic saw.
        if last["kind"] == "done":
            assert card.final == last["text"] and card.failed is None
        else:
            assert card.failed == FAILED_REPLY and card.final is None
        assert self.adapter.posts == len(self.adapter.replies)  # one card per message
        assert await self.store.inbox_pending() == []
        return events

    async def cancel(self, name: str) -> None:
        assert self.runner.cancel(self.job_id(name), owner="feishu")

    def held(self) -> int:
        return 0  # IM jobs hold no inflight bytes

    async def close(self) -> None:
        await self.relay.stop(1.0)
        await self.store.close()


class FakeSubmitter:
    """Admits every job and counts the bytes reserved and given back."""

    def __init__(self) -> None:
        self.reserved = 0
        self.released: list[int] = []

    async def admit(self, label: str, request: JobRequest) -> None:
        self.reserved += len(request.image)

    def done_with(self, request_bytes: int) -> None:
        self.released.append(request_bytes)


class HttpHarness:
    """HttpJobs on the runner, rendering each event as ``/v1/analyze`` does (SSE data)."""

    origin = "http"
    waits_when_busy = False
    owner = "token-label"

    def __init__(self) -> None:
        self.engine = ScriptedEngine()
        self.runner, self.ends, self.sleeps = _runner(self.engine)
        self.submitter = FakeSubmitter()
        self.jobs = HttpJobs(self.submitter, self.runner)
        self.started: dict[str, HttpJob] = {}

    async def open(self) -> None:
        return None

    def job_id(self, name: str) -> str:
        return f"http:{name}"

    async def submit(self, name: str) -> str | None:
        request = JobRequest(self.job_id(name), IMAGE, "what?")
        try:
            self.started[name] = await self.jobs.start(
                name, self.owner, "http", request, lambda e: [sse.job_event(name, e)]
            )
        except EngineError as exc:
            return exc.code
        return None

    async def seen(self, name: str) -> list[dict[str, Any]]:
        job = self.started[name]
        chunks = [json.loads(c) for c in job.chunks]
        assert all(c["id"] == name for c in chunks)
        return [_fields(c) for c in chunks]

    async def finished(self, name: str) -> list[dict[str, Any]]:
        await until(lambda: bool(self.ends.of(self.job_id(name))))
        job = self.started[name]
        assert job.ended and job.outcome == self.ends.of(self.job_id(name))[0]
        return await self.seen(name)

    async def cancel(self, name: str) -> None:
        assert self.jobs.cancel(name, self.owner)

    def held(self) -> int:
        return self.submitter.reserved - sum(self.submitter.released)

    async def close(self) -> None:
        await self.jobs.stop(0.5)
        await self.runner.stop(0.5)


HARNESSES: dict[str, Callable[[], Any]] = {
    "ws": WsHarness,
    "im": ImHarness,
    "http": HttpHarness,
}


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = HARNESSES[request.param]()
    await h.open()
    try:
        yield h
    finally:
        with contextlib.suppress(Exception):
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
