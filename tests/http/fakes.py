"""An engine whose answers advance only when the test says so (deterministic streams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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

WORDS = ["a", "tabby", "cat", "on", "a", "wooden", "floor"]
ANSWER = " ".join(WORDS)


class GatedHandle:
    """queued, started, then one delta per :meth:`GatedEngine.release`, then done."""

    def __init__(self, request: JobRequest, engine: GatedEngine) -> None:
        self.job_id = request.job_id
        self.request = request
        self._engine = engine
        self.cancelled = asyncio.Event()

    async def events(self) -> AsyncIterator[JobEvent]:
        yield Queued(self._engine.waiting)
        if self._engine.hold is not None:
            await self._engine.hold.wait()
        yield Started()
        for i, word in enumerate(WORDS):
            gate = asyncio.ensure_future(self._engine.gate.acquire())
            stop = asyncio.ensure_future(self.cancelled.wait())
            await asyncio.wait({gate, stop}, return_when=asyncio.FIRST_COMPLETED)
            if self.cancelled.is_set():
                if gate.done():
                    self._engine.gate.release()
                gate.cancel()
                yield Failed("cancelled", "the job was cancelled")
                return
            stop.cancel()
            yield Delta(word if i == 0 else " " + word)
        yield Done(ANSWER, Usage(prompt_tokens=5, completion_tokens=len(WORDS)))

    def cancel(self) -> None:
        self.cancelled.set()


class GatedEngine:
    """Ready at once; ``busy`` makes the next submits raise :class:`BusyError`."""

    def __init__(self) -> None:
        self.gate = asyncio.Semaphore(0)
        self.handles: list[GatedHandle] = []
        self.busy = False
        #: While set to an unset event, jobs wait in the queue (after ``queued``).
        self.hold: asyncio.Event | None = None
        #: The queue position the next job reports.
        self.waiting = 0

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    async def start(self) -> None:
        return None

    async def stop(self, grace_s: float = 10.0) -> None:
        return None

    def submit(self, request: JobRequest) -> GatedHandle:
        if self.busy:
            raise BusyError(retry_after=2.0)
        handle = GatedHandle(request, self)
        self.handles.append(handle)
        return handle

    def status(self) -> EngineStatus:
        return EngineStatus(
            ready=True,
            model="gated",
            dtype="float32",
            workers=(),
            queue_depth=0,
            queue_capacity=8,
        )
