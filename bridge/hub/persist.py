"""Write-behind of sessions to the store: the hot path stays in memory, the store catches up.

Every ``flush_interval_s`` the dirty sessions' new events, trims and headers go to the store in
one batch per session, so SQLite/Redis backends can resume sessions after a restart. Batches are
written concurrently (a bounded number in flight), so shutdown with many sessions on a networked
store takes round trips / ``FLUSH_CONCURRENCY``, not one round trip per session. A failing store
only delays writes: batches are kept (bounded by the replay buffer) and retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from bridge.hub.session import PersistBatch, Session
from bridge.store.base import Store

log = structlog.get_logger(__name__)

OWNER_KEY = "hub:session-owner:"
#: The node that holds a session in memory (only written when the hub runs in a cluster).
NODE_KEY = "hub:session-node:"
STORE_TIMEOUT_S = 5.0
#: Batches written at the same time in one flush.
FLUSH_CONCURRENCY = 64


class WriteBehind:
    """Collects dirty sessions and writes them to the store in batches.

    Args:
        store: the store sessions survive in.
        ttl_s: how long the store keeps a session.
        wall: wall-clock seconds (record times).
        node_id: this node's id, recorded per session when the hub runs in a cluster (None: not).
    """

    def __init__(
        self,
        store: Store,
        ttl_s: float,
        wall: Callable[[], float],
        node_id: str | None = None,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._wall = wall
        self.node_id = node_id
        self.dirty: set[Session] = set()
        self._failing = False
        self._lock = asyncio.Lock()
        self.flushes = 0
        self.failures = 0

    def mark(self, session: Session) -> None:
        """Schedule ``session`` for the next flush."""
        self.dirty.add(session)

    async def flush(self) -> None:
        """Write every dirty session; failures keep their batches for the next flush."""
        if not self.dirty:
            return
        async with self._lock:
            sessions, self.dirty = self.dirty, set()
            await self._flush(sessions)

    async def flush_one(self, session: Session) -> bool:
        """Write ``session`` now, after any flush in progress (a handoff); True when stored."""
        async with self._lock:
            self.dirty.discard(session)
            return await self._flush({session})

    async def _flush(self, sessions: set[Session]) -> bool:
        wall = self._wall()
        pending = [(s, b) for s in sessions if (b := s.take_batch(wall)) is not None]
        if not pending:
            return True
        done: set[Session] = set()
        gate = asyncio.Semaphore(FLUSH_CONCURRENCY)

        async def write(session: Session, batch: PersistBatch) -> None:
            async with gate:
                await self._write(session, batch)
            session.batch_done(batch)
            done.add(session)

        try:
            # One deadline for the whole flush: a hung store fails it as a unit, cheaply.
            async with asyncio.timeout(STORE_TIMEOUT_S), asyncio.TaskGroup() as group:
                for session, batch in pending:
                    group.create_task(write(session, batch))
        except Exception as exc:  # StoreUnavailable, timeouts, backend bugs: retry later
            for session, batch in pending:
                if session not in done:
                    session.batch_failed(batch)
                    self.dirty.add(session)
            self.failures += 1
            if not self._failing:
                error = repr(exc.exceptions[0]) if isinstance(exc, ExceptionGroup) else repr(exc)
                left = len(pending) - len(done)
                log.warning("hub_store_write_failed", sessions=left, error=error)
            self._failing = True
            return False
        if self._failing:
            log.info("hub_store_write_recovered", sessions=len(done))
            self._failing = False
        self.flushes += 1
        return True

    async def _write(self, session: Session, batch: PersistBatch) -> None:
        if not session.owner_saved:
            await self.store.set_value(OWNER_KEY + session.id, session.owner, self.ttl_s)
            session.owner_saved = True
        if self.node_id is not None and not session.node_saved:
            await self.store.set_value(NODE_KEY + session.id, self.node_id, self.ttl_s)
            session.node_saved = True
        if batch.events:
            await self.store.append_events(session.id, batch.events, self.ttl_s)
        if batch.record is not None:
            await self.store.save_session(batch.record, self.ttl_s)
        if batch.trim_through > session.saved_trim:
            await self.store.trim_events(session.id, batch.trim_through)

    async def owner_of(self, session_id: str) -> str | None:
        """The token label that owns a stored session."""
        return await self.store.get_value(OWNER_KEY + session_id)

    async def node_of(self, session_id: str) -> str | None:
        """The node the store names as the session's holder (None when not recorded)."""
        return await self.store.get_value(NODE_KEY + session_id)

    async def claim_node(self, session: Session) -> None:
        """Record this node as the holder of ``session`` now (an adoption in a cluster)."""
        if self.node_id is None:
            return
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self.store.set_value(NODE_KEY + session.id, self.node_id, self.ttl_s)
            session.node_saved = True
        except Exception as exc:
            session.node_saved = False
            self.mark(session)
            log.warning("hub_store_write_failed", session=session.id, error=repr(exc))
