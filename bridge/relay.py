"""The relay: which IM messages need an answer, recorded durably before the platform's ack.

Intake (:meth:`Relay.accept`) records a message durably and dedupes it before the platform gets
its acknowledgement; each accepted entry is then answered by :class:`bridge.jobs.im.ImAnswers` (a
job on the shared job runner) and marked complete only when the chat has its answer. After a
crash, :meth:`Relay.start` re-runs every entry still pending; with a cluster queue, the node with
free capacity takes each entry and a dead node's entries are claimed by the others. A re-run
never posts a second answer (see :mod:`bridge.jobs.im`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence

import structlog

from adapters.base import Adapter, InboundMessage, MessageFormatError
from adapters.retry import Backoff
from bridge import dedupe
from bridge.cluster import JobQueue, QueueEntry
from bridge.dedupe import DEDUPE_TTL_S
from bridge.jobs.im import (
    BAD_IMAGE_REPLY,
    DEFAULT_PROMPT,
    FAILED_REPLY,
    REPLY_KEY_TTL_S,
    TEXT_ONLY_REPLY,
    ImAnswers,
    Publisher,
)
from bridge.jobs.runner import JobRunner
from bridge.store import InboxEntry, Store, StoreUnavailable
from engine.types import EngineLike

log = structlog.get_logger(__name__)


__all__ = [
    "BAD_IMAGE_REPLY",
    "DEDUPE_TTL_S",
    "DEFAULT_PROMPT",
    "FAILED_REPLY",
    "REPLY_KEY_TTL_S",
    "TEXT_ONLY_REPLY",
    "Publisher",
    "Relay",
]


class Relay:
    """Records IM messages, schedules their answers, and re-runs the ones a crash left pending.

    Args:
        runner: the bridge's job runner (a new one on ``engine`` when not given).
    """

    def __init__(
        self,
        store: Store,
        engine: EngineLike,
        hub: Publisher,
        adapters: Sequence[Adapter],
        *,
        clock: Callable[[], float] = time.time,
        max_concurrency: int = 64,
        lease_s: float = 60.0,
        sweep_s: float = 15.0,
        queue: JobQueue | None = None,
        runner: JobRunner | None = None,
    ) -> None:
        self._store = store
        self.runner = runner or JobRunner(engine)
        self._answers = ImAnswers(store, self.runner, hub)
        self._adapters = {a.platform: a for a in adapters}
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max_concurrency)
        self._stopping = False
        self._recover_task: asyncio.Task[None] | None = None
        # With a queue (Redis Streams consumer group, several nodes), the node with free capacity
        # takes the job and a dead node's unacked jobs are claimed by the others. A periodic
        # sweep re-queues strays (accepted, never queued) under a run lease, so one node does it.
        self._queue = queue
        self._lease_s = lease_s
        self._sweep_s = sweep_s
        self._max_concurrency = max_concurrency
        self._consume_task: asyncio.Task[None] | None = None
        self._acks: set[asyncio.Future[None]] = set()
        self._stale_s = max(300.0, 5 * lease_s)

    @staticmethod
    def entry_id(msg: InboundMessage) -> str:
        """The inbox id of a message: stable across re-deliveries."""
        return dedupe.entry_id(msg)

    async def accept(self, msg: InboundMessage) -> bool:
        """The adapters' sink: record durably, dedupe, schedule; True if new, False if duplicate
        (the rule is in :mod:`bridge.dedupe`).

        Raises:
            StoreUnavailable: nothing could be recorded; the platform must re-deliver.
        """
        # Shielded: if the caller gives up waiting (the webhook's deadline), the intake still
        # completes, so a recorded and claimed message is always scheduled too.
        return await asyncio.shield(self._accept(msg))

    async def _accept(self, msg: InboundMessage) -> bool:
        entry = await dedupe.record_once(self._store, msg, self._clock())
        if entry is None:
            log.info("im_duplicate", entry=dedupe.entry_id(msg), event_id=msg.event_id)
            return False
        log.info("im_accepted", entry=entry.entry_id, chat=msg.chat_id, images=len(msg.images))
        if self._queue is not None:
            try:
                await self._queue.put(entry.entry_id, entry.payload)
            except StoreUnavailable:
                await dedupe.forget(self._store, msg)  # not queued: a re-delivery is new
                raise
            return True
        self._schedule(entry)
        return True

    async def start(self) -> None:
        """Re-run inbox entries left pending by a previous process; consume the job queue."""
        self._recover_task = asyncio.create_task(self._recover(), name="relay-recover")
        if self._queue is not None:
            await self._queue.start()
            self._consume_task = asyncio.create_task(self._consume(), name="relay-consume")

    async def _consume(self) -> None:
        assert self._queue is not None
        queue = self._queue
        async for item in queue.consume(self._max_concurrency):
            if self._stopping:
                return
            entry = InboxEntry(item.job_id, item.payload, self._clock(), item.deliveries - 1)
            if item.deliveries > 1:
                log.info("relay_reclaimed", entry=item.job_id, deliveries=item.deliveries)
            task = self._schedule(entry)
            if task is None:
                await queue.ack(item)
            else:
                task.add_done_callback(functools.partial(self._ack_when_done, item))

    def _ack_when_done(self, item: QueueEntry, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._queue is None:
            return  # stopping: leave it unacked so this node (or another) runs it again
        ack = asyncio.ensure_future(self._queue.ack(item))
        self._acks.add(ack)
        ack.add_done_callback(self._acks.discard)

    async def _recover(self) -> None:
        """Run pending entries now, then (with a shared store) sweep for expired leases."""
        backoff = _store_backoff()
        while not self._stopping:
            try:
                await self._sweep()
            except StoreUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("relay_recover_store_unavailable", error=str(exc), retry_s=delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if self._queue is None:
                return  # one node: its own pending entries, once, at start
            await asyncio.sleep(self._sweep_s)

    async def _sweep(self) -> None:
        now = self._clock()
        for entry in await self._store.inbox_pending(limit=1000):
            if entry.entry_id in self._tasks:
                continue
            if self._queue is None:
                log.info("relay_recovered", entry=entry.entry_id)
                self._schedule(entry)
                continue
            if now - entry.accepted_at < self._stale_s:
                continue  # the queue is delivering it; only strays (lost before put) are swept
            if not await self._store.claim(_lease_key(entry.entry_id), self._lease_s):
                continue  # another node is re-queueing it
            log.info("relay_recovered", entry=entry.entry_id)
            await self._queue.put(entry.entry_id, entry.payload)

    def _schedule(self, entry: InboxEntry) -> asyncio.Task[None] | None:
        if entry.entry_id in self._tasks or self._stopping:
            return None
        task = asyncio.create_task(self._run(entry), name=f"relay:{entry.entry_id}")
        self._tasks[entry.entry_id] = task
        task.add_done_callback(functools.partial(self._forget, entry.entry_id))
        return task

    def _forget(self, entry_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(entry_id, None)

    async def _run(self, entry: InboxEntry) -> None:
        async with self._slots:
            try:
                msg = InboundMessage.from_json(entry.payload)
            except MessageFormatError as exc:
                log.error("relay_bad_entry", entry=entry.entry_id, error=str(exc))
                await self._complete(entry.entry_id)
                return
            adapter = self._adapters.get(msg.platform)
            if adapter is None:
                log.error("relay_no_adapter", entry=entry.entry_id, platform=msg.platform)
                return
            if await self._answers.answer(adapter, msg, entry.entry_id):
                await self._complete(entry.entry_id)

    async def _complete(self, entry_id: str) -> None:
        backoff = _store_backoff()
        while True:
            try:
                await self._store.inbox_complete(entry_id)
                return
            except StoreUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("relay_complete_store_unavailable", entry=entry_id, error=str(exc))
                await asyncio.sleep(delay)

    async def stop(self, grace_s: float) -> None:
        """Let running answers finish within ``grace_s``; the rest stay pending for next time."""
        self._stopping = True
        if self._recover_task is not None:
            self._recover_task.cancel()
        if self._consume_task is not None:
            self._consume_task.cancel()
        tasks = list(self._tasks.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        for background in (self._recover_task, self._consume_task):
            if background is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        if self._acks:
            await asyncio.wait(self._acks, timeout=2.0)
        if self._queue is not None:
            with contextlib.suppress(Exception):
                await self._queue.close()


def _lease_key(entry_id: str) -> str:
    return f"run:{entry_id}"


def _store_backoff() -> Backoff:
    """Delays between tries of a store call the relay cannot do without (jittered, capped)."""
    return Backoff(initial=0.5, cap=30.0)
