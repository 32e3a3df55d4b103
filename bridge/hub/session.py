"""A hub session: the part of a client that outlives its connections (seq, replay, topics, jobs).

Pure state, no I/O: the hub assigns seqs and frames here and moves the results to sockets and
the store. Sessions survive a dropped connection for ``session_ttl_s`` and a restart via the store.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from bridge.hub.protocol import event_frame
from bridge.hub.replay import ReplayBuffer
from bridge.store.base import MAX_OPEN_JOBS, SessionRecord, StoredEvent
from engine.types import TERMINAL_KINDS

RECENT_JOB_IDS = 4096

C = TypeVar("C")


def new_session_id() -> str:
    """An unguessable session id (192 random bits, URL-safe)."""
    return "s_" + secrets.token_urlsafe(24)


@dataclass(slots=True)
class PersistBatch:
    """What the write-behind task must store for one session.

    The events are kept as their first seq and two lists of atoms (frames, times), not as
    event objects: a flush of thousands of sessions holds its batches across loop iterations,
    and per-event objects living that long would be promoted by the GC and trigger full
    collections. :attr:`events` makes the store's objects when the write happens.
    """

    first_seq: int
    frames: list[str]
    stamps: list[float]
    trim_through: int
    record: SessionRecord | None

    @property
    def events(self) -> list[StoredEvent]:
        """The batch's events as the store takes them."""
        first = self.first_seq
        return [
            StoredEvent(first + i, ts, frame)
            for i, (frame, ts) in enumerate(zip(self.frames, self.stamps, strict=True))
        ]


