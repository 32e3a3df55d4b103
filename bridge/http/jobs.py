"""HTTP jobs: submitted through a :class:`JobSubmitter`, their SSE chunks kept for resume.

A job belongs to the token that started it, not to its HTTP connection: it runs on when the client
drops, and every chunk it produced stays in its numbered log (seq 1, 2, 3, … with no gaps) so
``GET /v1/chat/completions/{id}/stream`` with ``Last-Event-ID`` can replay what was missed and
follow the rest live. A finished job is kept for ``keep_s`` so a late resume still finds it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from bridge.hub.inflight import InflightBudget
from bridge.hub.jobs import finish_or_cancel
from bridge.hub.submitlimit import SharedSubmitLimit
from engine.types import (
    TERMINAL_KINDS,
    Done,
    EngineError,
    EngineLike,
    Failed,
    JobEvent,
    JobHandle,
    JobRequest,
)

log = structlog.get_logger(__name__)

#: Renders one engine event into zero or more SSE data payloads.
Render = Callable[[JobEvent], list[str]]


class JobSubmitter(Protocol):
    """How the HTTP API hands a job to the engine; a later unified job pipeline replaces it.

    ``submit`` applies the token's submit rate and the inflight memory budget, then submits;
    it raises :class:`EngineError` (``rate_limited``, ``busy``, ``too_large``...) at once.
    ``done_with`` releases what ``submit`` reserved for the job (called once, when it starts
    or ends).
    """

    async def submit(self, label: str, request: JobRequest) -> JobHandle: ...

    def done_with(self, request_bytes: int) -> None: ...


class HubSubmitter:
    """Submits like the hub does for a /ws session: the same cluster-wide per-token submit limit
    (shared with /ws, so a token cannot double its rate over two APIs), the same inflight budget
    for image bytes until the engine starts the job, the same engine."""

    def __init__(
        self, engine: EngineLike, budget: InflightBudget, limit: SharedSubmitLimit
    ) -> None:
        self.engine = engine
        self.budget = budget
        self.limit = limit

    async def submit(self, label: str, request: JobRequest) -> JobHandle:
        if not await self.limit.allow(label):
            raise EngineError("rate_limited", "too many submits for this token; retry in 1s", 1.0)
        if not self.budget.try_reserve(len(request.image)):
            raise EngineError("busy", "the server holds too many images now; retry soon", 1.0)
        try:
            return self.engine.submit(request)
        except BaseException:
            self.budget.release(len(request.image))
            raise

    def done_with(self, request_bytes: int) -> None:
        self.budget.release(request_bytes)


@dataclass(eq=False)
class HttpJob:
    """One job's chunk log and the task filling it."""

    id: str
    owner: str
    origin: str
    handle: JobHandle
    chunks: list[str] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float | None = None
    outcome: str | None = None
    task: asyncio.Task[None] | None = None
    _waiters: list[asyncio.Future[bool]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        """Whether the last chunk is in the log."""
        return self.ended_at is not None

    def add(self, payloads: list[str]) -> None:
        """Append payloads (each gets the next seq) and wake the followers."""
        if payloads:
            self.chunks.extend(payloads)
            self._wake()

    def end(self, now: float) -> None:
        """No more chunks will come."""
        self.ended_at = now
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)

    async def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a new chunk or the end; False when nothing came.

        A bare future and one timer handle per wait: this runs once per streamed token per
        follower, where ``asyncio.timeout`` cost several times more than the rest of the wait.
        """
        if self.ended:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout_s, _time_out, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            if waiter in self._waiters:  # timed out or cancelled: never woken, never swapped out
                self._waiters.remove(waiter)


def _time_out(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class HttpJobs:
    """The HTTP jobs of this node by id; runs each job's event task and forgets old ones.

    Args:
        submitter: hands jobs to the engine.
        keep_s: how long a finished job stays resumable.
        max_kept: bound on finished jobs kept (the oldest go first).
        clock: monotonic seconds.
        on_end: called with each job and its outcome (``done``, ``cached``, ``stopped`` or the
            error code) when it ends (metrics).
    """

    def __init__(
        self,
        submitter: JobSubmitter,
        *,
        keep_s: float = 600.0,
        max_kept: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        on_end: Callable[[HttpJob, str], None] | None = None,
    ) -> None:
        self.submitter = submitter
        self.on_end = on_end
        self.keep_s = keep_s
        self.max_kept = max_kept
        self._clock = clock
        self._jobs: OrderedDict[str, HttpJob] = OrderedDict()
        self.tasks: set[asyncio.Task[None]] = set()

    def get(self, job_id: str, owner: str) -> HttpJob | None:
        """The job ``job_id`` if the token labelled ``owner`` started it (else None)."""
        self._expire()
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def live_count(self, origin: str | None = None) -> int:
        """Jobs still running (of one origin, or all)."""
        return sum(1 for j in self._jobs.values() if not j.ended and origin in (None, j.origin))

    async def start(
        self,
        job_id: str,
        owner: str,
        origin: str,
        request: JobRequest,
        render: Render,
        first: list[str] | None = None,
        stop_when: Callable[[], bool] | None = None,
    ) -> HttpJob:
        """Submit ``request`` and stream its rendered events into a new job's log.

        Args:
            first: payloads logged before any event (the opening chunk).
            stop_when: asked after each event; True ends the job early (a stop sequence) and
                cancels it in the engine.

        Raises:
            EngineError: the submit was refused (rate, budget, queue, size).
        """
        self._expire()
        handle = await self.submitter.submit(owner, request)
        job = HttpJob(job_id, owner, origin, handle, started_at=self._clock())
        job.add(list(first or ()))
        task = asyncio.get_running_loop().create_task(
            self._run(job, render, len(request.image), stop_when), name=f"http-job-{job_id}"
        )
        job.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self._jobs[job_id] = job
        log.info("http_job_submitted", job_id=job_id, token=owner, origin=origin)
        return job

    async def _run(
        self, job: HttpJob, render: Render, held: int, stop_when: Callable[[], bool] | None
    ) -> None:
        """Stream the engine's events into the log until the terminal one (or an early stop)."""
        outcome = "internal"
        try:
            async for event in job.handle.events():
                terminal = event.kind in TERMINAL_KINDS
                if held and (terminal or event.kind == "started"):
                    self.submitter.done_with(held)
                    held = 0
                job.add(render(event))
                if isinstance(event, Done):
                    outcome = "cached" if event.cached else "done"
                elif isinstance(event, Failed):
                    outcome = event.code
                if terminal:
                    break
                if stop_when is not None and stop_when():
                    outcome = "stopped"
                    job.handle.cancel()
                    break
        except asyncio.CancelledError:
            job.handle.cancel()
            job.add(render(Failed("internal", "the server stopped before the job finished")))
            raise
        except Exception:
            log.exception("http_job_failed", job_id=job.id)
            job.add(render(Failed("internal", "the job ended without a result")))
        finally:
            if held:
                self.submitter.done_with(held)
            job.outcome = outcome
            job.end(self._clock())
            log.info("http_job_ended", job_id=job.id, chunks=len(job.chunks), outcome=outcome)
            if self.on_end is not None:
                self.on_end(job, outcome)

    def board(self, limit: int = 50) -> dict[str, Any]:
        """The dashboard's view: the live count and the newest ``limit`` jobs (running ones
        first), each under its token's label (never the token) and without prompt or answer."""
        self._expire()
        now = self._clock()
        jobs = sorted(self._jobs.values(), key=lambda j: (j.ended, -j.started_at))[:limit]
        rows = [
            {
                "id": j.id,
                "token": j.owner,
                "origin": j.origin,
                "state": "running" if j.outcome is None else j.outcome,
                "age_s": round(now - j.started_at, 3),
                "duration_s": None if j.ended_at is None else round(j.ended_at - j.started_at, 3),
                "chunks": len(j.chunks),
            }
            for j in jobs
        ]
        return {"live": self.live_count(), "jobs": rows}

    def cancel(self, job_id: str, owner: str) -> bool:
        """Cancel a running job of ``owner``; False if there is none (or it already ended)."""
        job = self.get(job_id, owner)
        if job is None or job.ended:
            return False
        job.handle.cancel()
        log.info("http_job_cancel", job_id=job_id, token=owner)
        return True

    def _expire(self) -> None:
        horizon = self._clock() - self.keep_s
        ended = [j for j in self._jobs.values() if j.ended_at is not None]
        extra = len(ended) - self.max_kept
        for job in ended:
            if extra > 0 or (job.ended_at is not None and job.ended_at < horizon):
                del self._jobs[job.id]
                extra -= 1

    async def stop(self, timeout_s: float) -> None:
        """Let running jobs finish for up to ``timeout_s``, then cancel the rest."""
        await finish_or_cancel(self.tasks, timeout_s)
