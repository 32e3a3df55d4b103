"""The job queue across nodes on a Redis stream and consumer group.

``put`` is XADD. Each node reads with XREADGROUP under its own consumer name, asking for no more
entries than it has free capacity, and XACKs (then XDELs) an entry when its job is finished. A node
that dies leaves its entries pending; after ``claim_idle_s`` without news another node takes them
with XAUTOCLAIM. A live node keeps its own long jobs from being taken by re-claiming them (which
resets their idle time) every ``claim_idle_s / 3``. An entry delivered more than ``max_deliveries``
times is moved to a dead-letter stream instead of crashing node after node.

With Redis persistence off, entries not yet acked are lost if Redis itself restarts; see
docs/deploy.md for what AOF changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from bridge.cluster.eventlog import stop_task
from bridge.cluster.jobs import QueueEntry, check_job, check_max_in_flight
from bridge.store.backoff import Backoff
from bridge.store.base import StoreUnavailable
from bridge.store.checks import check_key
from bridge.store.redis_client import is_unavailable, make_client, split_redis_url

log = structlog.get_logger(__name__)

T = TypeVar("T")


class RedisJobQueue:
    """A :class:`~bridge.cluster.jobs.JobQueue` on a Redis stream ``{prefix}jobs``.

    Args:
        url: ``redis://host:port/db[?prefix=bridge:]``.
        consumer: this node's name in the group; stable across restarts if possible (a restarted
            node with the same name takes its own pending entries back at once).
        group: the consumer group all nodes share.
        claim_idle_s: how long an entry may go without news before another node claims it; must
            exceed the longest pause of a live node (its keepalive runs every third of it).
        block_s: longest wait in one XREADGROUP (also bounds how long :meth:`close` takes).
        max_deliveries: deliveries after which an entry goes to the dead-letter stream.
    """

    def __init__(
        self,
        url: str,
        consumer: str,
        group: str = "bridge-jobs",
        claim_idle_s: float = 30.0,
        block_s: float = 1.0,
        max_deliveries: int = 5,
        backoff: Backoff | None = None,
    ) -> None:
        self._client_url, prefix = split_redis_url(url)
        self.stream = f"{prefix}jobs"
        self.dead_stream = f"{prefix}jobs:dead"
        self.consumer = check_key(consumer, "consumer")
        self.group = check_key(group, "group")
        if claim_idle_s <= 0 or block_s <= 0 or max_deliveries < 1:
            raise ValueError("claim_idle_s and block_s must be > 0, max_deliveries >= 1")
        self._claim_idle_ms = max(1, int(claim_idle_s * 1000))
        self._block_ms = max(1, int(block_s * 1000))
        self._max_deliveries = max_deliveries
        self._backoff = backoff or Backoff(initial=0.05, cap=2.0)
        self._client: aioredis.Redis | None = None
        self._in_flight: dict[str, QueueEntry] = {}
        self._unacked: set[str] = set()  # finished, but XACK failed: retried by the keepalive
        self._room = asyncio.Event()
        self._closed = False
        self._keepalive: asyncio.Task[None] | None = None
        self._last_claim = float("-inf")

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = make_client(self._client_url, op_timeout_s=self._block_ms / 1000 + 5)
        try:
            await self._ensure_group()
        except StoreUnavailable as exc:
            log.warning("job_queue_unreachable_at_start", error=str(exc))
        self._keepalive = asyncio.create_task(self._keep_alive(), name="job-queue-keepalive")

    async def close(self) -> None:
        self._closed = True
        self._room.set()
        task, self._keepalive = self._keepalive, None
        if task is not None:
            await stop_task(task, 3.0)  # bounded: redis-py may swallow the cancellation
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _redis(self, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        client = self._client
        if client is None:
            raise StoreUnavailable("job queue is not started")
        try:
            return await fn(client)
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(f"redis: {exc}") from exc
            raise

    async def _ensure_group(self) -> None:
        async def create(c: aioredis.Redis) -> None:
            try:
                await c.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self._redis(create)

    async def put(self, job_id: str, payload: bytes) -> str:
        check_job(job_id, payload)
        fields: dict[Any, Any] = {b"job_id": job_id.encode(), b"payload": payload}
        entry_id = await self._redis(lambda c: c.xadd(self.stream, fields))
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def consume(self, max_in_flight: int) -> AsyncIterator[QueueEntry]:
        check_max_in_flight(max_in_flight)
        backlog_from: str | None = "0"  # first take back what this name held before a restart
        while not self._closed:
            while len(self._in_flight) >= max_in_flight and not self._closed:
                self._room.clear()
                await self._room.wait()
            if self._closed:
                return
            room = max_in_flight - len(self._in_flight)
            try:
                if backlog_from is not None:
                    entries, backlog_from = await self._read_backlog(backlog_from, room)
                else:
                    entries = await self._claim_stale(room)
                    if not entries:
                        entries = await self._read(room)
            except StoreUnavailable as exc:
                log.warning("job_queue_read_failed", consumer=self.consumer, error=str(exc))
                await asyncio.sleep(self._backoff.next_delay())
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("job_queue_group_missing", consumer=self.consumer)
                await self._recreate_group()
                continue
            self._backoff.reset()
            for entry in entries:
                if entry.entry_id in self._in_flight:
                    continue
                self._in_flight[entry.entry_id] = entry
                yield entry

    async def _recreate_group(self) -> None:
        try:
            await self._ensure_group()
        except StoreUnavailable:
            await asyncio.sleep(self._backoff.next_delay())

    async def _read_backlog(self, after: str, count: int) -> tuple[list[QueueEntry], str | None]:
        """This consumer's own pending entries after ``after``; the next cursor, None when done."""
        messages = await self._xreadgroup(after, count, block=False)
        entries = [e for e in (self._decode(i, f, 2) for i, f in messages) if e is not None]
        return entries, (_text(messages[-1][0]) if messages else None)

    async def _read(self, count: int) -> list[QueueEntry]:
        """New entries for this consumer, waiting up to ``block_s`` for one."""
        messages = await self._xreadgroup(">", count, block=True)
        return [e for e in (self._decode(i, f, 1) for i, f in messages) if e is not None]

    async def _xreadgroup(self, start: str, count: int, block: bool) -> list[tuple[Any, Any]]:
        reply: Any = await self._redis(
            lambda c: c.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: start},
                count=count,
                block=self._block_ms if block else None,
            )
        )
        out: list[tuple[Any, Any]] = []
        for _stream, messages in reply or []:
            out.extend((raw_id, fields) for raw_id, fields in messages)
        return out

    async def _claim_stale(self, count: int) -> list[QueueEntry]:
        """XAUTOCLAIM entries idle past the timeout (a dead node's), at most every few seconds."""
        now = time.monotonic()
        if now - self._last_claim < min(self._claim_idle_ms / 3000, 5.0):
            return []
        self._last_claim = now
        reply = await self._redis(
            lambda c: c.xautoclaim(
                self.stream, self.group, self.consumer, self._claim_idle_ms, "0-0", count=count
            )
        )
        messages = reply[1] if reply else []
        if not messages:
            return []
        counts = await self._delivery_counts([m[0] for m in messages])
        out: list[QueueEntry] = []
        for raw_id, fields in messages:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            deliveries = counts.get(entry_id, 2)
            if deliveries > self._max_deliveries:
                await self._dead_letter(entry_id, fields, deliveries)
                continue
            entry = self._decode(raw_id, fields, deliveries)
            if entry is not None:
                log.info("job_reclaimed", job_id=entry.job_id, deliveries=deliveries)
                out.append(entry)
        return out

    async def _delivery_counts(self, ids: list[Any]) -> dict[str, int]:
        texts = sorted((i.decode() if isinstance(i, bytes) else str(i) for i in ids), key=_id_key)
        rows = await self._redis(
            lambda c: c.xpending_range(
                self.stream, self.group, min=texts[0], max=texts[-1], count=10 * len(texts) + 100
            )
        )
        counts: dict[str, int] = {}
        for row in rows:
            mid = row["message_id"]
            counts[mid.decode() if isinstance(mid, bytes) else str(mid)] = int(
                row["times_delivered"]
            )
        return counts

    async def _dead_letter(self, entry_id: str, fields: Any, deliveries: int) -> None:
        job_id = _field(fields, b"job_id")
        log.error("job_dead_lettered", job_id=job_id, entry_id=entry_id, deliveries=deliveries)

        async def move(c: aioredis.Redis) -> None:
            async with c.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_stream, dict(fields or {}) or {b"job_id": b"?"})
                pipe.xack(self.stream, self.group, entry_id)
                pipe.xdel(self.stream, entry_id)
                await pipe.execute()

        await self._redis(move)

    def _decode(self, raw_id: Any, fields: Any, deliveries: int) -> QueueEntry | None:
        entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        job_id = _field(fields, b"job_id")
        payload = (fields or {}).get(b"payload")
        if job_id is None or not isinstance(payload, bytes):
            # A deleted or foreign entry: drop it so it is not claimed forever.
            log.warning("job_entry_malformed", entry_id=entry_id)
            self._unacked.add(entry_id)
            return None
        return QueueEntry(entry_id, job_id, payload, deliveries)

    async def ack(self, entry: QueueEntry) -> None:
        check_key(entry.entry_id, "entry_id")
        self._in_flight.pop(entry.entry_id, None)
        self._room.set()
        try:
            await self._ack_ids([entry.entry_id])
        except StoreUnavailable as exc:
            log.warning("job_ack_deferred", job_id=entry.job_id, error=str(exc))
            self._unacked.add(entry.entry_id)

    async def _ack_ids(self, ids: list[str]) -> None:
        async def op(c: aioredis.Redis) -> None:
            async with c.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, self.group, *ids)
                pipe.xdel(self.stream, *ids)
                await pipe.execute()

        await self._redis(op)

    def _reclaimer(self, ids: list[str]) -> Callable[[aioredis.Redis], Awaitable[Any]]:
        def run(c: aioredis.Redis) -> Awaitable[Any]:
            return c.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)  # type: ignore[arg-type]

        return run

    async def _keep_alive(self) -> None:
        """Reset the idle time of entries this node still works on, and retry deferred acks."""
        interval = self._claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                if self._unacked:
                    ids = list(self._unacked)
                    await self._ack_ids(ids)
                    self._unacked.difference_update(ids)
                ids = list(self._in_flight)
                if ids:
                    await self._redis(self._reclaimer(ids))
            except StoreUnavailable as exc:
                log.warning("job_keepalive_failed", consumer=self.consumer, error=str(exc))
            except ResponseError as exc:
                log.warning("job_keepalive_rejected", consumer=self.consumer, error=str(exc))


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _field(fields: Any, name: bytes) -> str | None:
    value = (fields or {}).get(name)
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None
