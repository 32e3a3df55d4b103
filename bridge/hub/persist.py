"""Write-behind of sessions to the store: the hot path stays in memory, the store catches up.

Every ``flush_interval_s`` the dirty sessions' new events, trims and headers go to the store in
one batch per session, so SQLite/Redis backends can resume sessions after a restart. Batches are
written concurrently (a bounded number in flight), so shutdown with many sessions on a networked
store takes round trips / ``FLUSH_CONCURRENCY``, not one round trip per session. A failing store
only delays writes: batches are kept (bounded by the replay buffer) and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from bridge.hub.session import PersistBatch, Session
from bridge.store.base import Store

log = structlog.get_logger(__name__)

OWNER_KEY = "hub:session-owner:"
#: The node that holds a session in memory (only written when the hub runs in a cluster).
NODE_KEY = "hub:session-node:"
#: The last release of a session (the answer the holder sent), for a claimer whose answer the bus
#: lost.
RELEASE_KEY = "hub:session-release:"
STORE_TIMEOUT_S = 5.0
#: The deadline of the last flush at shutdown: thousands of unsaved sessions on a busy store take
#: longer than one periodic flush may, and nothing after it would write them.
SHUTDOWN_FLUSH_S = 20.0
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
        self._soon = asyncio.Event()
        self._failing = False
        self._lock = asyncio.Lock()
        self.flushes = 0
        self.failures = 0
        self.written = 0

    def mark(self, session: Session) -> None:
        """Schedule ``session`` for the next flush."""
        self.dirty.add(session)

    def mark_soon(self, session: Session) -> None:
        """Schedule ``session`` and start the next flush now rather than at the interval.

        For a job's terminal event: until it is stored, a crash would make the next node end the
        job a second time (the stored header still lists it open). Ends that come while a flush
        runs share the next one, so a busy node flushes back to back, not once per job.
        """
        self.dirty.add(session)
        self._soon.set()

    async def wait_due(self, interval_s: float) -> None:
        """Wait for the next flush: ``interval_s``, or less when :meth:`mark_soon` asked.

        ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 ``wait_for`` can swallow a
        cancellation that arrives as the event is set, and the hub's shutdown would then wait on
        this loop for the whole interval.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await self._soon.wait()
        self._soon.clear()

    async def flush(self, timeout_s: float = STORE_TIMEOUT_S) -> bool:
        """Write every dirty session within ``timeout_s``; failures keep their batches for the
        next flush. True when everything was written.

        A flush already running (started by the interval or :meth:`mark_soon`) holds sessions
        that are no longer in ``dirty``: the lock makes this call wait for it, so on return
        everything that was dirty when it was called has been written (or failed).
        """
        async with self._lock:
            if not self.dirty:
                return True
            sessions, self.dirty = self.dirty, set()
            return await self._flush(sessions, timeout_s)

    async def flush_all(self, timeout_s: float = SHUTDOWN_FLUSH_S) -> bool:
        """Flush until nothing is dirty (shutdown); True when clean.

        A flush cut short by its deadline is continued while it makes progress and ``timeout_s``
        lasts; one that writes nothing (the store is down) ends it at once, so an outage never
        holds a shutdown up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.dirty and (left := deadline - loop.time()) > 0:
            before = self.written
            if not await self.flush(left) and self.written == before:
                break
        if self.dirty:
            log.error("hub_sessions_not_saved", sessions=len(self.dirty))
            return False
        return True

    async def flush_one(self, session: Session) -> bool:
        """Write ``session`` now, after any flush in progress (a handoff); True when stored."""
        async with self._lock:
            self.dirty.discard(session)
            return await self._flush({session}, STORE_TIMEOUT_S)

    async def _flush(self, sessions: set[Session], timeout_s: float) -> bool:
        wall = self._wall()
        done: set[Session] = set()
        # Taken from its session and not yet stored (given back if the flush fails).
        taken: dict[Session, PersistBatch] = {}
        # A few workers share one iterator and take each batch just before writing it, rather
        # than a task and a batch per session made up front: thousands of those living through
        # the flush are objects the GC promotes, and under fan-out enough of them make it run
        # full collections (each one walks every object of the process).
        work = iter(sessions)

        async def worker() -> None:
            for session in work:
                batch = session.take_batch(wall)
                if batch is None:
                    continue
                taken[session] = batch
                await self._write(session, batch)
                del taken[session]
                session.batch_done(batch)
                done.add(session)
                self.written += 1

        try:
            # One deadline for the whole flush: a hung store fails it as a unit, cheaply.
            async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
                for _ in range(min(FLUSH_CONCURRENCY, len(sessions))):
                    group.create_task(worker())
        except BaseException as exc:  # StoreUnavailable, timeouts, bugs, cancels: retry later
            for session, batch in taken.items():
                session.batch_failed(batch)
                self.dirty.add(session)
            left = len(taken)
            for session in work:  # not reached: nothing was taken, so nothing to give back
                self.dirty.add(session)
                left += 1
            if not isinstance(exc, Exception):
                raise  # cancelled (shutdown): the batches wait for the last flush
            self.failures += 1
            if not self._failing:
                error = repr(exc.exceptions[0]) if isinstance(exc, ExceptionGroup) else repr(exc)
                log.warning("hub_store_write_failed", sessions=left, error=error)
            self._failing = True
            return False
        if not done:
            return True
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
        if batch.frames:
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

    async def note_release(self, session_id: str, answer: bytes) -> bool:
        """Keep the answer of a release in the store too (the bus may lose it); False when the
        store could not take it (logged: the claimer then treats open jobs as orphans)."""
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self.store.set_value(RELEASE_KEY + session_id, answer.decode(), self.ttl_s)
            return True
        except Exception as exc:
            log.warning("hub_store_write_failed", session=session_id, error=repr(exc))
            return False

    async def release_of(self, session_id: str) -> bytes | None:
        """The answer of the session's last release, if the store has it."""
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                note = await self.store.get_value(RELEASE_KEY + session_id)
        except Exception as exc:
            log.warning("hub_store_load_failed", session=session_id, error=repr(exc))
            return None
        return None if note is None else note.encode()

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
