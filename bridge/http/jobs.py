"""HTTP jobs: admitted by a :class:`JobSubmitter`, run by the job runner, their SSE chunks kept.

A job belongs to the token that started it, not to its HTTP connection: it runs on when the client
drops, and every chunk it produced stays in its numbered log (seq 1, 2, 3, … with no gaps) so
``GET /v1/chat/completions/{id}/stream`` with ``Last-Event-ID`` can replay what was missed and
follow the rest live. A finished job is kept for ``keep_s`` so a late resume still finds it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from bridge.hub.inflight import InflightBudget
from bridge.hub.submitlimit import SharedSubmitLimit
from bridge.jobs.runner import Busy, EndJob, Job, JobRunner, JobSpec, finish_or_cancel
from engine.types import TERMINAL_KINDS, EngineError, JobEvent, JobRequest

log = structlog.get_logger(__name__)

#: Renders one engine event into zero or more SSE data payloads.
Render = Callable[[JobEvent], list[str]]


class JobSubmitter(Protocol):
    """How the HTTP API admits a job before the job runner submits it to the engine.

    ``admit`` applies the token's submit rate and reserves the image in the inflight memory
    budget; it raises :class:`EngineError` (``rate_limited``, ``busy``) at once. ``done_with``
    gives back what ``admit`` reserved (called once, when the engine starts or ends the job, or
    when the engine refuses it).
    """

    async def admit(self, label: str, request: JobRequest) -> None: ...

    def done_with(self, request_bytes: int) -> None: ...


class HubSubmitter:
    """Admits like the hub does for a /ws session: the same cluster-wide per-token submit limit
    (shared with /ws, so a token cannot double its rate over two APIs) and the same inflight
    budget for image bytes until the engine starts the job."""

    def __init__(self, budget: InflightBudget, limit: SharedSubmitLimit) -> None:
        self.budget = budget
        self.limit = limit

    async def admit(self, label: str, request: JobRequest) -> None:
        if not await self.limit.allow(label):
            raise EngineError("rate_limited", "too many submits for this token; retry in 1s", 1.0)
        if not self.budget.try_reserve(len(request.image)):
            raise EngineError("busy", "the server holds too many images now; retry soon", 1.0)

    def done_with(self, request_bytes: int) -> None:
        self.budget.release(request_bytes)


@dataclass(eq=False)
class HttpJob:
    """One job's chunk log and the task filling it."""

    id: str
    owner: str
    origin: str
    chunks: list[str] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float | None = None
    outcome: str | None = None
    run: Job | None = None
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
    """The HTTP entry point of the job pipeline: this node's HTTP jobs by id, each run by the
    shared :class:`JobRunner` into its chunk log; old ones are forgotten.

    Args:
        submitter: admits jobs (rate limit, inflight budget).
        runner: the bridge's job runner.
        keep_s: how long a finished job stays resumable.
        max_kept: bound on finished jobs kept (the oldest go first).
        clock: monotonic seconds.
    """

    def __init__(
        self,
        submitter: JobSubmitter,
        runner: JobRunner,
        *,
        keep_s: float = 600.0,
        max_kept: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.submitter = submitter
        self.runner = runner
        self.keep_s = keep_s
        self.max_kept = max_kept
        self._clock = clock
        self._jobs: OrderedDict[str, HttpJob] = OrderedDict()

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
        """Admit and submit ``request`` and stream its rendered events into a new job's log.

        Args:
            first: payloads logged before any event (the opening chunk).
            stop_when: asked after each event; True ends the job early (a stop sequence) and
                cancels it in the engine.

        Raises:
            EngineError: the job was refused (rate, budget, queue, size).
        """
        self._expire()
        await self.submitter.admit(owner, request)
        job = HttpJob(job_id, owner, origin, started_at=self._clock())
        job.add(list(first or ()))
        spec = JobSpec(
            request=request,
            origin=origin,
            owner=owner,
            sinks=(_LogSink(job, render, stop_when),),
            busy=Busy.REFUSE,
            held=len(request.image),
            release=self.submitter.done_with,
            on_end=functools.partial(self._ended, job),
        )
        try:
            job.run = self.runner.start(spec)
        except BaseException:
            self.submitter.done_with(spec.held)
            raise
        self._jobs[job_id] = job
        log.info("http_job_submitted", job_id=job_id, token=owner, origin=origin)
        return job

    def _ended(self, job: HttpJob, run: Job) -> None:
        job.outcome = run.outcome or "internal"
        job.end(self._clock())
        log.info("http_job_ended", job_id=job.id, chunks=len(job.chunks), outcome=job.outcome)

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
        if job is None or job.ended or job.run is None:
            return False
        job.run.cancel()
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
        tasks = {j.run.task for j in self._jobs.values() if j.run is not None and j.run.task}
        await finish_or_cancel(tasks, timeout_s)


@dataclass(slots=True)
class _LogSink:
    """Renders a job's events into its chunk log; a stop sequence ends the job early."""

    job: HttpJob
    render: Render
    stop_when: Callable[[], bool] | None
    required: bool = False

    async def open(self) -> None:
        return None

    async def send(self, event: JobEvent) -> None:
        self.job.add(self.render(event))
        if self.stop_when is not None and event.kind not in TERMINAL_KINDS and self.stop_when():
            raise EndJob("stopped")
