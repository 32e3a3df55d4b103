"""Jobs of /ws sessions: validate and decode a submit, run it on the engine, stream its events.

A job belongs to its session, not its connection: it runs on while the client is away and its
events wait in the replay buffer. Every job ends with exactly one ``done`` or ``error`` event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from bridge.hub import protocol as p
from bridge.hub.session import Session
from bridge.hub.ws import Connection
from engine.types import TERMINAL_KINDS, EngineError, EngineLike, Failed, JobHandle, JobRequest

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Job:
    """A live job: the engine's handle and the task streaming its events."""

    handle: JobHandle
    task: asyncio.Task[None]


class JobRunner:
    """Submits, cancels and streams the jobs of every session.

    Args:
        engine: runs the jobs.
        max_image_bytes: largest decoded image accepted.
        emit: gives an event tail the session's next seq and delivers it (the hub's fan-in point);
            its third argument is the client job id the event ends (its terminal event), or None.
    """

    def __init__(
        self,
        engine: EngineLike,
        max_image_bytes: int,
        emit: Callable[[Session, str, str | None], None],
    ) -> None:
        self.engine = engine
        self.max_image_bytes = max_image_bytes
        self._emit = emit
        self.tasks: set[asyncio.Task[None]] = set()
        # Jobs running here by (session id, client job id), whichever Session object holds them
        # (a session that moved away and came back is a new object; its old jobs still run).
        self._live: dict[tuple[str, str], int] = {}

    def is_live(self, session_id: str, job_id: str) -> bool:
        """Whether this node runs job ``job_id`` of session ``session_id`` now."""
        return (session_id, job_id) in self._live

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
        key = (session.id, frame.id)
        self._live[key] = self._live.get(key, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run(session, frame.id, handle))
        session.jobs[frame.id] = Job(handle, task)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        log.info("ws_job_submitted", conn_id=conn.id, session=session.id, job_id=frame.id)

    async def _run(self, session: Session, job_id: str, handle: JobHandle) -> None:
        """Stream a job's engine events into the session until its one terminal event."""
        ended = False
        try:
            async for event in handle.events():
                terminal = event.kind in TERMINAL_KINDS
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
            if not ended:
                failed = Failed("internal", "the job ended without a result")
                self._emit(session, p.event_tail(job_id, failed), job_id)
            session.jobs.pop(job_id, None)
            self._unlive(session.id, job_id)

    def _unlive(self, session_id: str, job_id: str) -> None:
        key = (session_id, job_id)
        count = self._live.pop(key, 0) - 1
        if count > 0:
            self._live[key] = count

    def cancel(self, conn: Connection, session: Session, frame: p.Cancel) -> None:
        """Cancel a live job of the session; it then ends with a ``cancelled`` error event."""
        job = session.jobs.get(frame.id)
        if job is None:
            conn.send(p.error("unknown_job", "no live job with that id", frame.id))
            return
        job.handle.cancel()
        log.info("ws_job_cancel", conn_id=conn.id, job_id=frame.id)

    async def stop(self, timeout_s: float) -> None:
        """Let running jobs finish for up to ``timeout_s``, then cancel the rest (they end with an
        ``internal`` error event that stays replayable)."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=max(0.0, timeout_s))
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
