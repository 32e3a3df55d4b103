"""``redis://HOST:PORT/DB``: the store shared by several bridge nodes, on ``redis.asyncio``.

Keys live under a prefix (``bridge:`` unless the URL says ``?prefix=...``). Dedupe claims are one
``SET NX PX``; multi-key updates (inbox, sessions, counters) are Lua scripts, so they are atomic
across nodes. Sessions are a header hash plus a sorted set of frames scored by seq. Targets a
standalone Redis (or one behind Sentinel), not Redis Cluster: an inbox update spans several slots.

When Redis is down every call raises :class:`StoreUnavailable` quickly: a circuit breaker fails
calls at once for a short, growing backoff, then lets one through, and redis-py reconnects its pool
on that call. The caller never has to re-create the store.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog

from bridge.store import redis_scripts
from bridge.store.backoff import Backoff, CircuitBreaker
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
from bridge.store.redis_client import is_unavailable, make_client, split_redis_url

log = structlog.get_logger(__name__)

T = TypeVar("T")


def _ms(ttl_s: float) -> int:
    """Seconds to whole milliseconds for PX/PEXPIRE, never 0 (which Redis rejects)."""
    return max(1, math.ceil(ttl_s * 1000))


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class RedisStore:
    """A :class:`~bridge.store.base.Store` on Redis.

    Args:
        url: ``redis://[:password@]host:port/db[?prefix=bridge:]`` (also ``rediss://``, ``unix://``).
        connect_timeout_s: how long one connection attempt may take.
        op_timeout_s: how long one command may take before the call fails as unavailable.
        clock: wall-clock seconds, used for ``updated_at`` and inbox tombstone times.
        breaker: fail-fast policy while Redis is down (injected by tests).
    """

    def __init__(
        self,
        url: str,
        connect_timeout_s: float = 1.0,
        op_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.url = url
        self._client_url, self.prefix = split_redis_url(url)
        self._connect_timeout_s = connect_timeout_s
        self._op_timeout_s = op_timeout_s
        self._clock = clock
        self.breaker = breaker or CircuitBreaker(Backoff(initial=0.05, cap=1.0))
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the client and register scripts; Redis being down now is logged, not raised."""
        if self._client is not None:
            return
        client = make_client(self._client_url, self._connect_timeout_s, self._op_timeout_s)
        self._scripts = {
            name: client.register_script(getattr(redis_scripts, name))
            for name in (
                "INBOX_ADD",
                "INBOX_ATTEMPT",
                "INCR",
                "SAVE_SESSION",
                "APPEND_EVENTS",
                "TRIM_EVENTS",
            )
        }
        self._client = client
        try:
            await self.ping()
        except StoreUnavailable as exc:
            log.warning("redis_store_unreachable_at_open", error=str(exc))
        else:
            log.info("redis_store_opened", prefix=self.prefix)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _run(self, what: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one Redis interaction, mapping "Redis is down" to :class:`StoreUnavailable`."""
        client = self._client
        if client is None:
            raise StoreUnavailable("redis store is not open")
        if self.breaker.is_open():
            raise StoreUnavailable(
                f"redis unreachable ({self.breaker.last_error}); "
                f"retry in {self.breaker.retry_in():.2f}s"
            )
        try:
            result = await fn(client)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            first = self.breaker.last_error is None
            self.breaker.failure(f"{type(exc).__name__}: {exc}")
            if first:
                log.warning("redis_store_unavailable", op=what, error=str(exc))
            raise StoreUnavailable(f"redis {what} failed: {exc}") from exc
        if self.breaker.last_error is not None:
            log.info("redis_store_recovered", op=what)
        self.breaker.success()
        return result

    async def execute(self, what: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``fn`` on the store's client behind its circuit breaker (for components that share
        this connection pool, like the cluster-wide answer cache).

        Raises:
            StoreUnavailable: Redis is down, or the store is not open.
        """
        return await self._run(what, fn)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        return await self._run(name.lower(), lambda c: script(keys=keys, args=args, client=c))

    async def ping(self) -> None:
        await self._run("ping", lambda c: c.ping())  # type: ignore[no-any-return]

    # --- dedupe and idempotency --------------------------------------------------------------
    async def claim(self, key: str, ttl_s: float) -> bool:
        check_key(key)
        ms = _ms(check_ttl(ttl_s))
        done = await self._run(
            "claim", lambda c: c.set(self._k("claim", key), b"1", nx=True, px=ms)
        )
        return bool(done)

    async def release(self, key: str) -> None:
        check_key(key)
        await self._run("release", lambda c: c.delete(self._k("claim", key)))

    async def get_value(self, key: str) -> str | None:
        check_key(key)
        raw = await self._run("get_value", lambda c: c.get(self._k("val", key)))
        return None if raw is None else _text(raw)

    async def set_value(self, key: str, value: str, ttl_s: float | None = None) -> None:
        check_key(key)
        check_value(value)
        px = None if ttl_s is None else _ms(check_ttl(ttl_s))
        await self._run("set_value", lambda c: c.set(self._k("val", key), value.encode(), px=px))

    async def incr(self, key: str, ttl_s: float) -> int:
        check_key(key)
        ms = _ms(check_ttl(ttl_s))
        return int(await self._script("INCR", [self._k("ctr", key)], [ms]))

    # --- the IM inbox ------------------------------------------------------------------------
    def _inbox_keys(self, entry_id: str) -> list[str]:
        return [
            self._k("inbox", "pending"),
            self._k("inbox", "e", entry_id),
            self._k("inbox", "done", entry_id),
        ]

    async def inbox_add(self, entry: InboxEntry) -> None:
        check_entry(entry)
        args = [entry.entry_id, entry.payload, repr(entry.accepted_at), entry.attempts]
        await self._script("INBOX_ADD", self._inbox_keys(entry.entry_id), args)

    async def accept_entry(self, entry: InboxEntry, keys: Sequence[str], ttl_s: float) -> bool:
        for key in keys:
            check_key(key)
        ms = _ms(check_ttl(ttl_s))
        await self.inbox_add(entry)  # first, so a claim never stands without its entry

        async def claims(c: aioredis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for key in keys:
                pipe.set(self._k("claim", key), b"1", nx=True, px=ms)
            return list(await pipe.execute())

        return all(bool(r) for r in await self._run("accept_entry", claims))

    async def inbox_attempt(self, entry_id: str) -> int:
        check_key(entry_id, "entry_id")
        return int(await self._script("INBOX_ATTEMPT", [self._k("inbox", "e", entry_id)], []))

    async def inbox_pending(self, limit: int = 100) -> list[InboxEntry]:
        check_limit(limit)
        pending_key = self._k("inbox", "pending")

        async def op(c: aioredis.Redis) -> list[InboxEntry]:
            found: list[bytes] = await c.zrange(pending_key, 0, limit - 1)  # type: ignore[assignment]
            ids = [bytes(i) for i in found]
            if not ids:
                return []
            pipe = c.pipeline(transaction=False)
            for raw in ids:
                pipe.hgetall(self._k("inbox", "e", raw.decode()))
            rows = await pipe.execute()
            out = []
            for raw, row in zip(ids, rows, strict=True):
                if not row:  # completed between the two reads
                    continue
                out.append(
                    InboxEntry(
                        entry_id=raw.decode(),
                        payload=bytes(row[b"payload"]),
                        accepted_at=float(row[b"accepted_at"]),
                        attempts=int(row[b"attempts"]),
                    )
                )
            return out

        return await self._run("inbox_pending", op)

    async def inbox_complete(self, entry_id: str) -> None:
        check_key(entry_id, "entry_id")
        pending, entry, done = self._inbox_keys(entry_id)
        ms = _ms(INBOX_DONE_RETENTION_S)

        async def op(c: aioredis.Redis) -> None:
            async with c.pipeline(transaction=True) as pipe:
                pipe.set(done, repr(self._clock()).encode(), px=ms)
                pipe.zrem(pending, entry_id)
                pipe.delete(entry)
                await pipe.execute()

        await self._run("inbox_complete", op)

    # --- sessions and replay -----------------------------------------------------------------
    def _sess_keys(self, session_id: str) -> list[str]:
        return [self._k("sess", "h", session_id), self._k("sess", "e", session_id)]

    async def load_session(self, session_id: str) -> SessionRecord | None:
        check_key(session_id, "session_id")
        hkey, ekey = self._sess_keys(session_id)

        async def op(c: aioredis.Redis) -> list[Any]:
            async with c.pipeline(transaction=True) as pipe:
                pipe.hgetall(hkey)
                pipe.zrange(ekey, 0, -1)
                return await pipe.execute()  # type: ignore[no-any-return]

        header, members = await self._run("load_session", op)
        if not header:
            return None
        rec = SessionRecord(
            session_id=session_id,
            last_seq=int(header[b"last_seq"]),
            first_seq=int(header[b"first_seq"]),
            topics=[str(t) for t in json.loads(header[b"topics"])],
            updated_at=float(header[b"updated_at"]),
            # Absent in headers created by append_events or written before the field existed.
            open_jobs=[str(j) for j in json.loads(header.get(b"open_jobs", b"[]"))],
        )
        for raw in members:
            seq_s, ts_s, frame = _text(raw).split("|", 2)
            if int(seq_s) >= rec.first_seq:
                rec.events.append(StoredEvent(int(seq_s), float(ts_s), frame))
        return rec

    async def save_session(self, record: SessionRecord, ttl_s: float) -> None:
        check_key(record.session_id, "session_id")
        check_seq(record.last_seq, "last_seq")
        check_seq(record.first_seq, "first_seq")
        args = [
            record.last_seq,
            record.first_seq,
            json.dumps(list(record.topics)),
            repr(float(record.updated_at)),
            _ms(check_ttl(ttl_s)),
            json.dumps(list(record.open_jobs)),
        ]
        await self._script("SAVE_SESSION", self._sess_keys(record.session_id), args)

    async def append_events(
        self, session_id: str, events: Sequence[StoredEvent], ttl_s: float
    ) -> None:
        check_key(session_id, "session_id")
        check_events(events)
        args: list[Any] = [repr(self._clock()), _ms(check_ttl(ttl_s))]
        for ev in events:
            args += [ev.seq, f"{ev.seq}|{ev.ts!r}|{ev.frame}".encode()]
        await self._script("APPEND_EVENTS", self._sess_keys(session_id), args)

    async def trim_events(self, session_id: str, through_seq: int) -> None:
        check_key(session_id, "session_id")
        check_seq(through_seq, "through_seq")
        await self._script("TRIM_EVENTS", self._sess_keys(session_id), [through_seq])

    async def delete_session(self, session_id: str) -> None:
        check_key(session_id, "session_id")
        await self._run("delete_session", lambda c: c.delete(*self._sess_keys(session_id)))
