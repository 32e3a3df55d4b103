"""Jobs handed to nodes with free engine capacity: the :class:`JobQueue` protocol and a local one.

A consumer pulls no more than ``max_in_flight`` entries it has not acked, so work flows to whichever
node has room. Delivery is at least once: an entry is redelivered if its node dies before
:meth:`JobQueue.ack`, so job handlers must be idempotent (the Feishu reply ``uuid``, the inbox).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from bridge.store.checks import check_key

#: Largest job payload (a job description with references, not image bytes).
MAX_JOB_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One delivery of a job.

    Attributes:
        entry_id: the queue's id of this entry (a Redis stream id), used by :meth:`JobQueue.ack`.
        job_id: the caller's job id given to :meth:`JobQueue.put`.
        payload: the caller's bytes.
        deliveries: 1 on first delivery, more when reclaimed from a dead or restarted node.
    """

    entry_id: str
    job_id: str
    payload: bytes
    deliveries: int = 1


class JobQueue(Protocol):
    """A work queue shared by the nodes; see the module docstring for the delivery guarantee."""

    async def start(self) -> None:
        """Connect (and create the consumer group); idempotent."""
        ...

    async def close(self) -> None:
        """Stop consuming; unacked entries stay pending for this consumer name or others."""
        ...

    async def put(self, job_id: str, payload: bytes) -> str:
        """Enqueue a job; return its entry id.

        Raises:
            StoreUnavailable: the backend is down; the job was not enqueued.
        """
        ...

    def consume(self, max_in_flight: int) -> AsyncIterator[QueueEntry]:
        """Yield entries while fewer than ``max_in_flight`` are unacked; ends when closed."""
        ...

    async def ack(self, entry: QueueEntry) -> None:
        """Mark an entry done: it is never delivered again. Never raises for a backend outage."""
        ...

    @property
    def in_flight(self) -> int:
        """Entries yielded by :meth:`consume` and not yet acked."""
        ...


def check_job(job_id: str, payload: bytes) -> None:
    """Refuse a bad job id or a non-bytes or oversized payload."""
    check_key(job_id, "job_id")
    if not isinstance(payload, bytes):
        raise TypeError("payload must be bytes")
    if len(payload) > MAX_JOB_BYTES:
        raise ValueError(f"payload larger than {MAX_JOB_BYTES} bytes")


def check_max_in_flight(max_in_flight: int) -> int:
    """Return ``max_in_flight`` if it is a positive int; raise ValueError otherwise."""
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a positive int, not {max_in_flight!r}")
    return max_in_flight


class LocalJobQueue:
    """The queue in one process: FIFO, no redelivery (the durable record is the store's inbox)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[QueueEntry | None] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._in_flight: set[str] = set()
        self._room = asyncio.Event()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
        self._queue.put_nowait(None)
        self._room.set()

    async def put(self, job_id: str, payload: bytes) -> str:
        check_job(job_id, payload)
        entry_id = str(next(self._ids))
        self._queue.put_nowait(QueueEntry(entry_id, job_id, payload))
        return entry_id

    async def consume(self, max_in_flight: int) -> AsyncIterator[QueueEntry]:
        check_max_in_flight(max_in_flight)
        while not self._closed:
            while len(self._in_flight) >= max_in_flight and not self._closed:
                self._room.clear()
                await self._room.wait()
            entry = await self._queue.get()
            if entry is None:
                self._queue.put_nowait(None)  # wake the next consumer too
                return
            self._in_flight.add(entry.entry_id)
            yield entry

    async def ack(self, entry: QueueEntry) -> None:
        self._in_flight.discard(entry.entry_id)
        self._room.set()
