"""The one thread that owns the SQLite connection, with group commit so the event loop never blocks.

Every store call becomes an operation (a function of the connection) queued to this thread. The
thread takes whatever operations are waiting, runs each inside its own savepoint of a single
transaction, and commits once: one fsync covers a whole burst of callers, and a failing operation
rolls back alone. Callers' futures are resolved only after the commit returned, so "the call
returned" means "on disk".
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from bridge.store.base import StoreUnavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Most operations folded into one transaction (bounds the latency of the first one in a burst).
MAX_BATCH = 256


@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the operation still ran (or not) atomically
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _as_unavailable(exc: sqlite3.Error) -> BaseException:
    """Map an SQLite failure to what the caller sees: operational trouble is unavailability."""
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError
    ):
        err = StoreUnavailable(f"sqlite: {exc}")
        err.__cause__ = exc
        return err
    return exc


class SqliteWorker:
    """Owns a ``sqlite3.Connection`` on a dedicated thread and runs queued operations in batches."""

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], name: str = "sqlite-store"
    ) -> None:
        self._connect = connect
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the thread and open the connection on it; raise what opening raised."""
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._startup_error is not None:
            raise self._startup_error

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the worker inside a committed transaction and return its result.

        Raises:
            StoreUnavailable: the worker is closed, or SQLite failed operationally (disk, I/O).
        """
        if self._closed or not self._thread.is_alive():
            raise StoreUnavailable("sqlite store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn, future, loop))
        return await future

    async def stop(self) -> None:
        """Finish queued operations, close the connection and join the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to start(), which re-raises on the loop
            self._startup_error = _as_unavailable(exc) if isinstance(exc, sqlite3.Error) else exc
            self._ready.set()
            return
        self._ready.set()
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._run_batch(conn, batch)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        outcomes: list[tuple[_Op, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result = op.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    err = _as_unavailable(exc) if isinstance(exc, sqlite3.Error) else exc
                    outcomes.append((op, None, err))
                else:
                    conn.execute("RELEASE op")
                    outcomes.append((op, result, None))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("sqlite_batch_failed", error=str(exc), ops=len(batch))
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("sqlite_rollback_failed")
            err = _as_unavailable(exc)
            outcomes = [(op, None, err) for op in batch]
        for op, result, error in outcomes:
            # RuntimeError: the caller's loop is gone, so nobody is waiting.
            with contextlib.suppress(RuntimeError):
                op.loop.call_soon_threadsafe(_resolve, op.future, result, error)
