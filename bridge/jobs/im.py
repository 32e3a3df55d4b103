"""The IM entry point of the job pipeline: one inbox entry answered in its chat, at most once.

The relay (:mod:`bridge.relay`) decides which messages need an answer (intake, dedupe, recovery,
the cluster queue); :class:`ImAnswers` gives each one its answer. A message with an image becomes
a job on the shared :class:`~bridge.jobs.runner.JobRunner` that waits while the engine is busy,
with two sinks: the chat's topic on the hub (``chat:<platform>:<chat>``) and the reply card,
which is required (when the platform fails, the attempt is retried under the one retry policy).
A re-run never posts a second answer: the id of a posted reply card is kept in the store
(``reply:<entry>``) and the re-run edits that card, and a sent text reply leaves a marker
(``texted:<entry>``); the platform's reply idempotency key covers the moment in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from adapters.base import Adapter, AdapterError, ImageFetchError, InboundMessage, ReplyStream
from adapters.retry import Backoff
from bridge.jobs.runner import Busy, JobRunner, JobSpec
from bridge.store import Store, StoreUnavailable
from engine.types import Delta, Done, EngineError, Failed, JobEvent, JobRequest

log = structlog.get_logger(__name__)

DEFAULT_PROMPT = "Describe this image."
TEXT_ONLY_REPLY = (
    "Send me a photo (optionally with a question in the same post) and I will describe it."
)
BAD_IMAGE_REPLY = "Sorry, I could not read that image. Please send a JPEG, PNG, WebP or GIF photo."
FAILED_REPLY = "Sorry, something went wrong while looking at your image. Please try again."
# How long the store keeps a posted card's id (``reply:<entry>``) and the text-sent marker
# (``texted:<entry>``): 8 days, past the inbox's 7-day retention of finished entries, the longest
# the bridge remembers any message (redeliveries stop at 6 h, dedupe keys at 24 h). A pending entry
# recovered up to 8 days after its reply was posted still edits that reply; nothing deletes these
# keys, so they must expire on their own.
REPLY_KEY_TTL_S = 8 * 24 * 3600.0
MAX_ATTEMPTS = 8
#: What one attempt may fail with and still be worth another (the platform, the store, the net).
RETRYABLE = (AdapterError, StoreUnavailable, OSError)


class Publisher(Protocol):
    """Where IM job events go for WebSocket subscribers (the hub, or the cluster fan-out)."""

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None: ...


class ImAnswers:
    """Answers inbox entries: a job per message on the runner, retried, one reply per message.

    Args:
        store: remembers posted replies (``reply:``/``texted:`` keys).
        runner: the bridge's job runner.
        hub: where the chat's topic events go.
        attempts: tries per run before the entry is left pending for a later run.
        backoff: makes the delays between tries (jittered, capped).
        sleep: awaited between tries (injected by tests).
    """

    def __init__(
        self,
        store: Store,
        runner: JobRunner,
        hub: Publisher,
        *,
        attempts: int = MAX_ATTEMPTS,
        backoff: Callable[[], Backoff] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self.runner = runner
        self._hub = hub
        self._attempts = attempts
        self._backoff = backoff or (lambda: Backoff(initial=1.0, cap=60.0))
        self._sleep = sleep

    async def answer(self, adapter: Adapter, msg: InboundMessage, job_id: str) -> bool:
        """Answer ``msg`` in its chat and on the hub, retrying failed attempts; True once the chat
        has its answer, False when the tries ran out (the entry stays pending).

        ``job_id`` is the inbox entry id (``<platform>:<message id>``); it is also the engine job
        id, the hub's event id and the key of what the store remembers about posted replies.
        """
        backoff = self._backoff()
        image = _ImageOnce(adapter, msg)  # downloaded once for all attempts of this run
        for attempt in range(1, self._attempts + 1):
            try:
                await self._attempt(adapter, msg, job_id, image)
                return True
            except RETRYABLE as exc:
                delay = backoff.next_delay()
                log.warning(
                    "relay_attempt_failed",
                    job=job_id,
                    attempt=attempt,
                    error=str(exc),
                    retry_s=delay,
                )
                await self._sleep(delay)
        log.error("relay_gave_up", job=job_id, attempts=self._attempts)
        return False

    async def _attempt(
        self, adapter: Adapter, msg: InboundMessage, job_id: str, image_once: _ImageOnce
    ) -> None:
        if not msg.images:
            await self._send_text_once(adapter, msg, job_id, TEXT_ONLY_REPLY)
            log.info("relay_text_only", job=job_id)
            return
        try:
            image = await image_once.get()
        except ImageFetchError as exc:
            log.warning("relay_image_fetch_failed", job=job_id, error=str(exc))
            await self._apologise(adapter, msg, job_id, Failed("bad_image", str(exc)))
            return
        topic = _TopicSink(self._hub, msg.topic, job_id)
        reply = _ReplySink(self, adapter, msg, job_id)
        spec = JobSpec(
            request=JobRequest(
                job_id=job_id, image=image, prompt=msg.text.strip() or DEFAULT_PROMPT
            ),
            origin=msg.platform,
            owner=msg.platform,
            sinks=(topic, reply),
            busy=Busy.WAIT,
            end_on_stop=False,  # a stopped job stays pending in the inbox and runs again
        )
        try:
            await self.runner.run(spec)
        except EngineError as exc:
            if exc.code == "busy":  # only while stopping: this run ends, the entry stays pending
                raise AdapterError("the engine is stopping") from None
            log.warning("relay_engine_refused", job=job_id, code=exc.code)
            await self._apologise(adapter, msg, job_id, Failed(exc.code, exc.message))

    async def _apologise(
        self, adapter: Adapter, msg: InboundMessage, job_id: str, failed: Failed
    ) -> None:
        """Tell the chat the job could not run (in the card an earlier run posted, if any)."""
        text = BAD_IMAGE_REPLY if failed.code in ("bad_image", "too_large") else FAILED_REPLY
        opened = await self._store.get_value(_reply_key(job_id))
        if opened is not None:
            resumed = await adapter.open_reply(msg, existing_reply_id=opened)
            await resumed.fail(text)
        else:
            await self._send_text_once(adapter, msg, job_id, text)
        await _TopicSink(self._hub, msg.topic, job_id).send(failed)

    async def open_reply_once(
        self, adapter: Adapter, msg: InboundMessage, job_id: str
    ) -> ReplyStream:
        """Post the answer card and record its id, or resume the card an earlier run posted.

        The platform's reply idempotency key alone is not enough: Feishu forgets a ``uuid`` after
        an hour, so a job recovered after a longer outage would post a second card.

        Raises:
            StoreUnavailable: the id could not be read or recorded; the attempt is retried.
        """
        key = _reply_key(job_id)
        existing = await self._store.get_value(key)
        if existing is not None:
            log.info("relay_reply_resumed", job=job_id, reply_id=existing)
            return await adapter.open_reply(msg, existing_reply_id=existing)
        reply = await adapter.open_reply(msg)
        # If this write fails, StoreUnavailable ends the attempt and the retry posts again with
        # the same uuid, which Feishu answers with this same card (within its hour), so the answer
        # is not lost. What remains: a crash after Feishu's 200 and before this write, recovered
        # more than an hour later, posts a second card.
        await self._store.set_value(key, reply.reply_message_id, ttl_s=REPLY_KEY_TTL_S)
        log.info("relay_reply_recorded", job=job_id, reply_id=reply.reply_message_id)
        return reply

    async def _send_text_once(
        self, adapter: Adapter, msg: InboundMessage, job_id: str, text: str
    ) -> None:
        """Send a short text reply unless an earlier run of this entry already sent one.

        Raises:
            StoreUnavailable: the marker could not be read or written; the attempt is retried (a
                resend within Feishu's hour reuses the uuid; the same narrow window as for cards).
        """
        key = _texted_key(job_id)
        if await self._store.get_value(key) is not None:
            log.info("relay_text_already_sent", job=job_id)
            return
        await adapter.send_text_reply(msg, text)
        await self._store.set_value(key, "1", ttl_s=REPLY_KEY_TTL_S)


@dataclass(slots=True)
class _TopicSink:
    """The chat's topic on the hub: subscribers see every event (a hub problem never costs the
    chat its answer, so this sink is not required)."""

    hub: Publisher
    topic: str
    job_id: str
    required: bool = False

    async def open(self) -> None:
        return None

    async def send(self, event: JobEvent) -> None:
        await self.hub.publish(self.topic, self.job_id, event)


@dataclass(slots=True)
class _ReplySink:
    """The reply card in the chat, posted once the engine accepted the job (so the post overlaps
    the engine's queue) and edited as the answer streams; required: its failure retries the job."""

    answers: ImAnswers
    adapter: Adapter
    msg: InboundMessage
    job_id: str
    required: bool = True
    reply: ReplyStream | None = None
    so_far: str = ""

    async def open(self) -> None:
        self.reply = await self.answers.open_reply_once(self.adapter, self.msg, self.job_id)

    async def send(self, event: JobEvent) -> None:
        assert self.reply is not None  # opened before the first event
        if isinstance(event, Delta):
            self.so_far += event.text
            await self.reply.update(self.so_far)
        elif isinstance(event, Done):
            await self.reply.finish(event.text)
            log.info("relay_answered", job=self.job_id, tokens=event.usage.completion_tokens)
        elif isinstance(event, Failed):
            text = BAD_IMAGE_REPLY if event.code == "bad_image" else FAILED_REPLY
            await self.reply.fail(text)
            log.info("relay_failed", job=self.job_id, code=event.code)


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


def _reply_key(entry_id: str) -> str:
    """Store key of the reply card posted for an inbox entry (its platform message id)."""
    return f"reply:{entry_id}"


def _texted_key(entry_id: str) -> str:
    """Store key marking that an inbox entry's one-off text reply was sent."""
    return f"texted:{entry_id}"
