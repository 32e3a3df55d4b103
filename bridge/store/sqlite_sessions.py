"""The SQLite store's session and replay-log statements, one function per store operation, run on
its connection thread; apart so the session rules (expiry drops the events) read in one place."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from bridge.store.base import SessionRecord, StoredEvent


def live_session(conn: sqlite3.Connection, session_id: str, now: float) -> SessionRecord | None:
    """The session's header if alive; an expired one is deleted with its events and gives None."""
    row = conn.execute(
        "SELECT last_seq, first_seq, topics, updated_at, expires_at, open_jobs FROM sessions"
        " WHERE session_id = ?",
        (session_id,),
    ).fetchone()
    if row is None:
        return None
    if row[4] <= now:
        conn.execute("DELETE FROM events WHERE session_id = ?", (session_id,))
        conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
        return None
    topics = json.loads(row[2])
    return SessionRecord(
        session_id=session_id,
        last_seq=int(row[0]),
        first_seq=int(row[1]),
        topics=[str(t) for t in topics],
        updated_at=float(row[3]),
        open_jobs=[str(j) for j in json.loads(row[5])],
    )


def load_session(conn: sqlite3.Connection, now: float, session_id: str) -> SessionRecord | None:
    """The live session with its stored events from ``first_seq`` on, or None."""
    rec = live_session(conn, session_id, now)
    if rec is None:
        return None
    rows = conn.execute(
        "SELECT seq, ts, frame FROM events WHERE session_id = ? AND seq >= ? ORDER BY seq",
        (session_id, rec.first_seq),
    ).fetchall()
    rec.events = [StoredEvent(int(r[0]), float(r[1]), str(r[2])) for r in rows]
    return rec


def save_session(
    conn: sqlite3.Connection,
    now: float,
    record: SessionRecord,
    ttl_s: float,
    topics: str,
    open_jobs: str,
) -> None:
    """Write the session's header (``topics`` and ``open_jobs`` as JSON, encoded by the caller
    when it saves) and drop its events before ``first_seq``."""
    sid = record.session_id
    live_session(conn, sid, now)  # drops an expired one with its events
    conn.execute(
        "INSERT OR REPLACE INTO sessions (session_id, last_seq, first_seq, topics,"
        " updated_at, expires_at, open_jobs) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            sid,
            record.last_seq,
            record.first_seq,
            topics,
            record.updated_at,
            now + ttl_s,
            open_jobs,
        ),
    )
    conn.execute("DELETE FROM events WHERE session_id = ? AND seq < ?", (sid, record.first_seq))


def append_events(
    conn: sqlite3.Connection,
    now: float,
    session_id: str,
    events: Sequence[StoredEvent],
    ttl_s: float,
) -> None:
    """Store the events past the session's ``last_seq`` (creating the session if none is live)."""
    rec = live_session(conn, session_id, now)
    if rec is None:
        rec = SessionRecord(session_id=session_id)
        conn.execute(
            "INSERT INTO sessions (session_id, last_seq, first_seq, topics, updated_at,"
            " expires_at) VALUES (?, 0, 1, '[]', ?, ?)",
            (session_id, now, now + ttl_s),
        )
    fresh = [(session_id, e.seq, e.ts, e.frame) for e in events if e.seq > rec.last_seq]
    conn.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)", fresh)
    last = fresh[-1][1] if fresh else rec.last_seq
    conn.execute(
        "UPDATE sessions SET last_seq = ?, updated_at = ?, expires_at = ? WHERE session_id = ?",
        (last, now, now + ttl_s, session_id),
    )


def trim_events(conn: sqlite3.Connection, now: float, session_id: str, through_seq: int) -> None:
    """Drop the live session's events up to ``through_seq`` and move its ``first_seq`` past them."""
    rec = live_session(conn, session_id, now)
    if rec is None:
        return
    conn.execute("DELETE FROM events WHERE session_id = ? AND seq <= ?", (session_id, through_seq))
    first = max(rec.first_seq, min(through_seq, rec.last_seq) + 1)
    conn.execute("UPDATE sessions SET first_seq = ? WHERE session_id = ?", (first, session_id))


def delete_session(conn: sqlite3.Connection, now: float, session_id: str) -> None:
    """Delete the session and all its events."""
    conn.execute("DELETE FROM events WHERE session_id = ?", (session_id,))
    conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
