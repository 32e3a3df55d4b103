"""An ordered, bounded in-memory outbox in front of an :class:`~bridge.cluster.eventlog.EventLog`.

Why: appending straight from the caller would make it wait on Redis, and lose the entry when Redis
is down. :meth:`Outbox.put` never waits and never raises; one background task appends what is
queued, in order and in batches (one round trip for many entries), and while the log is down keeps
it and retries with backoff. Since every entry goes through the queue, a new one always lands behind
the ones still waiting, which keeps each job's events in order across an outage.

When the queue is full the **oldest** entry is dropped, not the newest: the newest events of a job
include its terminal ``done``/``error``, which carries the whole answer, so a subscriber elsewhere
still ends with the full text; the oldest are the stalest (their jobs are mostly finished) and only
their deltas would be lost. Drops are counted and logged (``fanout_outbox_overflow``) at most once a
second.

An append that failed after Redis had taken part of a batch is retried whole, so an entry may reach
the log twice: readers drop repeats by the sequence numbers the payloads carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable

import structlog

from bridge.cluster.eventlog import EventLog, check_entry, stop_task
from bridge.store.backoff import Backoff
from bridge.store.base import StoreUnavailable

log = structlog.get_logger(__name__)

#: Payloads held while the log is down (events are ~100-300 bytes: about 30 MiB at most).
DEFAULT_MAX_ITEMS = 100_000


class Outbox:
    """Appends payloads to ``events`` in order from a task, holding them while the log is down.

    Args:
        events: where the payloads go.
        node_id: this node, for the log lines.
        max_items: payloads held at most; beyond it the oldest is dropped.
        batch: most payloads per append (one round trip).
        backoff: delays between failed appends (injected by tests).
        clock: monotonic seconds, for rate-limiting the overflow log line.
    """

    def __init__(
        self,
        events: EventLog,
        node_id: str,
        max_items: int = DEFAULT_MAX_ITEMS,
        batch: int = 256,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_items < 1 or batch < 1:
            raise ValueError("max_items and batch must be >= 1")
        self._events = events
        self.node_id = node_id
        self._logger = log.bind(node=node_id)
        self.max_items = max_items
        self._batch = batch
        self._backoff = backoff or Backoff(initial=0.05, cap=2.0)
        self._clock = clock
        self._items: deque[tuple[int, bytes]] = deque()
        self._numbers = itertools.count(1)
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failing = False
        self._unlogged_drops = 0
        self._last_drop_log = float("-inf")
        self.appended = 0
        self.dropped = 0

    @property
    def depth(self) -> int:
        """Payloads waiting to be appended."""
        return len(self._items)

    def put(self, payload: bytes) -> None:
        """Queue ``payload`` behind the ones waiting; drop the oldest if full. Never raises for a
        full or unreachable log.

        Raises:
            TypeError, ValueError: not bytes, or larger than the log accepts.
        """
        check_entry(payload)
        if len(self._items) >= self.max_items:
            self._items.popleft()
            self.dropped += 1
            self._unlogged_drops += 1
            self._log_drops(force=False)
        self._items.append((next(self._numbers), payload))
        self._drained.clear()
        self._wake.set()

    def start(self) -> None:
        """Start the task that appends."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._flush_forever(), name="eventlog-outbox")

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Give the queue up to ``flush_timeout_s`` to reach the log, then stop the task."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), flush_timeout_s)
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task, 5.0)
        self._log_drops(force=True)
        if self._items:
            self._logger.error("fanout_outbox_abandoned", count=len(self._items))

    async def _flush_forever(self) -> None:
        while not self._stopping:
            if not self._items:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(itertools.islice(self._items, self._batch))
            try:
                await self._events.append_many([payload for _, payload in batch])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(self._backoff.next_delay())
                continue
            # Drops while the append was in flight may have taken some of the batch off the
            # front already: remove by number, not by count.
            last = batch[-1][0]
            while self._items and self._items[0][0] <= last:
                self._items.popleft()
            self.appended += len(batch)
            self._backoff.reset()
            if self._failing:
                self._failing = False
                self._logger.info("fanout_append_resumed", pending=len(self._items))
                self._log_drops(force=True)

    def _failed(self, exc: Exception) -> None:
        if not isinstance(exc, StoreUnavailable):
            self._logger.error("fanout_append_error", error=repr(exc))
        elif not self._failing:
            self._logger.warning("fanout_append_failed", pending=len(self._items), error=str(exc))
        self._failing = True

    def _log_drops(self, force: bool) -> None:
        now = self._clock()
        if self._unlogged_drops and (force or now - self._last_drop_log >= 1.0):
            self._logger.error(
                "fanout_outbox_overflow",
                dropped=self._unlogged_drops,
                dropped_total=self.dropped,
                max_items=self.max_items,
            )
            self._unlogged_drops = 0
            self._last_drop_log = now
