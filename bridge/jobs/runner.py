"""The one job runner: every job, from any entry point, is submitted, streamed and ended here.

An entry point (a /ws session, an IM message, an HTTP request) admits a job by its own rules
(rate limits, the memory budget, dedupe), describes it as a :class:`JobSpec` and hands it to
:class:`JobRunner`. The runner submits it to the engine under the spec's busy policy, streams every
event to the spec's sinks in order, and guarantees each sink exactly one terminal event (``done``
or ``error``): an engine failure, a crash of the stream or a shutdown still ends the job once. It
keeps the live jobs by id, so a cancel from any surface (or from another node) finds them, and it
reports each job's end once (``bridge_jobs_total{origin,outcome}``).
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from adapters.retry import Backoff
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

STOPPED = Failed("internal", "the server stopped before the job finished")
CRASHED = Failed("internal", "the job ended without a result")


class Busy(enum.Enum):
    """What a job does when the engine's queue is full."""

    REFUSE = "refuse"  # the submit fails at once with ``busy`` (clients retry: /ws, HTTP)
    WAIT = "wait"  # wait and submit again until accepted (IM messages, which nobody resubmits)


class JobSink(Protocol):
    """Where a job's events go (a session, a topic, an IM reply card, an HTTP chunk log).

    ``required`` sinks carry the job's purpose: when one raises, the job is cancelled in the
    engine and the error reaches the caller of :meth:`JobRunner.run` (who may retry). Errors of
    other sinks are logged and that sink is skipped from then on, so one broken subscriber never
    costs another its answer.
    """

    required: bool

    async def open(self) -> None:
        """Called once the engine has accepted the job, before its first event (an IM reply
        card is posted here, while the job waits in the engine's queue)."""
        ...

    async def send(self, event: JobEvent) -> None:
        """Deliver one event (the last one is the terminal event)."""
        ...


class EndJob(Exception):
    """Raised by a sink to end the job early with ``outcome`` (an HTTP stop sequence): the job is
    cancelled in the engine and no later event is delivered."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


@dataclass(slots=True)
class JobSpec:
    """One job as an entry point describes it.

    Attributes:
        request: what the engine runs; ``request.job_id`` is the job's id, unique among live
            jobs (``ws:<session>:<id>``, ``<platform>:<message id>``, ``chatcmpl-…``).
        origin: the entry point (``ws``, ``feishu``, ``http``, ``analyze``…), the metrics label.
        owner: who may cancel the job and read its events (a token label or a platform).
        sinks: where its events go, in order.
        busy: refuse or wait when the engine's queue is full.
        held: bytes the entry point reserved for the image (the in-flight budget), given back
            through ``release`` once the engine starts or ends the job.
        end_on_stop: on shutdown, end the job in its sinks with an ``internal`` error; False for
            jobs that are run again after a restart (an IM message still pending in the inbox).
        on_end: called with the job once it has ended (its entry point forgets it).
    """

    request: JobRequest
    origin: str
    owner: str
    sinks: Sequence[JobSink]
    busy: Busy = Busy.REFUSE
    held: int = 0
    release: Callable[[int], None] | None = None
    end_on_stop: bool = True
    on_end: Callable[[Job], None] | None = None

    @property
    def id(self) -> str:
        """The job's id (the engine's, the events', the logs')."""
        return self.request.job_id


@dataclass(eq=False, slots=True)
class Job:
    """A live or finished job: its spec, the engine's handle, and its outcome once ended."""

    spec: JobSpec
    handle: JobHandle | None = None
    outcome: str | None = None
    task: asyncio.Task[str] | None = None
    #: The required sink whose error ended the job (the error went to the caller).
    failed_sink: JobSink | None = None
    _broken: set[int] = field(default_factory=set)
    #: Sinks that have their terminal event (a made-up one never follows it).
    _ended: set[int] = field(default_factory=set)

    def cancel(self) -> None:
        """Ask the engine to stop the job; it then ends with a ``cancelled`` error event."""
        if self.handle is not None:
            self.handle.cancel()


