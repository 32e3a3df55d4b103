"""A hub session: the part of a client that outlives its connections (seq, replay, topics, jobs).

Pure state, no I/O: the hub assigns seqs and frames here and moves the results to sockets and
the store. Sessions survive a dropped connection for ``session_ttl_s`` and a restart via the store.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from bridge.hub.protocol import event_frame
from bridge.hub.replay import ReplayBuffer
from bridge.store.base import MAX_OPEN_JOBS, SessionRecord, StoredEvent
from engine.types import TERMINAL_KINDS

RECENT_JOB_IDS = 4096


def new_session_id() -> str:
    """An unguessable session id (192 random bits, URL-safe)."""
    return "s_" + secrets.token_urlsafe(24)


@dataclass(slots=True)
class PersistBatch:
    """What the write-behind task must store for one session."""

    events: list[StoredEvent]
    trim_through: int
    record: SessionRecord | None


@dataclass(eq=False, slots=True)
class Session:
    """One client session: its seq counter and replay buffer, topics, live jobs and store state.

    Attributes:
        id: the session id handed out in ``welcome``.
        owner: label of the token that created it; only that token may resume it.
        admin: whether that token is an admin token (may subscribe to ``ops``).
        replay: the bounded buffer of sent events.
        topics: subscribed topics.
        jobs: live jobs by client job id (the hub keeps the value: handle and task).
        conn: the attached connection, or None while the client is away.
        detached_at: monotonic time the last connection left (None while attached).
        node_saved: whether the store names this node as the session's holder (cluster only).
        moved_to: the node this session was handed to; its jobs here forward events there.
        open_jobs: client ids of own jobs accepted but whose terminal event has no seq yet
            (stored in the header, so a node that loads the session after a crash knows them).
        pending_orphans: open jobs of a session rebuilt from the store that may have died with
            the node that ran them; the first resume here ends each with an ``internal`` error
            event (:mod:`bridge.hub.orphans`) unless it is live on this node.
    """

    id: str
    owner: str
    admin: bool
    replay: ReplayBuffer
    topics: set[str] = field(default_factory=set)
    jobs: dict[str, Any] = field(default_factory=dict)
    recent_ids: OrderedDict[str, None] = field(default_factory=OrderedDict)
    conn: Any = None
    detached_at: float | None = None
    updated_at: float = 0.0
    unsaved: list[StoredEvent] = field(default_factory=list)
    saved_trim: int = 0
    header_dirty: bool = True
    owner_saved: bool = False
    node_saved: bool = False
    moved_to: str | None = None
    open_jobs: set[str] = field(default_factory=set)
    pending_orphans: set[str] = field(default_factory=set)

    @property
    def last_seq(self) -> int:
        """The highest seq assigned so far."""
        return self.replay.last_seq

    def emit(self, tail: str, wall_now: float, closes: str | None = None) -> str:
        """Give an event the next seq, keep it for replay and the store; return its frame.

        ``closes`` is the client id of the own job this event ends (its terminal event), so the
        header stops listing the job as open from this seq on.
        """
        seq = self.replay.last_seq + 1
        frame = event_frame(seq, tail)
        ev = StoredEvent(seq=seq, ts=wall_now, frame=frame)
        self.replay.append(ev)
        self.unsaved.append(ev)
        if len(self.unsaved) > 2 * self.replay.max_events:
            self._drop_unsaved_trimmed()
        self.updated_at = wall_now
        if closes is not None and closes in self.open_jobs:
            self.open_jobs.discard(closes)
            self.header_dirty = True
        return frame

    def open_job(self, job_id: str) -> bool:
        """Record an accepted own job as open until its terminal event; False past the cap
        (:data:`~bridge.store.base.MAX_OPEN_JOBS`: the job runs, but a crash cannot end it)."""
        if len(self.open_jobs) >= MAX_OPEN_JOBS:
            return False
        self.open_jobs.add(job_id)
        self.header_dirty = True
        return True

    def knows_job(self, job_id: str) -> bool:
        """Whether this session has (or recently had) a job with this client id."""
        return job_id in self.jobs or job_id in self.recent_ids

    def remember_job(self, job_id: str) -> None:
        """Record an accepted job's client id (the last :data:`RECENT_JOB_IDS` are kept)."""
        self.recent_ids[job_id] = None
        while len(self.recent_ids) > RECENT_JOB_IDS:
            self.recent_ids.popitem(last=False)

    def resume_from(self, last_seq: int) -> tuple[list[str], int]:
        """Frames to replay after ``last_seq`` and the count no longer kept (``missed``)."""
        events, missed = self.replay.since(last_seq)
        return [ev.frame for ev in events], missed

    def advance(self, seq: int) -> bool:
        """Number the next event after ``seq`` (the seq rule after a crash); True if it moved.

        Used when a client or the previous node has seen seqs the store never got: reusing them
        would make a correct client drop new events as duplicates.
        """
        if seq <= self.replay.last_seq:
            return False
        self.replay.advance(seq)
        self.unsaved = []
        self.header_dirty = True
        return True

    def needs_save(self) -> bool:
        """Whether the store lacks something of this session (events, trim, header, owner)."""
        return (
            bool(self.unsaved)
            or self.header_dirty
            or not self.owner_saved
            or self.replay.first_seq - 1 > self.saved_trim
        )

    def ack(self, seq: int) -> None:
        """Drop replay up to ``seq``."""
        self.replay.ack(seq)

    def _drop_unsaved_trimmed(self) -> None:
        first = self.replay.first_seq
        if self.unsaved and self.unsaved[0].seq < first:
            self.unsaved = [ev for ev in self.unsaved if ev.seq >= first]

    def take_batch(self, wall_now: float) -> PersistBatch | None:
        """Everything not yet written to the store, or None when the store is up to date."""
        self._drop_unsaved_trimmed()
        trim = self.replay.first_seq - 1
        # Trimming the store lazily (a quarter of the buffer at a time) keeps a busy session from
        # rewriting its stored events on every flush; a restore re-applies the bounds anyway.
        if trim - self.saved_trim < max(1, self.replay.max_events // 4):
            trim = self.saved_trim
        if not self.unsaved and trim <= self.saved_trim and not self.header_dirty:
            return None
        events, self.unsaved = self.unsaved, []
        # append_events keeps last_seq and trim_events keeps first_seq in the store; the header
        # is written only when it changed (creation, topics) so the hot path stays cheap.
        record = self.record(wall_now) if self.header_dirty else None
        self.header_dirty = False
        return PersistBatch(events=events, trim_through=trim, record=record)

    def batch_done(self, batch: PersistBatch) -> None:
        """The store holds ``batch`` now."""
        self.saved_trim = max(self.saved_trim, batch.trim_through)

    def batch_failed(self, batch: PersistBatch) -> None:
        """Writing ``batch`` failed: keep it for the next flush (ahead of newer events)."""
        self.unsaved = batch.events + self.unsaved
        self.header_dirty = True

    def record(self, wall_now: float) -> SessionRecord:
        """The session header as the store keeps it."""
        return SessionRecord(
            session_id=self.id,
            last_seq=self.replay.last_seq,
            first_seq=self.replay.first_seq,
            topics=sorted(self.topics),
            updated_at=self.updated_at or wall_now,
            open_jobs=sorted(self.open_jobs),
        )

    @classmethod
    def from_record(
        cls,
        record: SessionRecord,
        *,
        owner: str,
        admin: bool,
        replay: ReplayBuffer,
    ) -> Session:
        """Rebuild a session the store kept (after a restart, or from another node).

        The header's open jobs become :attr:`pending_orphans`, less any whose terminal event is
        among the stored events (the events were written but the header after them was not).
        """
        kept = [ev for ev in record.events if ev.seq >= record.first_seq]
        replay.restore(kept, record.last_seq)
        topics = {t for t in record.topics if admin or t != "ops"}
        session = cls(
            id=record.session_id,
            owner=owner,
            admin=admin,
            replay=replay,
            topics=topics,
            updated_at=record.updated_at,
        )
        session.saved_trim = replay.first_seq - 1
        session.header_dirty = False
        session.owner_saved = True
        ended: set[str] = set()
        for ev in kept:
            own = _own_job(ev.frame)
            if own is None:
                continue
            job_id, terminal = own
            if terminal:
                ended.add(job_id)
            if job_id not in session.recent_ids:
                session.remember_job(job_id)
        stored_open = set(record.open_jobs[:MAX_OPEN_JOBS])
        session.open_jobs = stored_open - ended
        session.pending_orphans = set(session.open_jobs)
        if session.open_jobs != set(record.open_jobs):
            session.header_dirty = True  # correct the store's header with the next write
        return session


def _own_job(frame: str) -> tuple[str, bool] | None:
    """The client job id of a stored event frame of the session's own job, and whether the
    event is its terminal one (None for topic events).

    A restored session knows its job ids from the events it still keeps, so a resubmitted id is
    still refused with ``duplicate_id`` after a restart at no extra store cost.
    """
    try:
        obj = json.loads(frame)
    except ValueError:
        return None
    if not isinstance(obj, dict) or "topic" in obj:
        return None
    job_id = obj.get("id")
    if not isinstance(job_id, str):
        return None
    return job_id, obj.get("kind") in TERMINAL_KINDS
