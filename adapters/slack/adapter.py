"""``SlackAdapter``: the bridge's one handle on Slack, receiving over Socket Mode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from adapters.base import (
    AdapterObserver,
    AdapterStatus,
    EventOutcome,
    ImageFetchError,
    ImageRef,
    InboundMessage,
    MessageSink,
    ReplyError,
)
from adapters.http import HttpClient
from adapters.lifecycle import AdapterCore
from adapters.slack.config import SlackConfig
from adapters.slack.protocol import (
    EVENTS_API,
    PLATFORM,
    ProtocolError,
    SocketMessage,
    thread_ts,
    to_inbound,
)
from adapters.slack.reply import PLACEHOLDER, SlackReplyStream, fit_text
from adapters.slack.socket import SocketModeClient
from adapters.slack.webapi import SlackApiError, SlackWebApi

log = structlog.get_logger(__name__)


class SlackAdapter:
    """Receives Slack messages over Socket Mode and answers in the message's thread.

    Args:
        config: the settings; validated here (raises ``ConfigError``).
        http: the HTTP seam; an :class:`AiohttpClient` owned (and closed) by the adapter if None.
        clock: wall-clock seconds for timestamps.
        observer: told the outcome of every delivery (``accepted``/``duplicate``/``rejected``).
        monotonic: monotonic seconds for pacing and the socket deadline.
    """

    platform = PLATFORM

    def __init__(
        self,
        config: SlackConfig,
        http: HttpClient | None = None,
        clock: Callable[[], float] = time.time,
        observer: AdapterObserver | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        self.config = config
        self._core = AdapterCore(PLATFORM, "socket", http, clock, observer)
        self._status = self._core.status
        self._clock = clock
        self._monotonic = monotonic
        self.api = SlackWebApi(config, self._core.http)
        self._sink: MessageSink | None = None
        self._client: SocketModeClient | None = None

    def __repr__(self) -> str:
        return f"SlackAdapter(mode='socket', base_url={self.config.api_root!r})"

    @property
    def socket(self) -> SocketModeClient | None:
        """The Socket Mode client while running."""
        return self._client

    async def start(self, sink: MessageSink) -> None:
        """Accept messages into ``sink`` and connect out to Slack (in the background)."""
        self._sink = sink
        if self._client is None:
            self._client = SocketModeClient(
                self.config, self.api, self._on_envelope, self._status, monotonic=self._monotonic
            )
        self._client.start()

    async def stop(self) -> None:
        """Stop receiving, cancel background work and close owned connections."""
        if self._client is not None:
            await self._client.stop()
            self._client = None
        self._sink = None
        await self._core.close()

    def status(self) -> AdapterStatus:
        """State for the dashboard and ``/readyz`` (no secrets)."""
        return self._status.snapshot(api_errors=self.api.permanent_errors)

    async def _on_envelope(self, envelope: SocketMessage) -> bool:
        """Decide one envelope; True to acknowledge it.

        A message is acknowledged only after the sink recorded it (or knew it); a sink that
        fails or takes longer than ``sink_timeout_s`` leaves it unacked, so Slack re-delivers.
        Envelopes the bridge does not use, and unusable ones, are acknowledged at once (a
        re-delivery would bring the same thing back).
        """
        if envelope.type != EVENTS_API or envelope.payload is None:
            log.info("slack.envelope_ignored", envelope_id=envelope.envelope_id, type=envelope.type)
            return True
        try:
            decision = to_inbound(envelope.payload, received_at=self._clock())
        except ProtocolError as exc:
            self._core.count("rejected")
            log.warning("slack.bad_event", envelope_id=envelope.envelope_id, error=str(exc))
            return True
        msg = decision.message
        if msg is None:
            log.info(
                "slack.event_ignored",
                envelope_id=envelope.envelope_id,
                event_id=decision.event_id,
                reason=decision.reason,
            )
            return True
        sink = self._sink
        if sink is None:
            return False
        try:
            async with asyncio.timeout(self.config.sink_timeout_s):
                is_new = await sink(msg)
        except TimeoutError:
            log.warning("slack.sink_timeout", message_id=msg.message_id, event_id=msg.event_id)
            return False
        except Exception:
            log.exception("slack.sink_failed", message_id=msg.message_id, event_id=msg.event_id)
            return False
        outcome: EventOutcome = "accepted" if is_new else "duplicate"
        self._core.count(outcome)
        log.info(
            "slack.event",
            outcome=outcome,
            envelope_id=envelope.envelope_id,
            message_id=msg.message_id,
            event_id=msg.event_id,
            retry_attempt=envelope.retry_attempt,
            images=len(msg.images),
        )
        return True

    async def fetch_image(self, msg: InboundMessage, ref: ImageRef) -> bytes:
        """Download one file of ``msg`` with the bot token (at most ``max_image_bytes``).

        Raises:
            ImageFetchError: the file cannot be had; answer with a short apology.
        """
        try:
            return await self.api.download_file(ref.key)
        except SlackApiError as exc:
            raise ImageFetchError(f"image of {msg.message_id}: {exc}") from None

    async def open_reply(
        self, msg: InboundMessage, existing_reply_id: str | None = None
    ) -> SlackReplyStream:
        """Post the threaded reply for ``msg``, or bind to the one an earlier run posted.

        Slack's chat.postMessage has no idempotency key, so the relay's stored reply ``ts``
        (``existing_reply_id``) keeps a re-run from posting a second reply; without one, the
        thread is searched for a reply tagged (in its metadata) with this message's id, which
        covers a crash between posting and the relay's store write.

        Raises:
            ReplyError: the reply could not be posted.
        """
        if existing_reply_id is None:
            existing_reply_id = await self.api.find_tagged_reply(
                msg.chat_id, thread_ts(msg), _tag(msg, "answer")
            )
        if existing_reply_id is not None:
            ts = existing_reply_id
            log.info("slack.reply_resumed", message_id=msg.message_id, reply_ts=ts)
        else:
            try:
                ts = await self.api.post_message(
                    msg.chat_id, PLACEHOLDER, thread_ts(msg), tag=_tag(msg, "answer")
                )
            except SlackApiError as exc:
                raise ReplyError(f"reply to {msg.message_id}: {exc}") from None
            log.info("slack.reply_opened", message_id=msg.message_id, reply_ts=ts)
        stream = SlackReplyStream(
            self.api,
            channel=msg.chat_id,
            ts=ts,
            source_message_id=msg.message_id,
            interval_s=self.config.update_interval_s,
            max_chars=self.config.max_text_chars,
            monotonic=self._monotonic,
        )
        self._core.track(stream)
        return stream

    async def send_text_reply(self, msg: InboundMessage, text: str) -> None:
        """Reply once in the thread with a short text.

        Raises:
            ReplyError: the reply could not be posted.
        """
        tag = _tag(msg, "text")
        if await self.api.find_tagged_reply(msg.chat_id, thread_ts(msg), tag) is not None:
            log.info("slack.text_reply_exists", message_id=msg.message_id)
            return
        try:
            await self.api.post_message(
                msg.chat_id, fit_text(text, self.config.max_text_chars), thread_ts(msg), tag=tag
            )
        except SlackApiError as exc:
            raise ReplyError(f"text reply to {msg.message_id}: {exc}") from None


def _tag(msg: InboundMessage, purpose: str) -> str:
    """The metadata tag of the reply of ``purpose`` to ``msg`` (no secrets: ids only)."""
    return f"{purpose}:{msg.message_id}"
