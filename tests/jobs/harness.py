"""Harnesses for the entry-point suite: /ws, IM and HTTP driven through one interface.

Each runs the scripted engine on a :class:`JobRunner` whose ``on_end`` counts every job's end; the
suite (:mod:`tests.jobs.test_entry_points`) asserts the same job life through each of them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Callable
from typing import Any, Protocol

import websockets
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.http import sse
from bridge.http.jobs import HttpJob, HttpJobs
from bridge.hub import Hub
from bridge.jobs.events import event_fields
from bridge.jobs.im import FAILED_REPLY
from bridge.jobs.runner import JobRunner
from bridge.metrics import Metrics
from bridge.relay import Relay
from bridge.store.memory import MemoryStore
from engine.types import EngineError, JobRequest
from tests.app.test_relay import FakeAdapter, Recorder, message
from tests.hub.conftest import TOKEN, hub_config
from tests.jobs.fakes import Ends, ScriptedEngine, Sleeps

IMAGE = b"\x89PNG fake image bytes"
FULL = ["queued", "started", "delta", "delta", "delta", "done"]
#: What a frame or chunk carries besides the event's own fields.
ENVELOPE = ("type", "seq", "id", "topic")


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
