"""The relay: IM messages in, engine jobs through, answers out to the chat and to hub subscribers.

Intake (:meth:`Relay.accept`) records a message durably and dedupes it before the platform gets
its acknowledgement; processing runs afterwards and marks the inbox entry complete only when the
chat has its answer. After a crash, :meth:`Relay.start` re-runs every entry still pending. A re-run
never posts a second answer: the id of a posted reply card is kept in the store (``reply:<entry>``)
and the re-run edits that card, and a sent text reply leaves a marker (``texted:<entry>``); the
platform's reply idempotency key (derived from the message id) covers the moment in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from adapters.base import (
    Adapter,
    AdapterError,
    ImageFetchError,
    InboundMessage,
    MessageFormatError,
    ReplyStream,
)
from bridge.cluster import JobQueue, QueueEntry
from bridge.store import InboxEntry, Store, StoreUnavailable
from engine.types import Delta, Done, EngineError, EngineLike, Failed, JobEvent, JobRequest

log = structlog.get_logger(__name__)

DEDUPE_TTL_S = 24 * 3600.0  # Feishu re-pushes up to 6 h later; keep keys well past that.
DEFAULT_PROMPT = "Describe this image."
TEXT_ONLY_REPLY = (
    "Send me a photo (optionally with a question in the same post) and I will describe it."
)
BAD_IMAGE_REPLY = "Sorry, I could not read that image. Please send a JPEG, PNG, WebP or GIF photo."
FAILED_REPLY = "Sorry, something went wrong while looking at your image. Please try again."
BUSY_RETRY_S = 2.0
# How long the store keeps a posted card's id (``reply:<entry>``) and the text-sent marker
# (``texted:<entry>``): 8 days, past INBOX_DONE_RETENTION_S (7 days), the longest the bridge
# remembers any message (redeliveries stop at 6 h, dedupe keys at 24 h). A pending entry recovered
# up to 8 days after its reply was posted still edits that reply; nothing deletes these keys, so
# they must expire on their own.
REPLY_KEY_TTL_S = DEDUPE_TTL_S * 8
MAX_ATTEMPTS = 8


class Publisher(Protocol):
    """Where the relay streams job events for WebSocket subscribers (the hub)."""

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None: ...


class Relay:
    """Turns accepted IM messages into engine jobs and streams the answers back."""

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
    ) -> None:
        self._store = store
        self._engine = engine
        self._hub = hub
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
        return f"{msg.platform}:{msg.message_id}"

    async def accept(self, msg: InboundMessage) -> bool:
        """The adapters' sink: record durably, dedupe, schedule; True if new, False if duplicate.

        The inbox entry is written before the dedupe keys are claimed, so a crash between the two
        steps leaves a pending entry that recovery runs, never a claimed key with nothing behind it.

        Raises:
            StoreUnavailable: nothing could be recorded; the platform must re-deliver.
        """
        # Shielded: if the caller gives up waiting (the webhook's deadline), the intake still
        # completes, so a recorded and claimed message is always scheduled too.
        return await asyncio.shield(self._accept(msg))

    async def _accept(self, msg: InboundMessage) -> bool:
        entry_id = self.entry_id(msg)
        entry = InboxEntry(entry_id, msg.to_json().encode(), self._clock())
        if not await self._store.accept_entry(entry, msg.dedupe_keys, DEDUPE_TTL_S):
            log.info("im_duplicate", entry=entry_id, event_id=msg.event_id)
            return False
        log.info("im_accepted", entry=entry_id, chat=msg.chat_id, images=len(msg.images))
        if self._queue is not None:
            try:
                await self._queue.put(entry_id, entry.payload)
            except StoreUnavailable:
                # Not queued: forget the claims so the platform's re-delivery is taken as new.
                for key in msg.dedupe_keys:
                    with contextlib.suppress(StoreUnavailable):
                        await self._store.release(key)
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
        delay = 0.5
        while not self._stopping:
            try:
                await self._sweep()
            except StoreUnavailable as exc:
                log.warning("relay_recover_store_unavailable", error=str(exc), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 0.5
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
            delay = 1.0
            image = _ImageOnce(adapter, msg)  # downloaded once for all attempts of this run
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    await self._answer(adapter, msg, entry.entry_id, image)
                    await self._complete(entry.entry_id)
                    return
                except (AdapterError, StoreUnavailable, OSError) as exc:
                    log.warning(
                        "relay_attempt_failed",
                        entry=entry.entry_id,
                        attempt=attempt,
                        error=str(exc),
                        retry_s=delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 60.0)
            log.error("relay_gave_up", entry=entry.entry_id, attempts=MAX_ATTEMPTS)

    async def _complete(self, entry_id: str) -> None:
        delay = 0.5
        while True:
            try:
                await self._store.inbox_complete(entry_id)
                return
            except StoreUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _answer(
        self, adapter: Adapter, msg: InboundMessage, job_id: str, image_once: _ImageOnce
    ) -> None:
        """Answer ``msg`` in its chat and on the hub, posting at most one reply across re-runs.

        ``job_id`` is the inbox entry id (``<platform>:<message id>``); it is also the engine job
        id, the hub's event id and the key of what the store remembers about posted replies.
        ``image_once`` holds the image downloaded by an earlier attempt of this run.
        """
        if not msg.images:
            await self._send_text_once(adapter, msg, job_id, TEXT_ONLY_REPLY)
            log.info("relay_text_only", job=job_id)
            return
        try:
            image = await image_once.get()
        except ImageFetchError as exc:
            log.warning("relay_image_fetch_failed", job=job_id, error=str(exc))
            opened = await self._store.get_value(_reply_key(job_id))
            if opened is not None:  # an earlier run posted the card: the apology goes there
                resumed = await adapter.open_reply(msg, existing_reply_id=opened)
                await resumed.fail(BAD_IMAGE_REPLY)
            else:
                await self._send_text_once(adapter, msg, job_id, BAD_IMAGE_REPLY)
            await self._hub.publish(msg.topic, job_id, Failed("bad_image", str(exc)))
            return
        prompt = msg.text.strip() or DEFAULT_PROMPT
        handle = await self._submit(JobRequest(job_id=job_id, image=image, prompt=prompt))
        try:
            reply = await self._open_reply_once(adapter, msg, job_id)
            so_far = ""
            async for event in handle.events():
                await self._publish(msg.topic, job_id, event)
                if isinstance(event, Delta):
                    so_far += event.text
                    await reply.update(so_far)
                elif isinstance(event, Done):
                    await reply.finish(event.text)
                    log.info("relay_answered", job=job_id, tokens=event.usage.completion_tokens)
                elif isinstance(event, Failed):
                    await reply.fail(BAD_IMAGE_REPLY if event.code == "bad_image" else FAILED_REPLY)
                    log.info("relay_failed", job=job_id, code=event.code)
        except BaseException:
            handle.cancel()  # an abandoned attempt must not keep generating; a retry resubmits
            raise

    async def _open_reply_once(
        self, adapter: Adapter, msg: InboundMessage, job_id: str
    ) -> ReplyStream:
        """Post the answer card and record its id, or resume the card an earlier run posted.

        The platform's reply idempotency key alone is not enough: Feishu forgets a ``uuid`` after
        an hour, so a job recovered after a longer outage would post a second card.

        Raises:
            StoreUnavailable: the id could not be read or recorded; ``_run`` retries the attempt.
        """
        key = _reply_key(job_id)
        existing = await self._store.get_value(key)
        if existing is not None:
            log.info("relay_reply_resumed", job=job_id, reply_id=existing)
            return await adapter.open_reply(msg, existing_reply_id=existing)
        reply = await adapter.open_reply(msg)
        # If this write fails, StoreUnavailable goes to _run's attempt loop and the retry posts
        # again with the same uuid, which Feishu answers with this same card (within its hour), so
        # the answer is not lost. What remains: a crash after Feishu's 200 and before this write,
        # recovered more than an hour later, posts a second card.
        await self._store.set_value(key, reply.reply_message_id, ttl_s=REPLY_KEY_TTL_S)
        log.info("relay_reply_recorded", job=job_id, reply_id=reply.reply_message_id)
        return reply

    async def _send_text_once(
        self, adapter: Adapter, msg: InboundMessage, job_id: str, text: str
    ) -> None:
        """Send a short text reply unless an earlier run of this entry already sent one.

        Raises:
            StoreUnavailable: the marker could not be read or written; ``_run`` retries (a resend
                within Feishu's hour reuses the uuid; the same narrow window as for cards remains).
        """
        key = _texted_key(job_id)
        if await self._store.get_value(key) is not None:
            log.info("relay_text_already_sent", job=job_id)
            return
        await adapter.send_text_reply(msg, text)
        await self._store.set_value(key, "1", ttl_s=REPLY_KEY_TTL_S)

    async def _submit(self, request: JobRequest) -> Any:
        while True:
            try:
                return self._engine.submit(request)
            except EngineError as exc:
                if exc.code != "busy" or self._stopping:
                    raise AdapterError(f"engine refused the job: {exc.code}") from None
                await asyncio.sleep(exc.retry_after or BUSY_RETRY_S)

    async def _publish(self, topic: str, job_id: str, event: JobEvent) -> None:
        try:
            await self._hub.publish(topic, job_id, event)
        except Exception as exc:  # a hub problem must never lose the chat's answer
            log.error("relay_publish_failed", job=job_id, error=repr(exc))

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


class _ImageOnce:
    """A message's first image, downloaded on first use and kept for the retries of one run
    (a retry after a store blip or a failed card update need not download it again; the
    engine's vision cache then spares it the decode too). A failed download is not kept."""

    def __init__(self, adapter: Adapter, msg: InboundMessage) -> None:
        self._adapter = adapter
        self._msg = msg
        self._image: bytes | None = None

    async def get(self) -> bytes:
        """The image bytes (``ImageFetchError`` and transport errors propagate)."""
        if self._image is None:
            self._image = await self._adapter.fetch_image(self._msg, self._msg.images[0])
        return self._image


def _lease_key(entry_id: str) -> str:
    return f"run:{entry_id}"


def _reply_key(entry_id: str) -> str:
    """Store key of the reply card posted for an inbox entry (its platform message id)."""
    return f"reply:{entry_id}"


def _texted_key(entry_id: str) -> str:
    """Store key marking that an inbox entry's one-off text reply was sent."""
    return f"texted:{entry_id}"
