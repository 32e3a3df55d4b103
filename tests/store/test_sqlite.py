"""SQLite store specifics: URLs, pragmas, schema, restart, purge and ``kill -9`` durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bridge.store import open_store
from bridge.store.base import InboxEntry, SessionRecord, StoredEvent, StoreUnavailable
from bridge.store.sqlite import SqliteStore, parse_sqlite_url
from bridge.store.sqlite_schema import MIGRATIONS, SCHEMA_VERSION
from tests.store.conftest import FakeClock

REPO = Path(__file__).resolve().parents[2]


def test_url_parsing() -> None:
    assert parse_sqlite_url("sqlite:///var/bridge.db") == (Path("var/bridge.db"), "FULL")
    assert parse_sqlite_url("sqlite:////abs/x.db") == (Path("/abs/x.db"), "FULL")
    assert parse_sqlite_url("sqlite:///a.db?synchronous=normal") == (Path("a.db"), "NORMAL")
    for bad in [
        "sqlite://",
        "sqlite:///",
        "sqlite://host/x.db",
        "sqlite:///dir/",
        "sqlite:///a.db?synchronous=off",
        "sqlite:///a.db?journal=delete",
        "postgres:///a.db",
    ]:
        with pytest.raises(ValueError):
            parse_sqlite_url(bad)


async def test_open_store_picks_sqlite_and_creates_parent_dirs(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/deep/er/bridge.db")
    assert isinstance(store, SqliteStore)
    await store.open()
    await store.open()  # idempotent
    await store.ping()
    await store.close()
    assert (tmp_path / "deep/er/bridge.db").exists()


async def test_relative_path_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqliteStore("sqlite:///var/bridge.db")
    await store.open()
    await store.close()
    assert (tmp_path / "var/bridge.db").exists()


async def test_wal_full_sync_and_schema_version(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path}/b.db")
    await store.open()
    sync = await store._call(lambda conn, now: conn.execute("PRAGMA synchronous").fetchone()[0])
    await store.close()
    assert sync == 2  # FULL
    conn = sqlite3.connect(tmp_path / "b.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_a_schema_v1_database_is_migrated_and_its_sessions_have_no_open_jobs(
    tmp_path: Path,
) -> None:
    conn = sqlite3.connect(tmp_path / "b.db")
    for statement in MIGRATIONS[0].split(";"):  # the file an older bridge wrote
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO sessions VALUES ('s1', 2, 1, '[\"ops\"]', 5.0, ?)",
        (time.time() + 3600,),
    )
    conn.execute("INSERT INTO events VALUES ('s1', 1, 1.0, 'f1'), ('s1', 2, 2.0, 'f2')")
    conn.commit()
    conn.close()
    store = SqliteStore(f"sqlite:///{tmp_path}/b.db")
    await store.open()
    try:
        rec = await store.load_session("s1")
        assert rec is not None and rec.open_jobs == []
        assert (rec.last_seq, rec.first_seq, rec.topics, rec.updated_at) == (2, 1, ["ops"], 5.0)
        assert [e.frame for e in rec.events] == ["f1", "f2"]
        await store.save_session(SessionRecord("s1", last_seq=2, open_jobs=["j"]), 3600)
        rec = await store.load_session("s1")
        assert rec is not None and rec.open_jobs == ["j"] and len(rec.events) == 2
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SqliteStore(f"sqlite:///{tmp_path}/b.db")
    with pytest.raises(StoreUnavailable, match="newer"):
        await store.open()


async def test_garbage_file_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "b.db").write_bytes(b"this is not a database" * 100)
    store = SqliteStore(f"sqlite:///{tmp_path}/b.db")
    with pytest.raises(StoreUnavailable):
        await store.open()


async def test_calls_before_open_and_after_close_are_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path}/b.db")
    with pytest.raises(StoreUnavailable):
        await store.claim("k", 1.0)
    await store.open()
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_close_and_reopen_keeps_everything(tmp_path: Path) -> None:
    clock = FakeClock()
    url = f"sqlite:///{tmp_path}/b.db"
    store = SqliteStore(url, clock=clock)
    await store.open()
    assert await store.claim("dedupe:1", 3600)
    await store.set_value("reply:1", "om_1")
    await store.incr("rate:1", 3600)
    await store.inbox_add(InboxEntry("m1", b"payload", accepted_at=1.0))
    await store.inbox_add(InboxEntry("m2", b"done", accepted_at=2.0))
    await store.inbox_complete("m2")
    await store.append_events("s1", [StoredEvent(1, 1.0, "a"), StoredEvent(2, 2.0, "b")], 3600)
    await store.save_session(SessionRecord("s1", last_seq=2, topics=["ops"]), 3600)
    await store.close()

    store = SqliteStore(url, clock=clock)
    await store.open()
    assert not await store.claim("dedupe:1", 3600)
    assert await store.get_value("reply:1") == "om_1"
    assert await store.incr("rate:1", 3600) == 2
    assert [e.entry_id for e in await store.inbox_pending()] == ["m1"]
    await store.inbox_add(InboxEntry("m2", b"again", accepted_at=3.0))
    assert [e.entry_id for e in await store.inbox_pending()] == ["m1"]
    rec = await store.load_session("s1")
    assert rec is not None and rec.topics == ["ops"] and [e.frame for e in rec.events] == ["a", "b"]
    await store.close()


async def test_purge_deletes_expired_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteStore(f"sqlite:///{tmp_path}/b.db", clock=clock)
    await store.open()
    await store.claim("k", 10)
    await store.set_value("v", "x", ttl_s=10)
    await store.incr("c", 10)
    await store.append_events("s", [StoredEvent(1, 1.0, "f")], 10)
    clock.now += 11
    await store.purge_expired()

    def counts(conn: sqlite3.Connection, now: float) -> list[int]:
        tables = ["claims", "kv", "counters", "sessions", "events"]
        return [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables]

    assert await store._call(counts) == [0, 0, 0, 0, 0]
    await store.close()


async def test_event_loop_keeps_running_during_a_big_write(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path}/b.db")
    await store.open()
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    big = [StoredEvent(i, 1.0, "x" * 1000) for i in range(1, 5001)]
    await store.append_events("s", big, 3600)
    stop.set()
    await task
    await store.close()
    assert ticks > 1  # the loop ran while the thread wrote


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from bridge.store.base import InboxEntry
    from bridge.store.sqlite import SqliteStore

    async def main() -> None:
        store = SqliteStore(sys.argv[1])
        await store.open()
        i = 0
        while True:
            await store.inbox_add(InboxEntry(f"e{i}", b"p" * 100, accepted_at=float(i)))
            won = await store.claim(f"k{i}", 3600)
            sys.stdout.write(f"acked {i} {int(won)}\\n")
            sys.stdout.flush()
            i += 1

    asyncio.run(main())
    """
)


async def test_kill_9_loses_nothing_that_was_returned(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        url,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    acked: list[int] = []
    try:
        async with asyncio.timeout(60):
            while len(acked) < 150:
                line = await proc.stdout.readline()
                if not line:
                    break
                if not line.startswith(b"acked "):
                    continue  # a log line
                _, seq, won = line.decode().split()
                assert won == "1"
                acked.append(int(seq))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert len(acked) >= 150, "child did not make progress"
    # Everything it printed before the kill must be on disk; the unread pipe may hold more.
    store = SqliteStore(url)
    await store.open()
    pending = {e.entry_id for e in await store.inbox_pending(limit=100_000)}
    assert {f"e{i}" for i in acked} <= pending
    for i in acked:
        assert not await store.claim(f"k{i}", 3600)
    await store.close()
