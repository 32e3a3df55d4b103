"""Sessions moving between the nodes of a cluster: who holds a session, and where its events go.

One node holds a session at a time. A resume on another node claims it (:mod:`bridge.hub.handoff`,
on the bus); the holder closes its connection (4005), writes the session to the store, stops
delivering its topics and answers with its last seq and its position in the cluster's event log;
the claimer loads the now-current session from the store and numbers every later event. Jobs still
running on the old node keep going: their events are appended to the event log (resumable, in
order, not at most once like the bus), every node reads them, and the node holding the session
numbers them. The claimer applies those the old holder had not read when it let go (kept in
:class:`~bridge.hub.unheld.UnheldEvents`), so a job that finishes while its client moves is still
replayed on return, whatever the bus dropped. A client's cancel for such a job goes the same way:
the node running it stops it, and its ``cancelled`` error event follows the session.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from bridge.cluster.bus import Bus
from bridge.cluster.eventlog import parse_entry_id
from bridge.hub.config import HubConfig
from bridge.hub.handoff import Answer, Claim, Handoff, answer_message, decode
from bridge.hub.orphans import closed_job, unsettled
from bridge.hub.persist import STORE_TIMEOUT_S, WriteBehind
from bridge.hub.registry import SessionRegistry
from bridge.hub.session import Session
from bridge.hub.unheld import EntryId, UnheldEvents
from bridge.jobs.runner import Job

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Moved:
    """A session handed to another node; ``session`` is the object this node's jobs still hold."""

    session: Session
    target: str
    at: float


class SessionHost(Protocol):
    """What the moves need of the hub."""

    def emit_into(self, session: Session, tail: str, closes: str | None) -> None:
        """Number an event in ``session`` (held here) and send it (``closes``: the own job it
        ends)."""
        ...

    def taken_elsewhere(self, session: Session) -> None:
        """Another node resumed ``session``: close its connection here (4005)."""
        ...


class LiveJobs(Protocol):
    """The /ws jobs running on this node."""

    def is_live(self, session_id: str, job_id: str) -> bool: ...

    def live(self, session_id: str, job_id: str) -> list[Job]: ...


class SessionLog(Protocol):
    """The cluster's event log as the moves use it (:class:`bridge.fanout.ClusterFanout`)."""

    @property
    def cursor(self) -> str | None:
        """The id of the last entry this node has read."""
        ...

    def publish_session(self, session_id: str, tail: str) -> bool: ...

    def publish_cancel(self, session_id: str, job_id: str, owner: str) -> bool: ...


