"""Write-behind of sessions to the store: the hot path stays in memory, the store catches up.

Every ``flush_interval_s`` the dirty sessions' new events, trims and headers go to the store in
one batch per session, so SQLite/Redis backends can resume sessions after a restart. A failing store
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
STORE_TIMEOUT_S = 5.0


class WriteBehind:
    """Collects dirty sessions and writes them to the store in batches."""

    def __init__(self, store: Store, ttl_s: float, wall: Callable[[], float]) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._wall = wall
        self.dirty: set[Session] = set()
        self._failing = False
        self.flushes = 0
        self.failures = 0

    def mark(self, session: Session) -> None:
        """Schedule ``session`` for the next flush."""
        self.dirty.add(session)

    async def flush(self) -> None:
        """Write every dirty session; failures keep their batches for the next flush."""
        if not self.dirty:
            return
        sessions, self.dirty = self.dirty, set()
        wall = self._wall()
        pending = [(s, b) for s in sessions if (b := s.take_batch(wall)) is not None]
        done = 0
        try:
            # One deadline for the whole flush: a hung store fails it as a unit, cheaply.
            async with asyncio.timeout(STORE_TIMEOUT_S):
                for session, batch in pending:
                    await self._write(session, batch)
                    session.batch_done(batch)
                    done += 1
        except Exception as exc:  # StoreUnavailable, timeouts, backend bugs: retry later
            for session, batch in pending[done:]:
                session.batch_failed(batch)
                self.dirty.add(session)
            self.failures += 1
            if not self._failing:
                log.warning("hub_store_write_failed", sessions=len(pending) - done, error=repr(exc))
            self._failing = True
            return
        if self._failing:
            log.info("hub_store_write_recovered", sessions=done)
            self._failing = False
        self.flushes += 1

    async def _write(self, session: Session, batch: PersistBatch) -> None:
        if not session.owner_saved:
            await self.store.set_value(OWNER_KEY + session.id, session.owner, self.ttl_s)
            session.owner_saved = True
        if batch.events:
            await self.store.append_events(session.id, batch.events, self.ttl_s)
        if batch.record is not None:
            await self.store.save_session(batch.record, self.ttl_s)
        if batch.trim_through > session.saved_trim:
            await self.store.trim_events(session.id, batch.trim_through)

    async def owner_of(self, session_id: str) -> str | None:
        """The token label that owns a stored session."""
        return await self.store.get_value(OWNER_KEY + session_id)
