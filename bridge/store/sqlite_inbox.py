"""The SQLite store's IM inbox and dedupe-claim statements, run on its connection thread; kept
apart so what "accepted", "attempted" and "completed" mean for an inbox entry reads in one place."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from bridge.store.base import InboxEntry


def claim(conn: sqlite3.Connection, now: float, key: str, ttl_s: float) -> bool:
    """Take ``key`` for ``ttl_s`` seconds; False when a live claim already holds it."""
    row = conn.execute("SELECT expires_at FROM claims WHERE key = ?", (key,)).fetchone()
    if row is not None and row[0] > now:
        return False
    conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?)", (key, now + ttl_s))
    return True


def inbox_add(conn: sqlite3.Connection, entry: InboxEntry) -> None:
    """Record ``entry`` unless its id is already there (pending or completed)."""
    conn.execute(
        "INSERT OR IGNORE INTO inbox (entry_id, payload, accepted_at, attempts)"
        " VALUES (?, ?, ?, ?)",
        (entry.entry_id, entry.payload, entry.accepted_at, entry.attempts),
    )


def accept_entry(
    conn: sqlite3.Connection, now: float, entry: InboxEntry, keys: Sequence[str], ttl_s: float
) -> bool:
    """Record ``entry`` and claim every key in one transaction; True when all were new."""
    inbox_add(conn, entry)
    return all([claim(conn, now, key, ttl_s) for key in keys])


def inbox_attempt(conn: sqlite3.Connection, entry_id: str) -> int:
    """Count one more attempt of a pending entry; its new count, or 0 when none is pending."""
    row = conn.execute(
        "UPDATE inbox SET attempts = attempts + 1"
        " WHERE entry_id = ? AND completed_at IS NULL RETURNING attempts",
        (entry_id,),
    ).fetchone()
    return 0 if row is None else int(row[0])


def inbox_pending(conn: sqlite3.Connection, limit: int) -> list[InboxEntry]:
    """The oldest ``limit`` entries not completed yet, in the order they were accepted."""
    rows = conn.execute(
        "SELECT entry_id, payload, accepted_at, attempts FROM inbox"
        " WHERE completed_at IS NULL ORDER BY accepted_at, rowid LIMIT ?",
        (limit,),
    ).fetchall()
    return [InboxEntry(str(r[0]), bytes(r[1]), float(r[2]), int(r[3])) for r in rows]


def inbox_complete(conn: sqlite3.Connection, now: float, entry_id: str) -> None:
    """Mark the entry completed (a tombstone without its payload), even if it was never added."""
    conn.execute(
        "INSERT INTO inbox (entry_id, payload, accepted_at, completed_at)"
        " VALUES (?, x'', ?, ?) ON CONFLICT (entry_id) DO UPDATE"
        " SET completed_at = excluded.completed_at, payload = x''"
        " WHERE completed_at IS NULL",
        (entry_id, now, now),
    )
