"""The store interface: everything the bridge has promised, kept so that a crash loses nothing.

Three backends implement it: ``memory://`` (unit tests only), SQLite (embedded default) and Redis
(a cluster). Callers depend on :class:`Store` only; :func:`bridge.store.open_store` picks one from
a URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class StoreUnavailable(Exception):
    """The backend cannot be reached now; the caller keeps running and retries later."""


class StoreInUse(Exception):
    """Another process holds the store (an SQLite file serves one process); never retried.

    The message is one line naming the file, the holder's pid when known, and what to do.
    """


#: How long a completed inbox entry is remembered so that re-adding its id is a no-op.
INBOX_DONE_RETENTION_S = 7 * 24 * 3600.0
#: Most open job ids a session header keeps (a session has a few live jobs; beyond this the hub
#: stops recording new ones and logs it, so one runaway client cannot bloat its header).
MAX_OPEN_JOBS = 1000


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event frame of a session, kept for replay.

    Attributes:
        seq: the session's sequence number of this frame (1, 2, 3, ... with no gaps).
        ts: wall-clock time it was produced (seconds since the epoch), for age-based trimming.
        frame: the exact JSON text sent to the client, so a replay is byte-identical.
    """

    seq: int
    ts: float
    frame: str


@dataclass(slots=True)
class SessionRecord:
    """A session as the store keeps it between connections (and across restarts or nodes).

    Attributes:
        session_id: the unguessable id handed out in ``welcome``.
        last_seq: the highest seq assigned so far (0 before the first event).
        first_seq: the lowest seq still kept for replay; events below it were trimmed or acked.
        topics: topics the session is subscribed to (restored on resume).
        events: kept events in seq order.
        updated_at: last activity, for expiry.
        open_jobs: client ids of the session's own jobs that were accepted and whose terminal
            event had no seq yet when this header was written ("at ``last_seq`` these were
            open"): a node that loads the session after the one running them died ends each
            with an ``internal`` error event.
    """

    session_id: str
    last_seq: int = 0
    first_seq: int = 1
    topics: list[str] = field(default_factory=list)
    events: list[StoredEvent] = field(default_factory=list)
    updated_at: float = 0.0
    open_jobs: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """An accepted IM event recorded before the platform got its 200, until its job is answered."""

    entry_id: str
    payload: bytes
    accepted_at: float
    attempts: int = 0


class Store(Protocol):
    """Durable state of the bridge. Every method may raise :class:`StoreUnavailable`."""

    url: str

    async def open(self) -> None:
        """Connect or create files; idempotent."""
        ...

    async def close(self) -> None:
        """Flush and release resources."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the backend answers now (for ``/readyz``)."""
        ...

    # --- dedupe and idempotency -------------------------------------------------------------
    async def claim(self, key: str, ttl_s: float) -> bool:
        """Record ``key`` if absent (atomically) and return True; False if it was already there."""
        ...

    async def release(self, key: str) -> None:
        """Forget ``key`` (used when processing an accepted event failed before any effect)."""
        ...

    async def get_value(self, key: str) -> str | None:
        """Read a small value set with :meth:`set_value` (reply idempotency keys, tokens)."""
        ...

    async def set_value(self, key: str, value: str, ttl_s: float | None = None) -> None:
        """Write a small value, optionally expiring."""
        ...

    async def incr(self, key: str, ttl_s: float) -> int:
        """Add one to a counter created with ``ttl_s`` when absent; return the new count.

        A fixed-window rate-limit bucket shared by every node: the window starts at the first hit.
        """
        ...

    # --- the IM inbox -----------------------------------------------------------------------
    async def inbox_add(self, entry: InboxEntry) -> None:
        """Durably record an accepted platform event (before acknowledging it).

        Idempotent: an id already pending, or completed within ``INBOX_DONE_RETENTION_S``, is kept
        as it is.
        """
        ...

    async def accept_entry(self, entry: InboxEntry, keys: Sequence[str], ttl_s: float) -> bool:
        """Record ``entry`` as :meth:`inbox_add` does, then :meth:`claim` every key, in one step.

        Where the backend allows it (SQLite: one transaction) this costs one round trip instead
        of one per key, which keeps a webhook's acknowledgement fast. The entry is always
        recorded before any key is claimed, so a crash never leaves a claim with no entry.

        Returns:
            True if every key was newly claimed (a new message), False otherwise (a duplicate).
        """
        ...

    async def inbox_attempt(self, entry_id: str) -> int:
        """Count one more attempt at a pending entry; return the new count (0 if not pending)."""
        ...

    async def inbox_pending(self, limit: int = 100) -> list[InboxEntry]:
        """Entries not yet completed, oldest first (re-run after a crash)."""
        ...

    async def inbox_complete(self, entry_id: str) -> None:
        """Mark an entry answered; it is never re-run."""
        ...

    # --- sessions and replay ----------------------------------------------------------------
    async def load_session(self, session_id: str) -> SessionRecord | None:
        """The session with its kept events, or None if unknown or expired."""
        ...

    async def save_session(self, record: SessionRecord, ttl_s: float) -> None:
        """Create or update a session's header (last_seq, first_seq, topics, updated_at,
        open_jobs); ``record.events`` are ignored."""
        ...

    async def append_events(
        self, session_id: str, events: Sequence[StoredEvent], ttl_s: float
    ) -> None:
        """Append events (seq ascending) to a session's replay buffer and bump its ``last_seq``."""
        ...

    async def trim_events(self, session_id: str, through_seq: int) -> None:
        """Drop kept events with ``seq <= through_seq`` (acked, or past the count/bytes/age limit).

        ``first_seq`` moves to ``through_seq + 1`` but never past ``last_seq + 1``.
        """
        ...

    async def delete_session(self, session_id: str) -> None:
        """Forget a session entirely."""
        ...