class SessionMoves:
    """This node's side of moving sessions: claims before a resume, releases, logged events.

    Args:
        bus: the cluster bus (never closed here), for claims and their answers.
        node_id: this node's id, unique in the cluster.
        cfg: the hub's settings (handoff deadline, session TTL).
        registry: the sessions this node holds.
        writes: the write-behind queue (a released session is written at once).
        clock: monotonic seconds.
        host: numbers events in sessions held here; closes connections taken over.
        jobs: the /ws jobs running here (a released session's orphans are the others).
        events: the cluster's event log, where moved sessions' events and cancels go.
    """

    def __init__(
        self,
        bus: Bus,
        node_id: str,
        cfg: HubConfig,
        *,
        registry: SessionRegistry,
        writes: WriteBehind,
        clock: Callable[[], float],
        host: SessionHost,
        jobs: LiveJobs,
        events: SessionLog,
    ) -> None:
        self.node_id = node_id
        self.cfg = cfg
        self.registry = registry
        self.writes = writes
        self._clock = clock
        self._host = host
        self._jobs = jobs
        self._events = events
        # The hello deadline runs during the claim: leave the load time to finish it.
        claim_s = min(cfg.handoff_timeout_s, cfg.hello_timeout_s / 2)
        self.handoff = Handoff(bus, node_id, claim_s, on_claim=self._on_claim)
        self.moved: dict[str, Moved] = {}
        # Events read for sessions not held here; kept well past a claim's deadline.
        self.unheld = UnheldEvents(max(30.0, 4 * cfg.hello_timeout_s), clock)
        # Per session held here: the log position up to which its old holder applied events.
        self._floor: dict[str, EntryId] = {}
        self._claims: dict[str, float] = {}
        self._releases: set[asyncio.Task[None]] = set()
        self.released = 0

    async def start(self) -> None:
        """Start listening for claims (logged events come through the cluster fan-out)."""
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
        self._claims.setdefault(session_id, self._clock())
        answer = await self.handoff.claim(session_id, label, holder, wait=wait)
        if answer is None and wait and holder not in (None, self.node_id):
            answer = await self._noted_release(session_id)
        log.info(
            "hub_session_claimed",
            conn_id=conn_id,
            session=session_id,
            holder=holder,
            answer=None if answer is None else answer.kind,
        )
        return answer

    async def _noted_release(self, session_id: str) -> Answer | None:
        """The holder's answer to this claim as kept in the store, when the bus lost it."""
        req = self.handoff.claim_req(session_id)
        note = await self.writes.release_of(session_id)
        if req is None or note is None:
            return None
        try:
            answer = decode(note)
        except ValueError:
            return None
        if not isinstance(answer, Answer) or answer.req != req:
            return None  # an older release, or one to another claim
        log.info("hub_release_read_from_store", session=session_id, holder=answer.node)
        return answer

    def adopted(self, session_id: str, session: Session | None, answer: Answer | None) -> None:
        """After the store load: apply the holder's last seq and the logged events it had not read.

        A graceful release means the session's open jobs still run on the old node (their events
        follow the session), so they are no orphans, except those the holder itself had loaded
        from the store and never ended (it restarted after a crash): it names them in its answer.
        Must run with no await after the load, so no logged event can slip past the kept ones.
        """
        self.handoff.end_claim(session_id)
        since = self._claims.pop(session_id, None)
        floor = None
        if answer is not None and answer.kind == "released" and answer.cursor is not None:
            floor = parse_entry_id(answer.cursor)
        kept = self.unheld.take(session_id, floor, since)
        if session is None:
            if kept:
                log.error("hub_logged_events_dropped", session=session_id, dropped=len(kept))
            return
        self.moved.pop(session_id, None)
        if floor is not None:
            self._floor[session_id] = floor
        if answer is not None and answer.kind == "released":
            session.pending_orphans.intersection_update(answer.orphans)
            if session.advance(answer.last_seq):
                # The old holder could not write its last events: never reuse their seqs.
                self.writes.mark(session)
                log.warning(
                    "hub_handoff_store_behind", session=session_id, last_seq=answer.last_seq
                )
        for item in kept:
            self._floor[session_id] = item.entry
            self._host.emit_into(session, item.tail, closed_job(item.tail))

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
        # Every logged event read so far was applied here; the claimer applies the later ones.
        cursor = self._events.cursor
        self._floor.pop(session.id, None)
        self.registry.release(session)
        self.moved[session.id] = Moved(session, claim.node, self._clock())
        self._host.taken_elsewhere(session)
        # Candidates this node loaded from the store and never ended: not running here either.
        orphans = unsettled(session, self._jobs.is_live)
        stored = await self.writes.flush_one(session)
        answer = answer_message(self.node_id, claim, "released", session.last_seq, orphans, cursor)
        # In the store first: a claimer whose answer the bus loses reads it there.
        await self.writes.note_release(session.id, answer)
        self.handoff.send_answer(claim, answer)
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
        return self._events.publish_cancel(session.id, job_id, session.owner)

    def logged_cancel(self, session_id: str, job_id: str, owner: str, node: str) -> None:
        """Another node's client cancelled a job: stop it if it runs here for the same owner."""
        jobs = self._jobs.live(session_id, job_id)
        if not jobs:
            return  # it runs elsewhere, or it has ended and its terminal event is on its way
        owner_bytes = owner.encode()  # bytes: a non-ASCII label must not raise
        if not all(hmac.compare_digest(job.spec.owner.encode(), owner_bytes) for job in jobs):
            log.warning("hub_cancel_refused", session=session_id, job_id=job_id, node=node)
            return
        for job in jobs:
            job.cancel()
        log.info("hub_job_cancel_remote", session=session_id, job_id=job_id, node=node)

    # --- events of jobs whose session moved ------------------------------------------------
    def route(self, session: Session, tail: str) -> None:
        """An event of a job whose session object moved away: append it to the event log.

        Even when the session has come back to this node, the job's later events take the log,
        behind the ones it already put there, so they keep their order.
        """
        moved = self.moved.get(session.id)
        if moved is not None:
            moved.at = self._clock()
        if not self._events.publish_session(session.id, tail):
            log.error("hub_logged_event_lost", session=session.id)

    def logged_event(self, entry_id: str, session_id: str, tail: str) -> None:
        """A moved session's event read from the log: number it if the session is held here
        (and its old holder had not applied it), else keep it in case a claim adopts it."""
        current = self.registry.sessions.get(session_id)
        if current is None or current.moved_to is not None or session_id in self._claims:
            self.unheld.add(entry_id, session_id, tail)
            return
        position = parse_entry_id(entry_id)
        floor = self._floor.get(session_id)
        if floor is not None and position <= floor:
            return  # the old holder applied it before it let go
        self._floor[session_id] = position
        self._host.emit_into(current, tail, closed_job(tail))

    def sweep(self) -> None:
        """Forget forwarding for sessions with no job left here and no use for a session TTL."""
        horizon = self._clock() - self.cfg.session_ttl_s
        for session_id, moved in list(self.moved.items()):
            if not moved.session.jobs and moved.at < horizon:
                del self.moved[session_id]
        for session_id in [sid for sid in self._floor if sid not in self.registry.sessions]:
            del self._floor[session_id]
        # A claim whose hello never finished (the client went away mid-claim) ends here.
        stale = self._clock() - 2 * self.cfg.hello_timeout_s
        for session_id in [sid for sid, at in self._claims.items() if at < stale]:
            del self._claims[session_id]
            self.handoff.end_claim(session_id)
        self.unheld.trim()
