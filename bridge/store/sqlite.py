"""``sqlite:///PATH``: the embedded default store, one WAL-mode file that survives ``kill -9``.

Durability choice: ``synchronous=FULL`` by default. In WAL mode ``NORMAL`` already survives a killed
process, but a power cut or kernel crash may drop the last commits, and the bridge tells an IM
platform "200, got it" right after :meth:`SqliteStore.inbox_add` returns: the platform then never
re-delivers, so an acknowledged event must be on stable storage. FULL fsyncs the WAL on each commit;
group commit in :mod:`bridge.store.sqlite_worker` folds concurrent callers into one fsync. Operators
who accept the power-cut window can pass ``?synchronous=normal``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import structlog

from bridge.store import sqlite_inbox as inbox
from bridge.store import sqlite_sessions as sessions
from bridge.store.base import (
    INBOX_DONE_RETENTION_S,
    InboxEntry,
    SessionRecord,
    StoredEvent,
    StoreInUse,
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
from bridge.store.sqlite_schema import migrate
from bridge.store.sqlite_worker import SqliteWorker

log = structlog.get_logger(__name__)

T = TypeVar("T")

_SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "extra": "EXTRA"}


def parse_sqlite_url(url: str) -> tuple[Path, str]:
    """Split ``sqlite:///rel/path`` or ``sqlite:////abs/path`` into a path and a synchronous mode.

    Raises:
        ValueError: not an ``sqlite://`` URL, a host was given, no path, or an unknown option.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ValueError(f"not an sqlite URL: {parts.scheme!r}")
    if parts.netloc:
        raise ValueError("sqlite URL takes no host: use sqlite:///relative or sqlite:////absolute")
    raw = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not raw or raw.endswith("/"):
        raise ValueError("sqlite URL needs a file path, e.g. sqlite:///var/bridge.db")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = set(query) - {"synchronous"}
    if unknown:
        raise ValueError(f"unknown sqlite URL option(s): {', '.join(sorted(unknown))}")
    mode = query.get("synchronous", ["full"])[-1].lower()
    if mode not in _SYNC_MODES:
        raise ValueError(f"synchronous must be one of {sorted(_SYNC_MODES)}, not {mode!r}")
    return Path(raw), _SYNC_MODES[mode]


