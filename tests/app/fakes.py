"""A controllable stand-in for the engine, honouring engine.types.EngineLike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.types import (
    Delta,
    Done,
    EngineStatus,
    JobEvent,
    JobRequest,
    Queued,
    Started,
    Usage,
)


class FakeHandle:
    """Yields a scripted answer: queued, started, one delta per word, done."""

    def __init__(self, request: JobRequest, answer: str) -> None:
        self.job_id = request.job_id
        self._answer = answer
        self.cancelled = False

    async def events(self) -> AsyncIterator[JobEvent]:
        yield Queued(0)
        yield Started()
        words = self._answer.split(" ")
        for i, word in enumerate(words):
            await asyncio.sleep(0)
            yield Delta(word if i == 0 else " " + word)
        yield Done(self._answer, Usage(prompt_tokens=3, completion_tokens=len(words)))

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    """An engine whose readiness the test controls."""

    def __init__(self, answer: str = "a cat on a sofa") -> None:
        self.answer = answer
        self.loaded = asyncio.Event()
        self.ready = False
        self.stopped = False
        self.submitted: list[JobRequest] = []
        self.fail_start: Exception | None = None

    async def start(self) -> None:
        await self.loaded.wait()
        if self.fail_start is not None:
            raise self.fail_start
        self.ready = True

    async def stop(self, grace_s: float = 10.0) -> None:
        self.stopped = True
        self.ready = False

    def submit(self, request: JobRequest) -> FakeHandle:
        self.submitted.append(request)
        return FakeHandle(request, self.answer)

    def status(self) -> EngineStatus:
        return EngineStatus(
            ready=self.ready,
            model="fake",
            dtype="float32",
            workers=(),
            queue_depth=0,
            queue_capacity=8,
            reason=None if self.ready else "model is loading",
        )
