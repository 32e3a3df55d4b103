"""Test doubles for the job pipeline: a scripted engine, recording sinks and an instant sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from bridge.jobs.runner import EndJob, JobSpec
from engine.types import (
    Delta,
    Done,
    EngineError,
    EngineStatus,
    Failed,
    JobEvent,
    JobRequest,
    Queued,
    Started,
    Usage,
)

#: One step of a scripted job: an event to yield, an exception to raise from the stream, or an
#: event to wait for (the job stalls there until the test sets it or the job is cancelled).
Step = JobEvent | BaseException | asyncio.Event

WORDS = ("a", " cat", " naps")
ANSWER = "".join(WORDS)


def answer_script(hold: asyncio.Event | None = None) -> list[Step]:
    """queued, started, (stall on ``hold``), one delta per word, done."""
    steps: list[Step] = [Queued(0), Started()]
    if hold is not None:
        steps.append(hold)
    steps += [Delta(w) for w in WORDS]
    steps.append(Done(ANSWER, Usage(prompt_tokens=4, completion_tokens=len(WORDS))))
    return steps


class ScriptedHandle:
    """A job following its script; a cancel ends it with a ``cancelled`` event, as the engine's."""

    def __init__(self, job_id: str, steps: list[Step]) -> None:
        self.job_id = job_id
        self.steps = steps
        self.cancels = 0
        self._cancelled = asyncio.Event()
        self.iterated = False

    async def events(self) -> AsyncIterator[JobEvent]:
        self.iterated = True
        for step in self.steps:
            if self._cancelled.is_set():
                yield Failed("cancelled", "the job was cancelled")
                return
            if isinstance(step, asyncio.Event):
                await _first(step, self._cancelled)
                continue
            if isinstance(step, BaseException):
                raise step
            yield step
            await asyncio.sleep(0)

    def cancel(self) -> None:
        self.cancels += 1
        self._cancelled.set()


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class ScriptedEngine:
    """An EngineLike: ``refusals`` are raised by the next submits, then jobs follow ``script``."""

    def __init__(self, script: Callable[[JobRequest], list[Step]] | None = None) -> None:
        self.script = script or (lambda _request: answer_script())
        self.refusals: list[EngineError] = []
        self.requests: list[JobRequest] = []
        self.handles: dict[str, ScriptedHandle] = {}
        self.submits = 0

    def refuse(self, *errors: EngineError) -> None:
        """Make the next ``len(errors)`` submits raise these errors, in order."""
        self.refusals.extend(errors)

    async def start(self) -> None:
        return None

    async def stop(self, grace_s: float = 10.0) -> None:
        return None

    def submit(self, request: JobRequest) -> ScriptedHandle:
        self.submits += 1
        if self.refusals:
            raise self.refusals.pop(0)
        self.requests.append(request)
        handle = ScriptedHandle(request.job_id, self.script(request))
        self.handles[request.job_id] = handle
        return handle

    def status(self) -> EngineStatus:
        return EngineStatus(
            ready=True, model="scripted", dtype="none", workers=(), queue_depth=0, queue_capacity=8
        )


@dataclass
class Sink:
    """A JobSink that records what it gets; it can fail or end the job on a chosen event.

    Args:
        log: shared by several sinks to check the order of calls across them.
        fail_open: raised by :meth:`open`.
        fail_on: the kind (or ``open``) whose delivery raises ``error``.
        end_on: the kind whose delivery raises :class:`EndJob` with ``end_outcome``.
        hold: awaited in :meth:`send` of an event of kind ``hold_on``.
    """

    name: str = "sink"
    required: bool = False
    log: list[tuple[str, str]] = field(default_factory=list)
    fail_open: Exception | None = None
    fail_on: str | None = None
    error: Exception = field(default_factory=lambda: RuntimeError("sink broke"))
    end_on: str | None = None
    end_outcome: str = "stopped"
    hold_on: str | None = None
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    events: list[JobEvent] = field(default_factory=list)
    opens: int = 0
    sends: int = 0

    async def open(self) -> None:
        self.opens += 1
        self.log.append((self.name, "open"))
        if self.fail_open is not None:
            raise self.fail_open

    async def send(self, event: JobEvent) -> None:
        self.sends += 1
        self.log.append((self.name, event.kind))
        if event.kind == self.hold_on:
            await self.hold.wait()
        if event.kind == self.fail_on:
            raise self.error
        self.events.append(event)
        if event.kind == self.end_on:
            raise EndJob(self.end_outcome)

    @property
    def kinds(self) -> list[str]:
        """The kinds of the events received."""
        return [e.kind for e in self.events]

    @property
    def terminals(self) -> list[JobEvent]:
        """The terminal events received (a correct job gives exactly one)."""
        return [e for e in self.events if e.kind in ("done", "error")]


class Sleeps:
    """An injected sleep that records each delay and returns at once (one loop turn)."""

    def __init__(self, on_sleep: Callable[[float], None] | None = None) -> None:
        self.delays: list[float] = []
        self.on_sleep = on_sleep

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.on_sleep is not None:
            self.on_sleep(delay)
        await asyncio.sleep(0)


class Releases:
    """Records the bytes given back through a spec's ``release``."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, held: int) -> None:
        self.calls.append(held)


class Ends:
    """The runner's on_end hook: (job id, origin, outcome) of every ended job."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, spec: JobSpec, outcome: str) -> None:
        self.calls.append((spec.id, spec.origin, outcome))

    def of(self, job_id: str) -> list[str]:
        """The outcomes told for ``job_id`` (one once it ended)."""
        return [outcome for jid, _, outcome in self.calls if jid == job_id]