class SqliteStore:
    """A :class:`~bridge.store.base.Store` in one SQLite file, driven from a dedicated thread.

    Args:
        url: ``sqlite:///var/bridge.db`` (relative to the working directory) or
            ``sqlite:////abs/path.db``, optionally ``?synchronous=normal``.
        clock: wall-clock seconds; injected by tests to drive TTL expiry.
        purge_interval_s: how often (by ``clock``) expired rows are deleted in passing.
    """

    def __init__(
        self,
        url: str,
        clock: Callable[[], float] = time.time,
        purge_interval_s: float = 60.0,
    ) -> None:
        self.url = url
        self.path, self._synchronous = parse_sqlite_url(url)
        self._clock = clock
        self._purge_interval_s = purge_interval_s
        self._last_purge = float("-inf")
        self._worker: SqliteWorker | None = None
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        """The sidecar file whose exclusive lock marks the database as in use: ``<db>.lock``."""
        return self.path.with_name(self.path.name + ".lock")

    def _take_lock(self) -> None:
        """Hold an exclusive ``flock`` on :attr:`lock_path` while open; one process per file.

        Why: SQLite itself would let two bridges share the file, each believing it owns every
        session and inbox entry (double answers, lost leases). The kernel drops the lock when the
        process dies, even by ``kill -9``, so a crash never leaves the file locked.

        Raises:
            StoreInUse: another process (or another open store) holds the lock.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StoreInUse(
                f"--store: {self.path} is in use by another bridge process{who}; an SQLite file "
                "serves one process only: stop that process, give this one its own "
                "sqlite:///PATH, or use redis:// to run several nodes"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        log.debug("sqlite_store_locked", path=str(self.lock_path), pid=os.getpid())

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    # --- lifecycle ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA busy_timeout = 5000")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreUnavailable(f"sqlite could not switch {self.path} to WAL (got {mode})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        before = migrate(conn)
        log.info("sqlite_store_opened", path=str(self.path), schema_from=before)
        return conn

    async def open(self) -> None:
        """Lock the file for this process (:meth:`_take_lock`), then open and migrate it.

        Raises:
            StoreInUse: another process uses the file.
            StoreUnavailable: the file cannot be opened.
        """
        if self._worker is not None:
            return
        try:
            self._take_lock()
        except OSError as exc:
            raise StoreUnavailable(f"cannot lock {self.lock_path}: {exc}") from exc
        worker = SqliteWorker(self._connect)
        try:
            await worker.start()
        except OSError as exc:
            self._release_lock()
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        except BaseException:
            self._release_lock()
            raise
        self._worker = worker

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.stop()
        self._release_lock()

    async def _call(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        if self._worker is None:
            raise StoreUnavailable("sqlite store is not open")
        now = self._clock()
        purge = now - self._last_purge >= self._purge_interval_s
        if purge:
            self._last_purge = now

        def run(conn: sqlite3.Connection) -> T:
            if purge:
                _purge(conn, now)
            return fn(conn, now)

        return await self._worker.call(run)

    async def ping(self) -> None:
        await self._call(lambda conn, now: conn.execute("SELECT 1").fetchone())

    async def purge_expired(self) -> None:
        """Delete expired keys, values, counters, old inbox tombstones and sessions now."""
        await self._call(_purge)

    # --- dedupe and idempotency --------------------------------------------------------------
    async def claim(self, key: str, ttl_s: float) -> bool:
        check_key(key)
        check_ttl(ttl_s)
        return await self._call(lambda conn, now: inbox.claim(conn, now, key, ttl_s))

    async def release(self, key: str) -> None:
        check_key(key)
        await self._call(lambda conn, now: conn.execute("DELETE FROM claims WHERE key = ?", (key,)))

    async def get_value(self, key: str) -> str | None:
        check_key(key)

        def op(conn: sqlite3.Connection, now: float) -> str | None:
            row = conn.execute(
                "SELECT value FROM kv WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)",
                (key, now),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._call(op)

    async def set_value(self, key: str, value: str, ttl_s: float | None = None) -> None:
        check_key(key)
        check_value(value)
        if ttl_s is not None:
            check_ttl(ttl_s)
        await self._call(
            lambda conn, now: conn.execute(
                "INSERT OR REPLACE INTO kv VALUES (?, ?, ?)",
                (key, value, None if ttl_s is None else now + ttl_s),
            )
        )

    async def incr(self, key: str, ttl_s: float) -> int:
        check_key(key)
        check_ttl(ttl_s)

        def op(conn: sqlite3.Connection, now: float) -> int:
            row = conn.execute(
                "SELECT value, expires_at FROM counters WHERE key = ?", (key,)
            ).fetchone()
            if row is None or row[1] <= now:
                conn.execute("INSERT OR REPLACE INTO counters VALUES (?, 1, ?)", (key, now + ttl_s))
                return 1
            conn.execute("UPDATE counters SET value = value + 1 WHERE key = ?", (key,))
            return int(row[0]) + 1

        return await self._call(op)

    # --- the IM inbox (statements in bridge.store.sqlite_inbox) ------------------------------
    async def inbox_add(self, entry: InboxEntry) -> None:
        check_entry(entry)
        await self._call(lambda conn, now: inbox.inbox_add(conn, entry))

    async def accept_entry(self, entry: InboxEntry, keys: Sequence[str], ttl_s: float) -> bool:
        check_entry(entry)
        for key in keys:
            check_key(key)
        check_ttl(ttl_s)
        return await self._call(lambda conn, now: inbox.accept_entry(conn, now, entry, keys, ttl_s))

    async def inbox_attempt(self, entry_id: str) -> int:
        check_key(entry_id, "entry_id")
        return await self._call(lambda conn, now: inbox.inbox_attempt(conn, entry_id))

    async def inbox_pending(self, limit: int = 100) -> list[InboxEntry]:
        check_limit(limit)
        return await self._call(lambda conn, now: inbox.inbox_pending(conn, limit))

    async def inbox_complete(self, entry_id: str) -> None:
        check_key(entry_id, "entry_id")
        await self._call(lambda conn, now: inbox.inbox_complete(conn, now, entry_id))

    # --- sessions and replay (statements in bridge.store.sqlite_sessions) ---------------------
    async def load_session(self, session_id: str) -> SessionRecord | None:
        check_key(session_id, "session_id")
        return await self._call(lambda conn, now: sessions.load_session(conn, now, session_id))

    async def save_session(self, record: SessionRecord, ttl_s: float) -> None:
        check_key(record.session_id, "session_id")
        check_seq(record.last_seq, "last_seq")
        check_seq(record.first_seq, "first_seq")
        check_ttl(ttl_s)
        topics = json.dumps(list(record.topics))
        open_jobs = json.dumps(list(record.open_jobs))
        await self._call(
            lambda conn, now: sessions.save_session(conn, now, record, ttl_s, topics, open_jobs)
        )

    async def append_events(
        self, session_id: str, events: Sequence[StoredEvent], ttl_s: float
    ) -> None:
        check_key(session_id, "session_id")
        check_events(events)
        check_ttl(ttl_s)
        batch = list(events)
        await self._call(
            lambda conn, now: sessions.append_events(conn, now, session_id, batch, ttl_s)
        )

    async def trim_events(self, session_id: str, through_seq: int) -> None:
        check_key(session_id, "session_id")
        check_seq(through_seq, "through_seq")
        await self._call(lambda conn, now: sessions.trim_events(conn, now, session_id, through_seq))

    async def delete_session(self, session_id: str) -> None:
        check_key(session_id, "session_id")
        await self._call(lambda conn, now: sessions.delete_session(conn, now, session_id))


def _purge(conn: sqlite3.Connection, now: float) -> None:
    """Delete everything whose time is up, so the file does not grow without bound."""
    conn.execute("DELETE FROM claims WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
    conn.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
    conn.execute(
        "DELETE FROM inbox WHERE completed_at IS NOT NULL AND completed_at <= ?",
        (now - INBOX_DONE_RETENTION_S,),
    )
    conn.execute(
        "DELETE FROM events WHERE session_id IN"
        " (SELECT session_id FROM sessions WHERE expires_at <= ?)",
        (now,),
    )
    conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
