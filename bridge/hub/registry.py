"""The hub's session registry: sessions in memory, the topic index, store lookups and expiry.

Sessions outlive connections, so they live here rather than on the connection: a resume finds one
(in memory, or in the store after a restart or on another node), topics route to the sessions that
follow them, and a detached session is forgotten after ``session_ttl_s``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable

import structlog

from bridge.hub.config import HubConfig
from bridge.hub.persist import WriteBehind
from bridge.hub.replay import ReplayBuffer
from bridge.hub.session import Session, new_session_id
from bridge.store.base import Store

log = structlog.get_logger(__name__)

# The ids of sessions with topics, so a restarted hub routes topic events to them at once.
SUBSCRIBED_KEY = "hub:subscribed-sessions"
MAX_PRELOAD = 10_000
SUBSCRIBED_CHUNK = 500  # ids per store value (about 19 KB of JSON)
STORE_LOAD_TIMEOUT_S = 5.0


class SessionRegistry:
    """Every session this hub holds, indexed by id and by topic.

    Args:
        cfg: the hub's settings (bounds, TTLs, admin tokens).
        store: where sessions survive restarts.
        writes: the write-behind queue that persists session changes.
        clock: monotonic seconds (detach times, expiry).
        wall: wall-clock seconds (replay ages, record times).
    """

    def __init__(
        self,
        cfg: HubConfig,
        store: Store,
        writes: WriteBehind,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.writes = writes
        self._clock = clock
        self._wall = wall
        self.sessions: dict[str, Session] = {}
        self.topics: dict[str, set[Session]] = {}
        self.subs_dirty = False
        self._subs_failing = False
        # Each node of a cluster records its own subscribed sessions (they would overwrite).
        node = writes.node_id
        self.subs_key = SUBSCRIBED_KEY if node is None else f"{SUBSCRIBED_KEY}@{node}"

    def __len__(self) -> int:
        return len(self.sessions)

    def members(self, topic: str) -> set[Session] | None:
        """The sessions following ``topic`` (None or empty when none do)."""
        return self.topics.get(topic)

    def replay(self) -> ReplayBuffer:
        """A fresh replay buffer with the configured bounds."""
        cfg = self.cfg
        return ReplayBuffer(cfg.replay_max_events, cfg.replay_max_bytes, cfg.replay_max_age_s)

    # --- creating and finding sessions ------------------------------------------------------
    def new_session(self, label: str, admin: bool) -> Session:
        """Create a session owned by the token labelled ``label`` and schedule its first write."""
        session = Session(id=new_session_id(), owner=label, admin=admin, replay=self.replay())
        session.updated_at = self._wall()
        self.sessions[session.id] = session
        self.writes.mark(session)
        return session

    def adopt(self, session: Session) -> None:
        """Hold a session rebuilt from the store (detached until a client resumes it).

        Topics its token may no longer follow (grants changed since it was stored) are dropped.
        """
        session.detached_at = self._clock()
        allowed = {
            t for t in session.topics if self.cfg.may_follow(session.owner, session.admin, t)
        }
        if allowed != session.topics:
            log.info(
                "hub_topics_revoked",
                session=session.id,
                dropped=len(session.topics) - len(allowed),
            )
            session.topics = allowed
            session.header_dirty = True
        self.sessions[session.id] = session
        for topic in session.topics:
            self.topics.setdefault(topic, set()).add(session)

    async def find(self, session_id: str, label: str, admin: bool, conn_id: str) -> Session | None:
        """The session ``session_id`` if the token labelled ``label`` owns it, else None.

        Looks in memory first, then in the store (a restart or another node); a store that fails
        or hangs counts as "unknown", so a hello never waits long on it.
        """
        session = self.sessions.get(session_id)
        if session is not None:
            return session if hmac.compare_digest(session.owner, label) else None
        try:
            async with asyncio.timeout(min(STORE_LOAD_TIMEOUT_S, self.cfg.hello_timeout_s)):
                record = await self.store.load_session(session_id)
                owner = await self.writes.owner_of(session_id) if record else None
        except Exception as exc:
            log.warning("hub_store_load_failed", conn_id=conn_id, error=repr(exc))
            return None
        if record is None or owner is None or not hmac.compare_digest(owner, label):
            return None
        session = self.sessions.get(session_id)  # another hello may have loaded it meanwhile
        if session is None:
            session = Session.from_record(record, owner=label, admin=admin, replay=self.replay())
            self.adopt(session)
            log.info("hub_session_loaded", session=session_id, last_seq=session.last_seq)
        return session

    async def preload(self) -> None:
        """Load sessions that follow topics, so IM events reach them before their client returns."""
        try:
            ids: list[str] = []
            chunks = await self.store.get_value(self.subs_key)
            for index in range(min(int(chunks or 0), MAX_PRELOAD // SUBSCRIBED_CHUNK)):
                raw = await self.store.get_value(f"{self.subs_key}:{index}")
                ids.extend(json.loads(raw) if raw else [])
            for session_id in ids:
                if not isinstance(session_id, str) or session_id in self.sessions:
                    continue
                record = await self.store.load_session(session_id)
                owner = await self.writes.owner_of(session_id) if record else None
                if record is None or owner is None:
                    continue
                if not await self._held_here(session_id):
                    continue  # it moved to another node since: that node delivers its topics
                admin = any(self.cfg.label_of(t) == owner for t in self.cfg.admin_tokens)
                replay = self.replay()
                self.adopt(Session.from_record(record, owner=owner, admin=admin, replay=replay))
        except Exception as exc:
            log.warning("hub_preload_failed", error=repr(exc))
            return
        log.info("hub_sessions_preloaded", sessions=len(self.sessions))

    async def _held_here(self, session_id: str) -> bool:
        """Whether the store names no other node as the session's holder (always, single-node)."""
        node = self.writes.node_id
        if node is None:
            return True
        holder = await self.writes.node_of(session_id)
        return holder is None or holder == node

    def release(self, session: str | Session) -> Session | None:
        """Let go of a session another node took over: out of every index, not cancelled."""
        found = self.sessions.get(session) if isinstance(session, str) else session
        if found is None or self.sessions.get(found.id) is not found:
            return None
        del self.sessions[found.id]
        for topic in found.topics:
            self._unindex(topic, found)
        self.subs_dirty = True
        return found

    # --- topics ----------------------------------------------------------------------------
    def add_topic(self, session: Session, topic: str) -> None:
        """Subscribe ``session`` to ``topic`` (the caller checked permission and the cap)."""
        if topic in session.topics:
            return
        session.topics.add(topic)
        self.topics.setdefault(topic, set()).add(session)
        session.header_dirty = True
        self.writes.mark(session)
        self.subs_dirty = True

    def remove_topic(self, session: Session, topic: str) -> None:
        """Unsubscribe ``session`` from ``topic``; a no-op if it did not follow it."""
        if topic not in session.topics:
            return
        session.topics.discard(topic)
        self._unindex(topic, session)
        session.header_dirty = True
        self.writes.mark(session)
        self.subs_dirty = True

    def _unindex(self, topic: str, session: Session) -> None:
        members = self.topics.get(topic)
        if members is not None:
            members.discard(session)
            if not members:
                del self.topics[topic]

    async def save_subscribed(self) -> None:
        """Record which sessions follow topics (in chunks: store values are small)."""
        self.subs_dirty = False
        ids = [s.id for s in self.sessions.values() if s.follows_topics][:MAX_PRELOAD]
        chunks = [ids[i : i + SUBSCRIBED_CHUNK] for i in range(0, len(ids), SUBSCRIBED_CHUNK)]
        ttl = self.cfg.session_ttl_s
        try:
            for index, chunk in enumerate(chunks):
                await self.store.set_value(f"{self.subs_key}:{index}", json.dumps(chunk), ttl)
            await self.store.set_value(self.subs_key, str(len(chunks)), ttl)
        except Exception as exc:
            if not self._subs_failing:
                log.warning("hub_store_write_failed", key=self.subs_key, error=repr(exc))
            self._subs_failing = True
            self.subs_dirty = True
            return
        self._subs_failing = False

    # --- expiry ----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Trim replay buffers by age and forget sessions detached for longer than the TTL."""
        now, wall = self._clock(), self._wall()
        for session in list(self.sessions.values()):
            before = session.replay.first_seq
            session.replay.trim_age(wall)
            if session.replay.first_seq != before:
                self.writes.mark(session)
            gone = session.detached_at
            if session.conn is None and gone is not None and now - gone > self.cfg.session_ttl_s:
                self.drop(session)

    def drop(self, session: Session) -> None:
        """Forget an expired session: cancel its jobs and take it out of every index."""
        log.info("hub_session_expired", session=session.id)
        for job in list(session.jobs.values()):
            job.cancel()
            if job.task is not None:
                job.task.cancel()
        for topic in session.topics:
            self._unindex(topic, session)
        self.sessions.pop(session.id, None)
        self.writes.dirty.discard(session)
        self.subs_dirty = True

    def mark_unsaved(self) -> int:
        """Schedule every session the store lags behind for the next flush (shutdown); the count.

        Only sessions with something unwritten are marked, so a shutdown with many idle sessions
        costs no store round trip for them.
        """
        marked = 0
        for session in self.sessions.values():
            if session.needs_save():
                self.writes.mark(session)
                marked += 1
        return marked
