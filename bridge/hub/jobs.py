"""Jobs of /ws sessions: validate and decode a submit, run it on the job runner into the session.

A job belongs to its session, not its connection: it runs on while the client is away and its
events wait in the replay buffer. Every job ends with exactly one ``done`` or ``error`` event.
A cancel reaches the job wherever it runs: on this node through any object of its session (a
session that moved away and came back is a new object), on another node through the cluster
(:meth:`bridge.hub.moves.SessionMoves.cancel_elsewhere`, on the cluster's event log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
from dataclasses import dataclass
from typing import Protocol

import structlog

from bridge.hub import protocol as p
from bridge.hub.inflight import InflightBudget
from bridge.hub.session import Session
from bridge.hub.ws import Connection
from bridge.jobs.runner import Busy, Job, JobRunner, JobSpec
from engine.types import TERMINAL_KINDS, EngineError, JobEvent, JobRequest

log = structlog.get_logger(__name__)


class EventHost(Protocol):
    """Where a session's job events go: the hub numbers them in the session holding it now."""

    def emit_into(self, session: Session, tail: str, closes: str | None) -> None: ...


class RemoteCancels(Protocol):
    """In a cluster: cancels for open jobs of a session that run on another node."""

    def cancel_elsewhere(self, session: Session, job_id: str) -> bool:
        """Send the cancel to the node running the job; False when it could not be sent."""
        ...


def engine_job_id(session_id: str, job_id: str) -> str:
    """The id a session's job runs under in the engine and the job runner."""
    return f"ws:{session_id}:{job_id}"


class LiveSessionJobs:
    """The /ws jobs running on this node, by session and client job id (a view of the runner).

    A session that moved away and came back is a new object; its old jobs still run and are
    found here by id, whichever object holds them.
    """

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def is_live(self, session_id: str, job_id: str) -> bool:
        """Whether this node runs job ``job_id`` of session ``session_id`` now."""
        return self.runner.is_live(engine_job_id(session_id, job_id))

    def live(self, session_id: str, job_id: str) -> list[Job]:
        """The jobs with that id of that session running on this node now (usually one)."""
        return self.runner.live(engine_job_id(session_id, job_id))


class SessionJobs:
    """The /ws entry point of the job pipeline: admits a session's submits and cancels.

    A submit is validated and decoded here, then run by the shared :class:`JobRunner` with the
    session as its sink (busy means refuse: the client may resubmit).

    Args:
        runner: the bridge's job runner.
        max_image_bytes: largest decoded image accepted.
        host: numbers each event in the session holding it now and delivers it.
        budget: the inflight budget; a job's image bytes stay reserved in it until the engine
            starts (or ends) the job, since until then they wait in the engine's queue.
        remote: in a cluster, sends a cancel for an open job of the session that does not run
            here to the node running it (None: a single node, where such a job cannot exist).
    """

    def __init__(
        self,
        runner: JobRunner,
        max_image_bytes: int,
        *,
        host: EventHost,
        budget: InflightBudget | None = None,
        remote: RemoteCancels | None = None,
    ) -> None:
        self.runner = runner
        self.budget = budget
        self.max_image_bytes = max_image_bytes
        self._emit = host.emit_into
        self._remote = remote

    @property
    def tasks(self) -> set[asyncio.Task[str]]:
        """The runner's job tasks (tests abandon them to simulate a crash)."""
        return self.runner.tasks

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
        budget = self.budget
        spec = JobSpec(
            request=JobRequest(
                job_id=engine_job_id(session.id, frame.id),
                image=image,
                prompt=frame.prompt,
                max_tokens=frame.max_tokens,
            ),
            origin="ws",
            owner=session.owner,
            sinks=(_SessionSink(self, session, frame.id),),
            busy=Busy.REFUSE,
            held=len(image) if budget is not None else 0,
            release=budget.release if budget is not None else None,
            on_end=functools.partial(_forget, session, frame.id),
        )
        del image
        try:
            job = self.runner.start(spec)
        except EngineError as exc:
            conn.send(p.error(exc.code, exc.message, frame.id))
            return
        if budget is not None:  # before the job's task first runs, which may release it
            budget.force_reserve(spec.held)
        session.remember_job(frame.id)  # only accepted jobs: a refused id may be retried
        if not session.open_job(frame.id):
            log.warning("ws_open_jobs_capped", session=session.id, job_id=frame.id)
        session.jobs[frame.id] = job
        log.info("ws_job_submitted", conn_id=conn.id, session=session.id, job_id=frame.id)

    def cancel(self, conn: Connection, session: Session, frame: p.Cancel) -> None:
        """Cancel a live job of the session; it then ends with a ``cancelled`` error event.

        A job open in the session but running on another node (the session moved here while it
        ran) is cancelled there: nothing is answered now, the job's own terminal event follows.
        """
        if self.runner.cancel(engine_job_id(session.id, frame.id)):
            log.info("ws_job_cancel", conn_id=conn.id, session=session.id, job_id=frame.id)
            return
        remote = self._remote
        if remote is not None and frame.id in session.open_jobs:
            if remote.cancel_elsewhere(session, frame.id):
                log.info(
                    "ws_job_cancel_forwarded", conn_id=conn.id, session=session.id, job_id=frame.id
                )
            else:
                msg = "the cancel could not be sent to the node running the job; retry"
                conn.send(p.error("internal", msg, frame.id))
            return
        conn.send(p.error("unknown_job", "no live job with that id", frame.id))


@dataclass(slots=True)
class _SessionSink:
    """Delivers a job's events into its session (numbered there, replayable)."""

    jobs: SessionJobs
    session: Session
    client_id: str
    required: bool = False

    async def open(self) -> None:
        return None

    async def send(self, event: JobEvent) -> None:
        closes = self.client_id if event.kind in TERMINAL_KINDS else None
        self.jobs._emit(self.session, p.event_tail(self.client_id, event), closes)


def _forget(session: Session, client_id: str, job: Job) -> None:
    if session.jobs.get(client_id) is job:
        del session.jobs[client_id]
