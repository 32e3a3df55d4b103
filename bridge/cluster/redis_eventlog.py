"""The event log across nodes on a Redis stream ``{prefix}events`` (Redis 7 for gap detection).

``append`` is ``XADD {prefix}events MAXLEN ~ max_len * payload <bytes>``. Each node runs one reader
task on its own connection (named with ``CLIENT SETNAME`` so operators and tests can find it). The
reader starts at the stream's end as it is when the node starts (``$`` resolved to a concrete id,
so older entries are not replayed), then loops: one ``MULTI``/``EXEC`` takes ``XINFO STREAM`` and
``XREAD COUNT batch`` after the last entry it delivered, atomically; when that reached the end,
``XREAD BLOCK`` waits for the next entry. After a disconnect it reconnects with backoff and reads on
from the last entry it delivered, so nothing appended meanwhile is missed while the stream still
holds it.

Gaps: the reader counts the entries it has passed (``entries-added`` at the start, plus one per
entry read). Entries the stream no longer holds number ``entries-added - length``; when that is
larger than the count, entries after the last delivered one were trimmed before this node read
them: it logs ``fanout_gap`` with the ids and the number lost, and reads on from the oldest entry
left. That happens only to a node that falls ``max_len`` entries behind (cut off for minutes).

Resets: Redis restarted without persistence (or the stream deleted) starts a new stream whose ids
need not be above the last id a node read: Redis ids are millisecond timestamps, so they normally
are, but not after a clock step back or a failover to a machine whose clock is behind. Readers keep
a random token in ``{prefix}events:epoch`` (``SET NX`` in every look); a changed token, a missing
stream, or ``entries-added`` going down means a new stream, read from its beginning
(``eventlog_stream_reset``). A stream whose ``last-generated-id`` went below the cursor but keeps
its token (an asynchronous replica promoted after losing the tail) is read from its last id on
(``eventlog_stream_rewound``). Entries read twice across such a reset are dropped by the fan-out's
per-origin sequence numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from bridge.cluster.eventlog import EntryCallback, check_entry, parse_entry_id, stop_task
from bridge.store.backoff import Backoff
from bridge.store.base import StoreUnavailable
from bridge.store.checks import check_key
from bridge.store.redis_client import is_unavailable, make_client, split_redis_url

log = structlog.get_logger(__name__)

#: Entries kept in the stream. Events are ~100-300 bytes, so Redis holds at most about 35 MiB for
#: them (measured on Redis 7.0: 28 MiB for 100,000 entries of 243 bytes); at a heavy 500 events/s
#: (16 answers streaming tokens at once) that is over three minutes for a cut-off node to catch up.
DEFAULT_MAX_LEN = 100_000

_FIELD = b"payload"


class RedisEventLog:
    """An :class:`~bridge.cluster.eventlog.EventLog` on a Redis stream ``{prefix}events``.

    Args:
        url: ``redis://host:port/db[?prefix=bridge:]``.
        max_len: entries the stream keeps (approximately: ``MAXLEN ~`` trims whole nodes).
        batch: most entries taken by one read.
        block_s: longest wait in one ``XREAD BLOCK`` (also bounds how long :meth:`close` takes).
        client_name: ``CLIENT SETNAME`` of the reader's connection.
        backoff: reconnect delays (injected by tests).
    """

    def __init__(
        self,
        url: str,
        max_len: int = DEFAULT_MAX_LEN,
        batch: int = 500,
        block_s: float = 1.0,
        client_name: str = "bridge-events",
        backoff: Backoff | None = None,
    ) -> None:
        self._client_url, prefix = split_redis_url(url)
        self.stream = f"{prefix}events"
        self.epoch_key = f"{prefix}events:epoch"
        if max_len < 1 or batch < 1 or block_s <= 0:
            raise ValueError("max_len and batch must be >= 1, block_s > 0")
        self.max_len = max_len
        # CLIENT SETNAME refuses spaces; a node id could hold one.
        self.client_name = "".join("_" if c.isspace() else c for c in client_name)[:128]
        check_key(self.client_name, "client_name")
        self._log = log.bind(stream=self.stream, reader=self.client_name)
        self._batch = batch
        self._block_ms = max(1, int(block_s * 1000))
        self._backoff = backoff or Backoff(initial=0.05, cap=2.0)
        self._client: aioredis.Redis | None = None
        self._reader_client: aioredis.Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._on_entry: EntryCallback | None = None
        self._cursor: str | None = None  # id of the last entry passed (the end, at start)
        self._offset: int | None = None  # entries added to the stream up to the cursor
        self._epoch: bytes | None = None
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        self.last_gap: dict[str, Any] | None = None
        self.lost = 0

    @property
    def cursor(self) -> str | None:
        """Id of the last entry this node passed, or the stream's end at start (None before)."""
        return self._cursor

    async def start(self, on_entry: EntryCallback) -> None:
        """Connect, remember the stream's end and start the reader; with Redis down, the reader
        takes the end when it first connects."""
        if self._reader is not None:
            return
        self._on_entry = on_entry
        self._closing = False
        self._client = make_client(self._client_url)
        self._reader_client = make_client(
            _with_client_name(self._client_url, self.client_name),
            op_timeout_s=self._block_ms / 1000 + 5,
            max_connections=1,
        )
        try:
            await self._resolve_start()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self._log.warning("eventlog_unreachable_at_start", error=str(exc))
        self._reader = asyncio.create_task(self._read_forever(), name="eventlog-reader")

    async def close(self) -> None:
        self._closing = True
        reader, self._reader = self._reader, None
        if reader is not None:
            await stop_task(reader, self._block_ms / 1000 + 2)
        for client in (self._client, self._reader_client):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._client = self._reader_client = None
        self.connected.clear()

    # --- appending ------------------------------------------------------------------------------
    async def append(self, payload: bytes) -> str:
        check_entry(payload)
        client = self._appender()
        try:
            raw = await client.xadd(
                self.stream, {_FIELD: payload}, maxlen=self.max_len, approximate=True
            )
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"redis xadd failed: {exc}") from exc
            raise
        return _text(raw)

    async def append_many(self, payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            check_entry(payload)
        if not payloads:
            return
        client = self._appender()
        try:
            async with client.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.xadd(self.stream, {_FIELD: payload}, maxlen=self.max_len, approximate=True)
                await pipe.execute()
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"redis xadd failed: {exc}") from exc
            raise

    def _appender(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreUnavailable("event log is not started")
        return self._client

    # --- reading --------------------------------------------------------------------------------
    async def _read_forever(self) -> None:
        while not self._closing:
            try:
                if self._cursor is None:
                    await self._resolve_start()
                more = await self._read_step()
                self._up()
                if not more and not self._closing:
                    await self._wait_for_entries()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_unavailable(exc):
                    self._log.exception("eventlog_reader_failed")
                self._lost(str(exc))
                await asyncio.sleep(self._backoff.next_delay())

    async def _snapshot(self, read: bool) -> tuple[bytes | None, dict[str, Any] | None, list[Any]]:
        """Atomically: make sure the epoch token exists and get it, ``XINFO STREAM`` (None when
        there is no stream) and, if ``read``, the entries after the cursor."""
        client = self._reader_client
        if client is None:
            raise StoreUnavailable("event log is not started")
        async with client.pipeline(transaction=True) as pipe:
            pipe.set(self.epoch_key, secrets.token_hex(8), nx=True)
            pipe.get(self.epoch_key)
            pipe.xinfo_stream(self.stream)
            if read:
                pipe.xread({self.stream: self._cursor or "0-0"}, count=self._batch)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception) and not _no_such_key(result):
                raise result
        epoch = results[1] if isinstance(results[1], bytes) else None
        info = results[2] if isinstance(results[2], dict) else None
        entries: list[Any] = []
        if read:
            for _stream, messages in results[3] or []:
                entries.extend(messages)
        return epoch, info, entries

    async def _resolve_start(self) -> None:
        """Take the stream's current end as the cursor (``$`` made concrete)."""
        epoch, info, _ = await self._snapshot(read=False)
        self._epoch = epoch
        if info is None:
            self._cursor, self._offset = "0-0", 0
        else:
            self._cursor = _text(info["last-generated-id"])
            self._offset = _added(info)
            if self._offset is None:
                self._log.warning("eventlog_gap_detection_unavailable")
        self._log.info("eventlog_started", start_id=self._cursor)

    async def _read_step(self) -> bool:
        """Deliver the entries after the cursor; True when more may be waiting already."""
        cursor = self._cursor or "0-0"
        epoch, info, entries = await self._snapshot(read=True)
        if self._epoch is not None and epoch != self._epoch:
            self._epoch = epoch
            self._reset("epoch_changed")
            return True
        self._epoch = epoch
        if info is None:
            if cursor != "0-0":
                self._reset("stream_missing")
            return False
        last_id = _text(info["last-generated-id"])
        added = _added(info)
        if parse_entry_id(last_id) < parse_entry_id(cursor):
            self._log.warning("eventlog_stream_rewound", after_id=cursor, last_id=last_id)
            self._cursor, self._offset = last_id, added
            return True
        if added is not None and self._offset is not None:
            if added < self._offset:
                self._reset("entries_added_decreased")
                return True
            gone = added - int(info["length"])  # entries the stream no longer holds
            if gone > self._offset:
                self._gap(cursor, gone - self._offset, info)
                self._offset = gone
        self._deliver(entries)
        return len(entries) >= self._batch

    def _deliver(self, entries: list[Any]) -> None:
        callback = self._on_entry
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            self._cursor = entry_id
            if self._offset is not None:
                self._offset += 1
            payload = (fields or {}).get(_FIELD)
            if not isinstance(payload, bytes):
                self._log.error("eventlog_entry_malformed", entry_id=entry_id)
                continue
            if callback is None:
                continue
            try:
                callback(entry_id, payload)
            except Exception:
                self._log.exception("eventlog_callback_failed", entry_id=entry_id)

    async def _wait_for_entries(self) -> None:
        """Block until an entry after the cursor exists (or ``block_s`` passed); the next
        :meth:`_read_step` reads it, with the stream's state, atomically."""
        client = self._reader_client
        if client is None:
            raise StoreUnavailable("event log is not started")
        await client.xread({self.stream: self._cursor or "0-0"}, count=1, block=self._block_ms)

    def _reset(self, reason: str) -> None:
        self._log.warning("eventlog_stream_reset", reason=reason, after_id=self._cursor)
        self._cursor, self._offset = "0-0", 0

    def _gap(self, after_id: str, lost: int, info: dict[str, Any]) -> None:
        first = info.get("first-entry")
        first_id = _text(first[0]) if first else None
        self.lost += lost
        self.last_gap = {"after_id": after_id, "first_id": first_id, "lost": lost}
        self._log.error(
            "fanout_gap",
            after_id=after_id,
            first_id=first_id,
            lost=lost,
            max_deleted_id=_text(info.get("max-deleted-entry-id") or b""),
        )

    def _up(self) -> None:
        if not self.connected.is_set():
            if self.last_error is not None:
                self._log.info("eventlog_reconnected", resume_id=self._cursor)
            self.last_error = None
            self.connected.set()
        self._backoff.reset()

    def _lost(self, error: str) -> None:
        if self.connected.is_set() or self.last_error is None:
            self._log.warning("eventlog_disconnected", resume_id=self._cursor, error=error)
        self.connected.clear()
        self.last_error = error


def _with_client_name(url: str, name: str) -> str:
    """``url`` with redis-py's ``client_name`` option, so every (re)connect sets the name."""
    parts = urlsplit(url)
    query = [
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "client_name"
    ]
    query.append(("client_name", name))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _no_such_key(exc: Exception) -> bool:
    return isinstance(exc, ResponseError) and "no such key" in str(exc).lower()


def _added(info: dict[str, Any]) -> int | None:
    value = info.get("entries-added")  # Redis 7+
    return int(value) if value is not None else None


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
