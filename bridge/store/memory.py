"""``memory://``: the store kept in this process's dicts. For unit tests only: nothing survives."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from bridge.store.base import InboxEntry, SessionRecord, StoredEvent


class MemoryStore:
    """A dict-backed :class:`~bridge.store.base.Store` with TTLs driven by an injectable clock."""

    def __init__(self, url: str = "memory://", clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self._keys: dict[str, float | None] = {}
        self._values: dict[str, tuple[str, float | None]] = {}
        self._inbox: dict[str, InboxEntry] = {}
        self._sessions: dict[str, tuple[SessionRecord, float]] = {}
        self.available = True

    def _alive(self, expires: float | None) -> bool:
        return expires is None or expires > self._clock()

    def _check(self) -> None:
        if not self.available:
            from bridge.store.base import StoreUnavailable

            raise StoreUnavailable("memory store switched off")

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        self._check()

    async def claim(self, key: str, ttl_s: float) -> bool:
        self._check()
        if key in self._keys and self._alive(self._keys[key]):
            return False
        self._keys[key] = self._clock() + ttl_s
        return True

    async def release(self, key: str) -> None:
        self._check()
        self._keys.pop(key, None)

    async def get_value(self, key: str) -> str | None:
        self._check()
        item = self._values.get(key)
        if item is None or not self._alive(item[1]):
            return None
        return item[0]

    async def set_value(self, key: str, value: str, ttl_s: float | None = None) -> None:
        self._check()
        self._values[key] = (value, None if ttl_s is None else self._clock() + ttl_s)

    async def inbox_add(self, entry: InboxEntry) -> None:
        self._check()
        self._inbox.setdefault(entry.entry_id, entry)

    async def inbox_pending(self, limit: int = 100) -> list[InboxEntry]:
        self._check()
        return sorted(self._inbox.values(), key=lambda e: e.accepted_at)[:limit]

    async def inbox_complete(self, entry_id: str) -> None:
        self._check()
        self._inbox.pop(entry_id, None)

    async def load_session(self, session_id: str) -> SessionRecord | None:
        self._check()
        item = self._sessions.get(session_id)
        if item is None or not self._alive(item[1]):
            return None
        rec = item[0]
        return replace(rec, topics=list(rec.topics), events=list(rec.events))

    async def save_session(self, record: SessionRecord, ttl_s: float) -> None:
        self._check()
        old = self._sessions.get(record.session_id)
        events = old[0].events if old else []
        kept = [e for e in events if e.seq >= record.first_seq]
        rec = replace(record, topics=list(record.topics), events=kept)
        self._sessions[record.session_id] = (rec, self._clock() + ttl_s)

    async def append_events(
        self, session_id: str, events: Sequence[StoredEvent], ttl_s: float
    ) -> None:
        self._check()
        item = self._sessions.get(session_id)
        rec = item[0] if item else SessionRecord(session_id=session_id)
        for ev in events:
            if ev.seq > rec.last_seq:
                rec.events.append(ev)
                rec.last_seq = ev.seq
        rec.updated_at = self._clock()
        self._sessions[session_id] = (rec, self._clock() + ttl_s)

    async def trim_events(self, session_id: str, through_seq: int) -> None:
        self._check()
        item = self._sessions.get(session_id)
        if item is None:
            return
        rec = item[0]
        rec.events = [e for e in rec.events if e.seq > through_seq]
        rec.first_seq = max(rec.first_seq, through_seq + 1)

    async def delete_session(self, session_id: str) -> None:
        self._check()
        self._sessions.pop(session_id, None)