class _Lazy(Generic[C]):
    """A container attribute made on first access: most sessions never use most of them, and an
    empty set costs 216 bytes (thousands of idle connections each hold a session)."""

    __slots__ = ("factory", "slot")

    def __init__(self, factory: Callable[[], C]) -> None:
        self.factory = factory
        self.slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _Lazy[C]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> C: ...

    def __get__(self, obj: object | None, objtype: type | None = None) -> C | _Lazy[C]:
        if obj is None:
            return self
        value: C | None = getattr(obj, self.slot)
        if value is None:
            value = self.factory()
            setattr(obj, self.slot, value)
        return value

    def __set__(self, obj: object, value: C) -> None:
        setattr(obj, self.slot, value)


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
        unsaved_from: the lowest seq the store may lack (``last_seq + 1``: none); the events
            themselves are the replay buffer's, so nothing is kept twice per event.

    The sets and dicts are made on first use (:class:`_Lazy`); code in this module reads the
    slots behind them (``_topics`` ...) where None means empty, so reading never makes one.
    """

    __slots__ = (
        "_jobs",
        "_open_jobs",
        "_pending_orphans",
        "_recent_ids",
        "_topics",
        "admin",
        "conn",
        "detached_at",
        "header_dirty",
        "id",
        "moved_to",
        "node_saved",
        "owner",
        "owner_saved",
        "replay",
        "saved_trim",
        "unsaved_from",
        "updated_at",
    )

    topics: _Lazy[set[str]] = _Lazy(set)
    jobs: _Lazy[dict[str, Any]] = _Lazy(dict)
    recent_ids: _Lazy[OrderedDict[str, None]] = _Lazy(OrderedDict)
    open_jobs: _Lazy[set[str]] = _Lazy(set)
    pending_orphans: _Lazy[set[str]] = _Lazy(set)

    def __init__(
        self,
        id: str,
        owner: str,
        admin: bool,
        replay: ReplayBuffer,
        topics: set[str] | None = None,
        jobs: dict[str, Any] | None = None,
        recent_ids: OrderedDict[str, None] | None = None,
        conn: Any = None,
        detached_at: float | None = None,
        updated_at: float = 0.0,
        saved_trim: int = 0,
        header_dirty: bool = True,
        owner_saved: bool = False,
        node_saved: bool = False,
        moved_to: str | None = None,
        open_jobs: set[str] | None = None,
        pending_orphans: set[str] | None = None,
    ) -> None:
        self.id = id
        self.owner = owner
        self.admin = admin
        self.replay = replay
        self._topics = topics or None
        self._jobs = jobs or None
        self._recent_ids = recent_ids or None
        self.conn = conn
        self.detached_at = detached_at
        self.updated_at = updated_at
        self.unsaved_from = replay.last_seq + 1
        self.saved_trim = saved_trim
        self.header_dirty = header_dirty
        self.owner_saved = owner_saved
        self.node_saved = node_saved
        self.moved_to = moved_to
        self._open_jobs = open_jobs or None
        self._pending_orphans = pending_orphans or None

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, owner={self.owner!r}, last_seq={self.last_seq})"

    @property
    def topic_names(self) -> Collection[str]:
        """The subscribed topics, read-only (without making the topic set of a session that
        follows none: the dashboard lists every connection's topics)."""
        return self._topics or ()

    @property
    def follows_topics(self) -> bool:
        """Whether the session is subscribed to any topic (without making its topic set)."""
        return bool(self._topics)

    @property
    def last_seq(self) -> int:
        """The highest seq assigned so far."""
        return self.replay.last_seq

    def emit(self, tail: str, wall_now: float, closes: str | None = None) -> str:
        """Give an event the next seq, keep it for replay and the store; return its frame.

        ``closes`` is the client id of the own job this event ends (its terminal event), so the
        header stops listing the job as open from this seq on.
        """
        replay = self.replay
        frame = event_frame(replay.last_seq + 1, tail)
        replay.push(frame, wall_now)
        self.updated_at = wall_now
        if closes is not None:
            open_jobs = self._open_jobs
            if open_jobs is not None and closes in open_jobs:
                open_jobs.discard(closes)
                self.header_dirty = True
        return frame

    def open_job(self, job_id: str) -> bool:
        """Record an accepted own job as open until its terminal event; False past the cap
        (:data:`~bridge.store.base.MAX_OPEN_JOBS`: the job runs, but a crash cannot end it)."""
        if self._open_jobs is not None and len(self._open_jobs) >= MAX_OPEN_JOBS:
            return False
        self.open_jobs.add(job_id)
        self.header_dirty = True
        return True

    def knows_job(self, job_id: str) -> bool:
        """Whether this session has (or recently had) a job with this client id."""
        jobs, recent = self._jobs, self._recent_ids
        return (jobs is not None and job_id in jobs) or (recent is not None and job_id in recent)

    def remember_job(self, job_id: str) -> None:
        """Record an accepted job's client id (the last :data:`RECENT_JOB_IDS` are kept)."""
        self.recent_ids[job_id] = None
        while len(self.recent_ids) > RECENT_JOB_IDS:
            self.recent_ids.popitem(last=False)

    def resume_from(self, last_seq: int) -> tuple[list[str], int]:
        """Frames to replay after ``last_seq`` and the count no longer kept (``missed``)."""
        return self.replay.frames_since(last_seq)

    def advance(self, seq: int) -> bool:
        """Number the next event after ``seq`` (the seq rule after a crash); True if it moved.

        Used when a client or the previous node has seen seqs the store never got: reusing them
        would make a correct client drop new events as duplicates.
        """
        if seq <= self.replay.last_seq:
            return False
        self.replay.advance(seq)
        self.unsaved_from = seq + 1
        self.header_dirty = True
        return True

    def needs_save(self) -> bool:
        """Whether the store lacks something of this session (events, trim, header, owner)."""
        return (
            self.unsaved_from <= self.replay.last_seq
            or self.header_dirty
            or not self.owner_saved
            or self.replay.first_seq - 1 > self.saved_trim
        )

    def ack(self, seq: int) -> None:
        """Drop replay up to ``seq``."""
        self.replay.ack(seq)

    def take_batch(self, wall_now: float) -> PersistBatch | None:
        """Everything not yet written to the store, or None when the store is up to date."""
        replay = self.replay
        # Events the buffer dropped before a flush were never stored (as before: bounded).
        unsaved = replay.last_seq >= max(self.unsaved_from, replay.first_seq)
        trim = replay.first_seq - 1
        # Trimming the store lazily (a quarter of the buffer at a time) keeps a busy session from
        # rewriting its stored events on every flush; a restore re-applies the bounds anyway.
        if trim - self.saved_trim < max(1, self.replay.max_events // 4):
            trim = self.saved_trim
        if not unsaved and trim <= self.saved_trim and not self.header_dirty:
            return None
        start = self.unsaved_from if unsaved else replay.last_seq + 1
        first, frames, stamps = replay.slice_from(start)
        self.unsaved_from = replay.last_seq + 1
        # append_events keeps last_seq and trim_events keeps first_seq in the store; the header
        # is written only when it changed (creation, topics) so the hot path stays cheap.
        record = self.record(wall_now) if self.header_dirty else None
        self.header_dirty = False
        return PersistBatch(first, frames, stamps, trim_through=trim, record=record)

    def batch_done(self, batch: PersistBatch) -> None:
        """The store holds ``batch`` now."""
        self.saved_trim = max(self.saved_trim, batch.trim_through)

    def batch_failed(self, batch: PersistBatch) -> None:
        """Writing ``batch`` failed: keep it for the next flush (ahead of newer events)."""
        if batch.frames:
            self.unsaved_from = min(self.unsaved_from, batch.first_seq)
        self.header_dirty = True

    def record(self, wall_now: float) -> SessionRecord:
        """The session header as the store keeps it."""
        return SessionRecord(
            session_id=self.id,
            last_seq=self.replay.last_seq,
            first_seq=self.replay.first_seq,
            topics=sorted(self._topics or ()),
            updated_at=self.updated_at or wall_now,
            open_jobs=sorted(self._open_jobs or ()),
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
            if not session.knows_job(job_id):
                session.remember_job(job_id)
        stored_open = set(record.open_jobs[:MAX_OPEN_JOBS])
        open_jobs = stored_open - ended
        session._open_jobs = open_jobs or None
        session._pending_orphans = set(open_jobs) or None
        if open_jobs != set(record.open_jobs):
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
