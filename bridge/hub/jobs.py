"""Jobs of /ws sessions: validate and decode a submit, run it on the engine, stream its events.

A job belongs to its session, not its connection: it runs on while the client is away and its
events wait in the replay buffer. Every job ends with exactly one ``done`` or ``error`` event.
A cancel reaches the job wherever it runs: on this node through any object of its session (a
session that moved away and came back is a new object), on another node through the cluster
(:meth:`bridge.hub.moves.SessionMoves.cancel_elsewhere`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from bridge.hub import protocol as p
from bridge.hub.inflight import InflightBudget
from bridge.hub.session import Session
from bridge.hub.ws import Connection
from engine.types import TERMINAL_KINDS, EngineError, EngineLike, Failed, JobHandle, JobRequest

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Job:
    """A live job: the engine's handle, the task streaming its events, its session's owner label
    (checked before a cancel from another node stops it)."""

    handle: JobHandle
    task: asyncio.Task[None]
    owner: str


#: ``forward(session, job_id)``: ask the cluster to cancel an open job of ``session`` that does not
#: run on this node; False when the request could not be sent.
ForwardCancel = Callable[[Session, str], bool]


class JobRunner:
    """Submits, cancels and streams the jobs of every session.

    Args:
        engine: runs the jobs.
        max_image_bytes: largest decoded image accepted.
        emit: gives an event tail the session's next seq and delivers it (the hub's fan-in point);
            its third argument is the client job id the event ends (its terminal event), or None.
        budget: the inflight budget; a job's image bytes stay reserved in it until the engine
            starts (or ends) the job, since until then they wait in the engine's queue.

    Attributes:
        forward_cancel: in a cluster, sends a cancel for an open job of the session that does not
            run here to the node running it (None: a single node, where such a job cannot exist).
    """

    def __init__(
        self,
        engine: EngineLike,
        max_image_bytes: int,
        emit: Callable[[Session, str, str | None], None],
        *,
        budget: InflightBudget | None = None,
    ) -> None:
        self.engine = engine
        self.budget = budget
        self.max_image_bytes = max_image_bytes
        self._emit = emit
        self.tasks: set[asyncio.Task[None]] = set()
        self.forward_cancel: ForwardCancel | None = None
        # Jobs running here by (session id, client job id), whichever Session object holds them
        # (a session that moved away and came back is a new object; its old jobs still run).
        self._live: dict[tuple[str, str], list[Job]] = {}

    def is_live(self, session_id: str, job_id: str) -> bool:
        """Whether this node runs job ``job_id`` of session ``session_id`` now."""
        return (session_id, job_id) in self._live

    def live(self, session_id: str, job_id: str) -> list[Job]:
        """The jobs with that id of that session running on this node now (usually one)."""
        return list(self._live.get((session_id, job_id), ()))

    def submit(self, conn: Connection, session: Session, frame: p.Submit) -> None:
        """Decode, size-check and submit a job; refusals are answered with an error frame."""
        if session.knows_job(frame.id):
            conn.send(p.error("duplicate_id", "this session already used that job id", frame.id))
            return
        try:
            image = base64.b64decode(frame.image_b64, validate=True)
        except (binascii.Error, ValueError):
            conn.send(p.error("bad_image", "'image' is not valid base64", frame.id))
            return
        if len(image) > self.max_image_bytes:
            conn.send(p.error("too_large", f"image exceeds {self.max_image_bytes} bytes", frame.id))
            return
        request = JobRequest(
            job_id=f"ws:{session.id}:{frame.id}",
            image=image,
            prompt=frame.prompt,
            max_tokens=frame.max_tokens,
        )
        try:
            handle = self.engine.submit(request)
        except EngineError as exc:
            conn.send(p.error(exc.code, exc.message, frame.id))
            return
        except Exception:
            log.exception("ws_submit_failed", conn_id=conn.id, job_id=frame.id)
            conn.send(p.error("internal", "the engine failed to accept the job", frame.id))
            return
        session.remember_job(frame.id)  # only accepted jobs: a refused id may be retried
        if not session.open_job(frame.id):
            log.warning("ws_open_jobs_capped", session=session.id, job_id=frame.id)
        held = len(image)
        if self.budget is not None:
            self.budget.force_reserve(held)
        del image, request
        task = asyncio.get_running_loop().create_task(self._run(session, frame.id, handle, held))
        job = Job(handle, task, session.owner)
        self._live.setdefault((session.id, frame.id), []).append(job)
        session.jobs[frame.id] = job
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        log.info("ws_job_submitted", conn_id=conn.id, session=session.id, job_id=frame.id)

    async def _run(self, session: Session, job_id: str, handle: JobHandle, held: int = 0) -> None:
        """Stream a job's engine events into the session until its one terminal event
        (``held``: image bytes reserved in the budget, released once the engine starts it)."""
        ended = False
        budget = self.budget
        try:
            async for event in handle.events():
                terminal = event.kind in TERMINAL_KINDS
                if held and budget is not None and (terminal or event.kind == "started"):
                    budget.release(held)
                    held = 0
                self._emit(session, p.event_tail(job_id, event), job_id if terminal else None)
                if terminal:
                    ended = True
                    break
        except asyncio.CancelledError:
            handle.cancel()
            if not ended:
                ended = True
                failed = Failed("internal", "the server stopped before the job finished")
                self._emit(session, p.event_tail(job_id, failed), job_id)
            raise
        except Exception:
            log.exception("ws_job_failed", session=session.id, job_id=job_id)
        finally:
            if held and budget is not None:
                budget.release(held)
            if not ended:
                failed = Failed("internal", "the job ended without a result")
                self._emit(session, p.event_tail(job_id, failed), job_id)
            session.jobs.pop(job_id, None)
            self._unlive(session.id, job_id, handle)

    def _unlive(self, session_id: str, job_id: str, handle: JobHandle) -> None:
        key = (session_id, job_id)
        jobs = [job for job in self._live.pop(key, ()) if job.handle is not handle]
        if jobs:
            self._live[key] = jobs

    def cancel(self, conn: Connection, session: Session, frame: p.Cancel) -> None:
        """Cancel a live job of the session; it then ends with a ``cancelled`` error event.

        A job open in the session but running on another node (the session moved here while it
        ran) is cancelled there: nothing is answered now, the job's own terminal event follows.
        """
        jobs = self.live(session.id, frame.id)
        if jobs:
            for job in jobs:
                job.handle.cancel()
            log.info("ws_job_cancel", conn_id=conn.id, session=session.id, job_id=frame.id)
            return
        forward = self.forward_cancel
        if forward is not None and frame.id in session.open_jobs:
            if forward(session, frame.id):
                log.info(
                    "ws_job_cancel_forwarded", conn_id=conn.id, session=session.id, job_id=frame.id
                )
            else:
                msg = "the cancel could not be sent to the node running the job; retry"
                conn.send(p.error("internal", msg, frame.id))
            return
        conn.send(p.error("unknown_job", "no live job with that id", frame.id))

    async def stop(self, timeout_s: float) -> None:
        """Let running jobs finish for up to ``timeout_s``, then cancel the rest (they end with an
        ``internal`` error event that stays replayable)."""
        await finish_or_cancel(self.tasks, timeout_s)


async def finish_or_cancel(tasks: set[asyncio.Task[None]], timeout_s: float) -> None:
    """Let ``tasks`` finish for up to ``timeout_s``, then cancel and await the rest (the job
    tasks of /ws here and of the HTTP API in :mod:`bridge.http.jobs`)."""
    if tasks:
        await asyncio.wait(set(tasks), timeout=max(0.0, timeout_s))
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
