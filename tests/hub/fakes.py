"""Test doubles for the hub: a scripted engine honouring EngineLike, and a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.types import (
    BusyError,
    Delta,
    Done,
    EngineStatus,
    Failed,
    JobEvent,
    JobRequest,
    Queued,
    Started,
    Usage,
)


class FakeClock:
    """A monotonic clock tests move by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class FakeHandle:
    """A scripted job: yields its script; ``gate`` (if set) is awaited before each delta."""

    job_id: str
    script: list[JobEvent]
    gate: asyncio.Event | None = None
    cancelled: bool = False
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def events(self) -> AsyncIterator[JobEvent]:
        for event in self.script:
            if self.cancelled:
                yield Failed("cancelled", "cancelled by the client")
                return
            if self.gate is not None and isinstance(event, Delta | Done):
                await self._wait_gate()
                if self.cancelled:
                    yield Failed("cancelled", "cancelled by the client")
                    return
            yield event
            await asyncio.sleep(0)

    async def _wait_gate(self) -> None:
        assert self.gate is not None
        gate_task = asyncio.ensure_future(self.gate.wait())
        wake_task = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait({gate_task, wake_task}, return_when=asyncio.FIRST_COMPLETED)
        gate_task.cancel()
        wake_task.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        self._wake.set()


def script(text: str = "a cat", pieces: int = 3) -> list[JobEvent]:
    """Queued, Started, ``pieces`` deltas that concatenate to ``text``, Done."""
    step = max(1, len(text) // pieces)
    parts = [text[i : i + step] for i in range(0, len(text), step)]
    return [
        Queued(position=0),
        Started(),
        *[Delta(part) for part in parts],
        Done(text=text, usage=Usage(prompt_tokens=7, completion_tokens=len(parts))),
    ]


class FakeEngine:
    """An EngineLike whose jobs follow a script; ``busy`` makes submit refuse like a full queue."""

    def __init__(self, pieces: int = 3) -> None:
        self.pieces = pieces
        self.busy = False
        self.gate: asyncio.Event | None = None
        self.requests: list[JobRequest] = []
        self.handles: dict[str, FakeHandle] = {}

    async def start(self) -> None:
        return None

    async def stop(self, grace_s: float = 10.0) -> None:
        return None

    def submit(self, request: JobRequest) -> FakeHandle:
        if self.busy:
            raise BusyError()
        self.requests.append(request)
        text = " ".join(f"w{i}" for i in range(self.pieces))
        handle = FakeHandle(request.job_id, script(text, self.pieces), gate=self.gate)
        self.handles[request.job_id] = handle
        return handle

    def status(self) -> EngineStatus:
        return EngineStatus(
            ready=True, model="fake", dtype="none", workers=(), queue_depth=0, queue_capacity=8
        )


@dataclass
class SlowHandle:
    """A long job: Queued, Started, ``pieces`` deltas ``delay_s`` apart, Done."""

    job_id: str
    pieces: int
    delay_s: float
    cancelled: bool = False

    async def events(self) -> AsyncIterator[JobEvent]:
        yield Queued(position=0)
        yield Started()
        for i in range(self.pieces):
            if self.cancelled:
                yield Failed("cancelled", "cancelled by the client")
                return
            await asyncio.sleep(self.delay_s)
            yield Delta(f"d{i} ")
        text = "".join(f"d{i} " for i in range(self.pieces))
        yield Done(text=text, usage=Usage(prompt_tokens=7, completion_tokens=self.pieces))

    def cancel(self) -> None:
        self.cancelled = True


class SlowEngine(FakeEngine):
    """An engine whose jobs emit many deltas slowly (a job that outlives a client's move)."""

    def __init__(self, pieces: int = 300, delay_s: float = 0.004) -> None:
        super().__init__(pieces=pieces)
        self.delay_s = delay_s

    def submit(self, request: JobRequest) -> SlowHandle:  # type: ignore[override]
        self.requests.append(request)
        return SlowHandle(request.job_id, self.pieces, self.delay_s)