class JobRunner:
    """Submits jobs to the engine and streams their events to their sinks, once each.

    Args:
        engine: runs the jobs.
        on_end: told ``(spec, outcome)`` once per job (``done``, ``cached``, an error code,
            ``stopped`` or an :class:`EndJob` outcome), for metrics.
        busy_backoff: delays between submits of a waiting job when the engine gives no
            ``retry_after`` (a fresh one per job is made from it).
        sleep: awaited between those submits (injected by tests).
    """

    def __init__(
        self,
        engine: EngineLike,
        *,
        on_end: Callable[[JobSpec, str], None] | None = None,
        busy_backoff: Callable[[], Backoff] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.engine = engine
        self.on_end = on_end
        self._backoff = busy_backoff or (lambda: Backoff(initial=0.5, cap=5.0))
        self._sleep = sleep
        self._live: dict[str, list[Job]] = {}
        self.tasks: set[asyncio.Task[str]] = set()
        self._endings: set[asyncio.Task[None]] = set()
        self.stopping = False

    # --- lookups -----------------------------------------------------------------------------
    def live(self, job_id: str) -> list[Job]:
        """The jobs with that id running now (usually one)."""
        return list(self._live.get(job_id, ()))

    def is_live(self, job_id: str) -> bool:
        """Whether a job with that id runs now."""
        return job_id in self._live

    def live_count(self, origin: str | None = None) -> int:
        """How many jobs run now (of one origin, or all)."""
        return sum(
            1 for jobs in self._live.values() for j in jobs if origin in (None, j.spec.origin)
        )

    def cancel(self, job_id: str, owner: str | None = None) -> bool:
        """Cancel the live jobs with that id (of ``owner`` only, when given); False if none."""
        jobs = [j for j in self._live.get(job_id, ()) if owner is None or j.spec.owner == owner]
        for job in jobs:
            job.cancel()
        if jobs:
            log.info("job_cancel", job_id=job_id, jobs=len(jobs))
        return bool(jobs)

    # --- running -----------------------------------------------------------------------------
    def start(self, spec: JobSpec) -> Job:
        """Submit ``spec`` now and stream it in a background task (kept until it ends).

        Raises:
            EngineError: the engine refused the job (``busy`` under :attr:`Busy.REFUSE`,
                ``too_large``…); nothing was delivered and ``held`` is still the caller's.
        """
        job = Job(spec)
        job.handle = self._submit_now(spec)
        self._enter(job)
        task = asyncio.get_running_loop().create_task(self._stream(job), name=f"job:{spec.id}")
        job.task = task
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._task_done, job))
        return job

    def _task_done(self, job: Job, task: asyncio.Task[str]) -> None:
        """Forget an ended task; end its job here if the task was cancelled before its first
        step (its coroutine never ran, so :meth:`_stream` could not end the job itself)."""
        self.tasks.discard(task)
        if not any(j is job for j in self._live.get(job.spec.id, ())):
            return
        log.warning("job_cancelled_before_start", job_id=job.spec.id, origin=job.spec.origin)
        job.cancel()
        if job.spec.held:
            self._release(job.spec, job.spec.held)
        ending = asyncio.get_running_loop().create_task(self._end_unrun(job))
        self._endings.add(ending)
        ending.add_done_callback(self._endings.discard)

    async def _end_unrun(self, job: Job) -> None:
        """Give a job that never ran its ``internal`` end (unless its spec says otherwise)."""
        try:
            if job.spec.end_on_stop:
                job.outcome = "internal"
                await self._deliver_quietly(job, None)
                await self._deliver_quietly(job, STOPPED)
        finally:
            self._leave(job)

    async def run(self, spec: JobSpec) -> str:
        """Submit ``spec`` (waiting while the engine is busy, under :attr:`Busy.WAIT`) and stream
        it to its end in the calling task; returns the outcome.

        Raises:
            EngineError: the engine refused the job.
            Exception: a required sink failed (the job was cancelled in the engine).
        """
        job = Job(spec)
        job.handle = await self._submit(spec)
        self._enter(job)
        return await self._stream(job)

    def _submit_now(self, spec: JobSpec) -> JobHandle:
        try:
            return self.engine.submit(spec.request)
        except EngineError:
            raise
        except Exception as exc:
            log.exception("job_submit_failed", job_id=spec.id, origin=spec.origin)
            raise EngineError("internal", "the engine failed to accept the job") from exc

    async def _submit(self, spec: JobSpec) -> JobHandle:
        backoff: Backoff | None = None
        while True:
            try:
                return self._submit_now(spec)
            except EngineError as exc:
                if exc.code != "busy" or spec.busy is Busy.REFUSE or self.stopping:
                    raise
                backoff = backoff or self._backoff()
                delay = exc.retry_after or backoff.next_delay()
                log.info("job_waits_busy", job_id=spec.id, origin=spec.origin, retry_s=delay)
                await self._sleep(delay)

    def _enter(self, job: Job) -> None:
        # No log line here: each entry point logs its own (ws_job_submitted, im_accepted...).
        self._live.setdefault(job.spec.id, []).append(job)

    async def _stream(self, job: Job) -> str:
        """Deliver the engine's events until the terminal one; always end the job once."""
        spec, handle = job.spec, job.handle
        assert handle is not None
        held = spec.held
        ended = False
        try:
            await self._deliver(job, None)
            events = handle.events()
            async for event in events:
                terminal = event.kind in TERMINAL_KINDS
                if held and (terminal or event.kind == "started"):
                    held = self._release(spec, held)
                try:
                    await self._deliver(job, event)
                except EndJob as end:
                    ended = True
                    job.outcome = end.outcome
                    handle.cancel()
                    break
                if terminal:
                    ended = True
                    job.outcome = _outcome(event)
                    break
            # Close the stream here: left to the loop's finalizer, an unfinished async generator
            # costs a task per job (its aclose scheduled on the loop).
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        except asyncio.CancelledError:
            handle.cancel()
            if not ended and spec.end_on_stop:
                ended = True
                job.outcome = "internal"
                await self._deliver_quietly(job, STOPPED)
            raise
        except Exception:
            handle.cancel()
            if job.failed_sink is not None:
                ended = True  # the caller retries the whole job; its events continue then
                raise
            log.exception("job_stream_failed", job_id=spec.id, origin=spec.origin)
        finally:
            if held:
                self._release(spec, held)
            if not ended and job.outcome is None and not _cancelling():
                job.outcome = "internal"
                await self._deliver_quietly(job, CRASHED)
            self._leave(job)
        return job.outcome or "internal"

    async def _deliver(self, job: Job, event: JobEvent | None) -> None:
        """Give ``event`` to every working sink in order (None: open them); a sink that has
        its terminal event gets nothing more."""
        for index, sink in enumerate(job.spec.sinks):
            if index in job._broken or index in job._ended:
                continue
            try:
                await (sink.open() if event is None else sink.send(event))
                if event is not None and event.kind in TERMINAL_KINDS:
                    job._ended.add(index)
            except EndJob:
                raise
            except Exception as exc:
                if sink.required:
                    job.failed_sink = sink
                    raise
                job._broken.add(index)
                log.error(
                    "job_sink_failed", job_id=job.spec.id, sink=type(sink).__name__, error=repr(exc)
                )

    async def _deliver_quietly(self, job: Job, event: JobEvent | None) -> None:
        """Deliver a terminal event the runner made up (None: open the sinks); failures here
        are only logged."""
        try:
            await self._deliver(job, event)
        except Exception as exc:
            log.error("job_end_undelivered", job_id=job.spec.id, error=repr(exc))

    def _release(self, spec: JobSpec, held: int) -> int:
        if spec.release is not None:
            spec.release(held)
        return 0

    def _leave(self, job: Job) -> None:
        spec = job.spec
        jobs = [j for j in self._live.pop(spec.id, ()) if j is not job]
        if jobs:
            self._live[spec.id] = jobs
        outcome = job.outcome or "internal"
        log.info("job_ended", job_id=spec.id, origin=spec.origin, outcome=outcome)
        try:
            if spec.on_end is not None:
                spec.on_end(job)
            if self.on_end is not None:
                self.on_end(spec, outcome)
        except Exception as exc:  # bookkeeping must never break a job
            log.error("job_on_end_failed", job_id=spec.id, error=repr(exc))

    async def stop(self, timeout_s: float) -> None:
        """Let the jobs started here finish for up to ``timeout_s``, then cancel the rest (they
        end with an ``internal`` error event unless their spec says otherwise)."""
        self.stopping = True
        await finish_or_cancel(self.tasks, timeout_s)
        if self._endings:
            await asyncio.gather(*self._endings, return_exceptions=True)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _outcome(event: JobEvent) -> str:
    if isinstance(event, Done):
        return "cached" if event.cached else "done"
    if isinstance(event, Failed):
        return event.code
    return "internal"


async def finish_or_cancel(tasks: set[asyncio.Task[Any]], timeout_s: float) -> None:
    """Let ``tasks`` finish for up to ``timeout_s``, then cancel and await the rest."""
    if tasks:
        await asyncio.wait(set(tasks), timeout=max(0.0, timeout_s))
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
