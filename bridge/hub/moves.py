"""Sessions moving between the nodes of a cluster: who holds a session, and where its events go.

One node holds a session at a time. A resume on another node claims it (:mod:`bridge.hub.handoff`);
the holder closes its connection (4005), writes the session to the store, stops delivering its
topics and answers; the claimer loads the now-current session from the store and numbers every
later event. Jobs still running on the old node keep going: their events are forwarded to whichever
node it was handed to, and on along the chain if it moved again (each hop keeps the order), so a
job that finishes while its client moves is still replayed on return. A client's cancel for such
a job is broadcast by the node holding the session; the node running the job stops it, and its
``cancelled`` error event follows the session like any other.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from bridge.cluster.bus import Bus
from bridge.hub.config import HubConfig
from bridge.hub.handoff import Answer, CancelRequest, Claim, Handoff
from bridge.hub.orphans import IsLive, unsettled
from bridge.hub.persist import STORE_TIMEOUT_S, WriteBehind
from bridge.hub.registry import SessionRegistry
from bridge.hub.session import Session
from bridge.jobs.runner import Job

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Moved:
    """A session handed to another node; ``session`` is the object this node's jobs still hold."""

    session: Session
    target: str
    at: float


class SessionMoves:
    """This node's side of moving sessions: claims before a resume, releases, forwarding.

    Args:
        bus: the cluster bus (never closed here).
        node_id: this node's id, unique in the cluster.
        cfg: the hub's settings (handoff deadline, session TTL).
        registry: the sessions this node holds.
        writes: the write-behind queue (a released session is written at once).
        clock: monotonic seconds.
        emit: numbers and delivers an event in a session this node holds (the hub's fan-in).
        take_over: closes the session's connection here (4005) because another node resumed it.
        is_live: whether this node runs a job of a session (``(session_id, job_id)``) now.
        live_jobs: the jobs of a session (``(session_id, job_id)``) running on this node now.
    """

    def __init__(
        self,
        bus: Bus,
        node_id: str,
        cfg: HubConfig,
        registry: SessionRegistry,
        writes: WriteBehind,
        clock: Callable[[], float],
        emit: Callable[[Session, str], None],
        take_over: Callable[[Session], None],
        is_live: IsLive,
        live_jobs: Callable[[str, str], list[Job]],
    ) -> None:
        self.node_id = node_id
        self.cfg = cfg
        self.registry = registry
        self.writes = writes
        self._clock = clock
        self._emit = emit
        self._take_over = take_over
        self._is_live = is_live
        self._live_jobs = live_jobs
        self.handoff = Handoff(
            bus,
            node_id,
            # The hello deadline runs during the claim: leave the load time to finish it.
            min(cfg.handoff_timeout_s, cfg.hello_timeout_s / 2),
            on_claim=self._on_claim,
            on_event=self._on_forwarded,
            on_cancel=self._on_cancel,
        )
        self.moved: dict[str, Moved] = {}
        self._releases: set[asyncio.Task[None]] = set()
        self.released = 0

    async def start(self) -> None:
        """Start listening for claims and forwarded events."""
        await self.handoff.start()

    async def stop(self, timeout_s: float) -> None:
        """Finish releases in progress, publish queued messages, stop listening."""
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=max(0.05, timeout_s))
        for task in list(self._releases):
            task.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)
        await self.handoff.stop(max(0.05, timeout_s))

    # --- the claimer's side ----------------------------------------------------------------
    async def claim(self, session_id: str, label: str, conn_id: str) -> Answer | None:
        """Before resuming a session this node does not hold: get its holder to let go.

        Only the owning token may move a session (the store's owner record, and the holder
        checks the claim's token label too), so a stranger's hello never closes anyone's
        connection. The claim waits for an answer when the store names another node as holder,
        or names no owner yet (a session younger than one flush interval). Returns the holder's
        answer (None: nobody answered or none was due).
        """
        try:
            async with asyncio.timeout(min(STORE_TIMEOUT_S, self.cfg.hello_timeout_s)):
                owner = await self.writes.owner_of(session_id)
                holder = await self.writes.node_of(session_id) if owner is not None else None
        except Exception as exc:
            log.warning("hub_store_load_failed", conn_id=conn_id, error=repr(exc))
            return None
        if owner is not None and not hmac.compare_digest(owner, label):
            return None
        wait = owner is None or holder is not None
        answer = await self.handoff.claim(session_id, label, holder, wait=wait)
        log.info(
            "hub_session_claimed",
            conn_id=conn_id,
            session=session_id,
            holder=holder,
            answer=None if answer is None else answer.kind,
        )
        return answer

    def adopted(self, session_id: str, session: Session | None, answer: Answer | None) -> None:
        """After the store load: apply the holder's last seq and the events held meanwhile.

        A graceful release means the session's open jobs still run on the old node (their events
        follow the session), so they are no orphans, except those the holder itself had loaded
        from the store and never ended (it restarted after a crash): it names them in its answer.
        Must run with no await after the load, so no forwarded event can slip past the held ones.
        """
        held = self.handoff.take_held(session_id)
        if session is None:
            if held:
                log.error("hub_handoff_events_dropped", session=session_id, dropped=len(held))
            return
        self.moved.pop(session_id, None)
        if answer is not None and answer.kind == "released":
            session.pending_orphans.intersection_update(answer.orphans)
            if session.advance(answer.last_seq):
                # The old holder could not write its last events: never reuse their seqs.
                self.writes.mark(session)
                log.warning(
                    "hub_handoff_store_behind", session=session_id, last_seq=answer.last_seq
                )
        for tail in held:
            self._emit(session, tail)

    async def hold(self, session: Session) -> None:
        """Name this node as the session's holder in the store (the next claim asks us)."""
        await self.writes.claim_node(session)

    # --- the holder's side -----------------------------------------------------------------
    def _on_claim(self, claim: Claim) -> None:
        session = self.registry.sessions.get(claim.session)
        if session is not None and not hmac.compare_digest(session.owner, claim.owner):
            log.warning("hub_claim_refused", session=claim.session, node=claim.node)
            return
        if session is not None and session.moved_to is None:
            task = asyncio.get_running_loop().create_task(self._release(session, claim))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)
            return
        if claim.session not in self.moved and claim.expect == self.node_id:
            self.handoff.answer(claim, "absent")  # the store still names us: say so at once

    async def _release(self, session: Session, claim: Claim) -> None:
        """Let ``claim.node`` have ``session``: stop using it here, store it, answer."""
        session.moved_to = claim.node
        self.registry.release(session)
        self.moved[session.id] = Moved(session, claim.node, self._clock())
        self._take_over(session)
        # Candidates this node loaded from the store and never ended: not running here either.
        orphans = unsettled(session, self._is_live)
        stored = await self.writes.flush_one(session)
        self.handoff.answer(claim, "released", session.last_seq, orphans)
        self.released += 1
        log.info(
            "hub_session_released",
            session=session.id,
            to=claim.node,
            last_seq=session.last_seq,
            stored=stored,
            orphans=len(orphans),
        )

    # --- cancels of jobs running on another node --------------------------------------------
    def cancel_elsewhere(self, session: Session, job_id: str) -> bool:
        """Ask the node running open job ``job_id`` of ``session`` (held here) to cancel it.

        The job's terminal event (``cancelled``, or whatever ended it first) comes back like its
        other events. False when the request could not be queued.
        """
        return self.handoff.cancel(session.id, job_id, session.owner)

    def _on_cancel(self, req: CancelRequest) -> None:
        """Another node's client cancelled a job: stop it if it runs here for the same owner."""
        jobs = self._live_jobs(req.session, req.job)
        if not jobs:
            return  # it runs elsewhere, or it has ended and its terminal event is on its way
        owner = req.owner.encode()  # bytes: a non-ASCII label from the bus must not raise
        if not all(hmac.compare_digest(job.spec.owner.encode(), owner) for job in jobs):
            log.warning("hub_cancel_refused", session=req.session, job_id=req.job, node=req.node)
            return
        for job in jobs:
            job.cancel()
        log.info("hub_job_cancel_remote", session=req.session, job_id=req.job, node=req.node)

    # --- forwarding ------------------------------------------------------------------------
    def route(self, session: Session, tail: str) -> Session | None:
        """Where an event of a moved session goes: a session held here, or (forwarded) None."""
        current = self.registry.sessions.get(session.id)
        if current is not None and current.moved_to is None:
            return current  # it came back to this node
        if self.handoff.hold(session.id, tail):
            return None  # it is coming back: the claim applies it after the store load
        moved = self.moved.get(session.id)
        target = moved.target if moved is not None else session.moved_to
        if moved is not None:
            moved.at = self._clock()
        if target is not None:
            self.handoff.forward(target, session.id, tail)
        return None

    def _on_forwarded(self, session_id: str, tail: str) -> None:
        current = self.registry.sessions.get(session_id)
        if current is not None and current.moved_to is None:
            self._emit(current, tail)
            return
        moved = self.moved.get(session_id)
        if moved is not None and moved.target != self.node_id:
            moved.at = self._clock()
            self.handoff.forward(moved.target, session_id, tail)  # it moved on: pass it along
            return
        log.warning("hub_forwarded_event_dropped", session=session_id)

    def sweep(self) -> None:
        """Forget forwarding for sessions with no job left here and no use for a session TTL."""
        horizon = self._clock() - self.cfg.session_ttl_s
        for session_id, moved in list(self.moved.items()):
            if not moved.session.jobs and moved.at < horizon:
                del self.moved[session_id]
