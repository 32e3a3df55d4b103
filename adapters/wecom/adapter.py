"""``WeComAdapter``: the bridge's one handle on a WeCom self-built app in callback mode."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping

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
from adapters.http import AiohttpClient, HttpClient
from adapters.status import StatusTracker
from adapters.wecom.api import WeComApi, WeComApiError
from adapters.wecom.callback import CallbackCore, CallbackDecision
from adapters.wecom.config import WeComConfig
from adapters.wecom.reply import WeComReplyStream, split_text

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class CallbackReply:
    """What the callback route answers: a status and a text/plain body."""

    status: int
    text: str


class WeComAdapter:
    """Receives WeCom callbacks and answers with app messages (placeholder, then the answer).

    Args:
        config: the settings; validated here (raises ``ConfigError``).
        http: the HTTP seam; an :class:`AiohttpClient` owned (and closed) by the adapter if None.
        clock: wall-clock seconds for timestamps (tests inject it).
        observer: told the outcome of every delivery (``accepted``/``duplicate``/``rejected``).
        monotonic: monotonic seconds for token expiry.
    """

    platform = "wecom"

    def __init__(
        self,
        config: WeComConfig,
        http: HttpClient | None = None,
        clock: Callable[[], float] = time.time,
        observer: AdapterObserver | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        self.config = config
        self._owns_http = http is None
        self._http: HttpClient = http if http is not None else AiohttpClient()
        self._clock = clock
        self._observer = observer
        self.api = WeComApi(config, self._http, monotonic=monotonic)
        self._core = CallbackCore(config, clock)
        self._status = StatusTracker("webhook", clock, platform="wecom")
        self._sink: MessageSink | None = None

    def __repr__(self) -> str:
        return f"WeComAdapter(corp_id={self.config.corp_id!r}, agent_id={self.config.agent_id!r})"

    async def start(self, sink: MessageSink) -> None:
        """Accept callbacks into ``sink`` (callback mode: WeCom calls us, nothing to connect)."""
        self._sink = sink
        self._status.set_state("listening")
        log.info("wecom.callback_ready", corp_id=self.config.corp_id, agent_id=self.config.agent_id)

    async def stop(self) -> None:
        """Stop accepting callbacks and close owned connections."""
        self._sink = None
        self._status.set_state("stopped")
        if self._owns_http:
            await self._http.close()

    def status(self) -> AdapterStatus:
        """State for the dashboard and ``/readyz`` (no secrets)."""
        return self._status.snapshot(api_errors=self.api.permanent_errors)

    # --- inbound -------------------------------------------------------------------------------
    def handle_url_check(self, query: Mapping[str, str]) -> CallbackReply:
        """Answer ``GET /webhooks/wecom``: the decrypted echostr, or 400/403."""
        decision = self._core.url_check(query)
        if decision.kind == "rejected":
            self._count("rejected")
            log.warning("wecom.url_check_rejected", reason=decision.reason)
        else:
            log.info("wecom.url_check_passed")
        return CallbackReply(decision.status, decision.text)

    async def handle_callback(self, query: Mapping[str, str], body: bytes) -> CallbackReply:
        """Answer ``POST /webhooks/wecom``: 200 with an empty body once the sink recorded it.

        400/403/413 for malformed, forged or oversized requests (the sink is not called); 503/500
        when the sink is missing, slow or failing, so that WeCom delivers it again.
        """
        decision: CallbackDecision = self._core.message(query, body)
        if decision.kind == "rejected":
            self._count("rejected")
            log.warning("wecom.callback_rejected", reason=decision.reason, status=decision.status)
            return CallbackReply(decision.status, decision.text)
        if decision.kind == "ignored" or decision.message is None:
            log.info("wecom.callback_ignored", reason=decision.reason)
            return CallbackReply(200, "")
        msg = decision.message
        sink = self._sink
        if sink is None:
            return CallbackReply(503, "not ready")
        try:
            async with asyncio.timeout(self.config.sink_timeout_s):
                is_new = await sink(msg)
        except TimeoutError:
            log.warning("wecom.sink_timeout", message_id=msg.message_id)
            return CallbackReply(503, "could not record the message in time")
        except Exception:
            log.exception("wecom.sink_failed", message_id=msg.message_id)
            return CallbackReply(500, "could not record the message")
        outcome: EventOutcome = "accepted" if is_new else "duplicate"
        self._count(outcome)
        log.info(
            "wecom.event",
            outcome=outcome,
            message_id=msg.message_id,
            chat_id=msg.chat_id,
            message_type=msg.message_type,
        )
        return CallbackReply(200, "")

    def _count(self, outcome: EventOutcome) -> None:
        self._status.count(outcome)
        if self._observer is not None:
            try:
                self._observer.on_event(outcome)
            except Exception:
                log.exception("wecom.observer_failed")

    # --- outbound ------------------------------------------------------------------------------
    async def fetch_image(self, msg: InboundMessage, ref: ImageRef) -> bytes:
        """Download the image by MediaId with ``media/get``.

        Raises:
            ImageFetchError: the media cannot be had; answer with a short apology.
        """
        try:
            return await self.api.get_media(ref.key)
        except WeComApiError as exc:
            raise ImageFetchError(f"media {ref.key[:64]} of {msg.message_id}: {exc}") from None

    async def open_reply(
        self, msg: InboundMessage, existing_reply_id: str | None = None
    ) -> WeComReplyStream:
        """Send the placeholder text to the sender, or resume after one sent by an earlier run.

        With ``existing_reply_id`` nothing is sent now; the stream's ``finish`` sends the answer.

        Raises:
            ReplyError: the placeholder could not be sent.
        """
        if existing_reply_id is not None:
            reply_id = existing_reply_id
            log.info("wecom.reply_resumed", message_id=msg.message_id, reply_id=reply_id)
        else:
            try:
                sent = await self.api.send_text(msg.sender_id, self.config.placeholder)
            except WeComApiError as exc:
                raise ReplyError(f"placeholder for {msg.message_id}: {exc}") from None
            reply_id = sent or f"placeholder:{msg.message_id}"
            log.info("wecom.reply_opened", message_id=msg.message_id, reply_id=reply_id)
        return WeComReplyStream(
            self.api,
            source_message_id=msg.message_id,
            to_user=msg.sender_id,
            reply_message_id=reply_id,
            max_parts=self.config.max_parts,
        )

    async def send_text_reply(self, msg: InboundMessage, text: str) -> None:
        """Send one short text to the sender.

        Raises:
            ReplyError: the text could not be sent.
        """
        try:
            for part in split_text(text, self.config.max_parts):
                await self.api.send_text(msg.sender_id, part)
        except WeComApiError as exc:
            raise ReplyError(f"text reply to {msg.message_id}: {exc}") from None
