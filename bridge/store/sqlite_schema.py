"""The SQLite store's schema, versioned with ``PRAGMA user_version``, migrated forward on open."""

from __future__ import annotations

import sqlite3

from bridge.store.base import StoreUnavailable

#: Migration N (1-based) brings a database from user_version N-1 to N. Append; never edit one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE claims (
        key TEXT PRIMARY KEY,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        expires_at REAL
    ) WITHOUT ROWID;
    CREATE TABLE counters (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE inbox (
        entry_id TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        accepted_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        completed_at REAL
    );
    CREATE INDEX inbox_pending ON inbox (accepted_at) WHERE completed_at IS NULL;
    CREATE INDEX inbox_done ON inbox (completed_at) WHERE completed_at IS NOT NULL;
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        topics TEXT NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    CREATE TABLE events (
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts REAL NOT NULL,
        frame TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    """,
    # 2: the session header records the client ids of jobs whose terminal event is still due.
    """
    ALTER TABLE sessions ADD COLUMN open_jobs TEXT NOT NULL DEFAULT '[]';
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring ``conn``'s database to :data:`SCHEMA_VERSION`; return the version it had before.

    Raises:
        StoreUnavailable: the file was written by a newer bridge (refuse rather than corrupt it).
    """
    (found,) = conn.execute("PRAGMA user_version").fetchone()
    if found > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"database schema version {found} is newer than this bridge's {SCHEMA_VERSION}"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return int(found)
