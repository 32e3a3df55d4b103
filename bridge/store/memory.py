"""``memory://``: the store kept in this process's dicts. For unit tests only: nothing survives."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from bridge.store.base import (
    INBOX_DONE_RETENTION_S,
    InboxEntry,
    SessionRecord,
    StoredEvent,
    StoreUnavailable,
)
from bridge.store.checks import (
    check_entry,
    check_events,
    check_key,
    check_limit,
    check_seq,
    check_ttl,
    check_value,
)

_NO_ITEMS: list[str] = []
_NO_EVENTS: list[StoredEvent] = []


class MemoryStore:
    """A dict-backed :class:`~bridge.store.base.Store` with TTLs driven by an injectable clock."""

    def __init__(self, url: str = "memory://", clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self._keys: dict[str, float | None] = {}
        self._values: dict[str, tuple[str, float | None]] = {}
        self._counters: dict[str, tuple[int, float]] = {}
        self._inbox: dict[str, InboxEntry] = {}
        self._done: dict[str, float] = {}
        self._sessions: dict[str, tuple[SessionRecord, float]] = {}
        # Events as plain (seq, ts, frame) tuples, not StoredEvent objects: tuples of atoms are
        # untracked by the cyclic GC, so a hub benchmarked on this store is not slowed by full
        # collections walking every stored event (the records' own ``events`` stay empty).
        self._events: dict[str, list[tuple[int, float, str]]] = {}
        self.available = True

    def _alive(self, expires: float | None) -> bool:
        return expires is None or expires > self._clock()

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("memory store switched off")

    def _session(self, session_id: str) -> SessionRecord | None:
        """The live record (not a copy), dropping it if it has expired."""
        item = self._sessions.get(session_id)
        if item is None:
            return None
        if not self._alive(item[1]):
            del self._sessions[session_id]
            self._events.pop(session_id, None)
            return None
        return item[0]

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        self._check()

    async def claim(self, key: str, ttl_s: float) -> bool:
        check_key(key)
        check_ttl(ttl_s)
        self._check()
        if key in self._keys and self._alive(self._keys[key]):
            return False
        self._keys[key] = self._clock() + ttl_s
        return True

    async def release(self, key: str) -> None:
        check_key(key)
        self._check()
        self._keys.pop(key, None)

    async def get_value(self, key: str) -> str | None:
        check_key(key)
        self._check()
        item = self._values.get(key)
        if item is None or not self._alive(item[1]):
            return None
        return item[0]

    async def set_value(self, key: str, value: str, ttl_s: float | None = None) -> None:
        check_key(key)
        check_value(value)
        if ttl_s is not None:
            check_ttl(ttl_s)
        self._check()
        self._values[key] = (value, None if ttl_s is None else self._clock() + ttl_s)

    async def incr(self, key: str, ttl_s: float) -> int:
        check_key(key)
        check_ttl(ttl_s)
        self._check()
        item = self._counters.get(key)
        if item is None or not self._alive(item[1]):
            item = (0, self._clock() + ttl_s)
        self._counters[key] = (item[0] + 1, item[1])
        return item[0] + 1

    async def inbox_add(self, entry: InboxEntry) -> None:
        check_entry(entry)
        self._check()
        done = self._done.get(entry.entry_id)
        if done is not None and self._alive(done):
            return
        self._inbox.setdefault(entry.entry_id, entry)

    async def accept_entry(self, entry: InboxEntry, keys: Sequence[str], ttl_s: float) -> bool:
        await self.inbox_add(entry)
        return all([await self.claim(key, ttl_s) for key in keys])

    async def inbox_attempt(self, entry_id: str) -> int:
        check_key(entry_id, "entry_id")
        self._check()
        entry = self._inbox.get(entry_id)
        if entry is None:
            return 0
        entry = replace(entry, attempts=entry.attempts + 1)
        self._inbox[entry_id] = entry
        return entry.attempts

    async def inbox_pending(self, limit: int = 100) -> list[InboxEntry]:
        check_limit(limit)
        self._check()
        return sorted(self._inbox.values(), key=lambda e: e.accepted_at)[:limit]

    async def inbox_complete(self, entry_id: str) -> None:
        check_key(entry_id, "entry_id")
        self._check()
        self._inbox.pop(entry_id, None)
        self._done[entry_id] = self._clock() + INBOX_DONE_RETENTION_S

    async def load_session(self, session_id: str) -> SessionRecord | None:
        check_key(session_id, "session_id")
        self._check()
        rec = self._session(session_id)
        if rec is None:
            return None
        events = [StoredEvent(*ev) for ev in self._events.get(session_id, ())]
        return replace(rec, topics=list(rec.topics), events=events, open_jobs=list(rec.open_jobs))

    async def save_session(self, record: SessionRecord, ttl_s: float) -> None:
        check_key(record.session_id, "session_id")
        check_seq(record.last_seq, "last_seq")
        check_ttl(ttl_s)
        self._check()
        sid = record.session_id
        old = self._session(sid)
        events = self._events.pop(sid, []) if old else []
        kept = [e for e in events if e[0] >= record.first_seq]
        if kept:
            self._events[sid] = kept
        # Empty lists are shared (never mutated here: load_session hands out copies).
        topics = list(record.topics) if record.topics else _NO_ITEMS
        open_jobs = list(record.open_jobs) if record.open_jobs else _NO_ITEMS
        rec = replace(record, topics=topics, events=_NO_EVENTS, open_jobs=open_jobs)
        self._sessions[sid] = (rec, self._clock() + ttl_s)

    async def append_events(
        self, session_id: str, events: Sequence[StoredEvent], ttl_s: float
    ) -> None:
        check_key(session_id, "session_id")
        check_events(events)
        check_ttl(ttl_s)
        self._check()
        rec = self._session(session_id)
        if rec is None:
            rec = SessionRecord(session_id=session_id)
            self._events.pop(session_id, None)
        kept = self._events.setdefault(session_id, [])
        for ev in events:
            if ev.seq > rec.last_seq:
                kept.append((ev.seq, ev.ts, ev.frame))
                rec.last_seq = ev.seq
        rec.updated_at = self._clock()
        self._sessions[session_id] = (rec, self._clock() + ttl_s)

    async def trim_events(self, session_id: str, through_seq: int) -> None:
        check_key(session_id, "session_id")
        check_seq(through_seq, "through_seq")
        self._check()
        rec = self._session(session_id)
        if rec is None:
            return
        kept = [e for e in self._events.pop(session_id, ()) if e[0] > through_seq]
        if kept:
            self._events[session_id] = kept
        rec.first_seq = max(rec.first_seq, min(through_seq, rec.last_seq) + 1)

    async def delete_session(self, session_id: str) -> None:
        check_key(session_id, "session_id")
        self._check()
        self._sessions.pop(session_id, None)
        self._events.pop(session_id, None)
