"""``FeishuAdapter``: the bridge's one handle on Feishu, in webhook or long-connection mode."""

from __future__ import annotations

import asyncio
import json
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
    WebhookResponse,
)
from adapters.feishu.cards import answer_card, card_content, text_content
from adapters.feishu.config import FeishuConfig
from adapters.feishu.events import MESSAGE_RECEIVE, EventFormatError, parse_envelope, to_inbound
from adapters.feishu.longconn.client import LongConnClient
from adapters.feishu.longconn.protocol import EventDelivery
from adapters.feishu.openapi import FeishuApiError, OpenApiClient, idempotency_uuid
from adapters.feishu.reply import FeishuReplyStream
from adapters.feishu.webhook import WebhookVerifier
from adapters.http import HttpClient
from adapters.lifecycle import AdapterCore

log = structlog.get_logger(__name__)


class FeishuAdapter:
    """Receives Feishu messages (webhook or long connection) and answers them with reply cards.

    Args:
        config: the settings; validated here (raises ``ConfigError``).
        http: the HTTP seam; an :class:`AiohttpClient` owned (and closed) by the adapter if None.
        clock: wall-clock seconds, for the webhook replay window and timestamps (tests inject it).
        observer: told the outcome of every delivery (``accepted``/``duplicate``/``rejected``).
        monotonic: monotonic seconds for token expiry, pacing and liveness.
    """

    platform = "feishu"

    def __init__(
        self,
        config: FeishuConfig,
        http: HttpClient | None = None,
        clock: Callable[[], float] = time.time,
        observer: AdapterObserver | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        self.config = config
        self._core = AdapterCore("feishu", config.mode, http, clock, observer)
        self._status = self._core.status
        self._clock = clock
        self._monotonic = monotonic
        self.api = OpenApiClient(config, self._core.http, monotonic=monotonic)
        self._verifier = WebhookVerifier(config, clock)
        self._sink: MessageSink | None = None
        self._client: LongConnClient | None = None

    def __repr__(self) -> str:
        return f"FeishuAdapter(mode={self.config.mode!r}, app_id={self.config.app_id!r})"

    @property
    def longconn(self) -> LongConnClient | None:
        """The long-connection client while running in ``longconn`` mode."""
        return self._client

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self, sink: MessageSink) -> None:
        """Accept messages into ``sink``; in ``longconn`` mode also connect out (background)."""
        self._sink = sink
        if self.config.mode == "webhook":
            self._status.set_state("listening")
            log.info("feishu.webhook_ready", app_id=self.config.app_id)
            return
        if self._client is None:
            self._client = LongConnClient(
                self.config, self.api, self._on_delivery, self._status, monotonic=self._monotonic
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

    # --- inbound -------------------------------------------------------------------------------
    async def handle_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookResponse:
        """Answer one ``POST /webhooks/feishu``: verify, record through the sink, acknowledge.

        Answers 200 only after the sink recorded the message (or knew it), before any model work;
        401/403 for bad signatures, tokens, timestamps or ciphertext (the sink is not called);
        400 for malformed or oversized bodies; 503/500 when the sink is missing, slow or failing
        (so Feishu re-delivers).
        """
        decision = self._verifier.process(headers, body)
        if decision.kind == "rejected":
            self._count("rejected")
            log.warning("feishu.webhook_rejected", reason=decision.reason, status=decision.status)
            return WebhookResponse(decision.status, decision.body)
        if decision.kind == "challenge":
            log.info("feishu.url_verification")
            return WebhookResponse(200, decision.body)
        if decision.kind == "ignored" or decision.message is None:
            log.info("feishu.webhook_ignored", event_id=decision.event_id, reason=decision.reason)
            return WebhookResponse(200, decision.body)
        msg = decision.message
        sink = self._sink
        if sink is None:
            return _error(503, "not_ready", "the adapter is not started")
        try:
            async with asyncio.timeout(self.config.sink_timeout_s):
                is_new = await sink(msg)
        except TimeoutError:
            log.warning("feishu.sink_timeout", message_id=msg.message_id, event_id=msg.event_id)
            return _error(503, "busy", "could not record the event in time")
        except Exception:
            log.exception("feishu.sink_failed", message_id=msg.message_id, event_id=msg.event_id)
            return _error(500, "internal", "could not record the event")
        self._count("accepted" if is_new else "duplicate")
        log.info(
            "feishu.event",
            outcome="accepted" if is_new else "duplicate",
            message_id=msg.message_id,
            event_id=msg.event_id,
            message_type=msg.message_type,
        )
        return WebhookResponse(200, decision.body)

    async def _on_delivery(self, delivery: EventDelivery) -> int:
        """Handle one long-connection event; returns the ack code (200, or 500 to get it again)."""
        if delivery.kind != "event":
            return 200  # card callbacks are not used by the bridge
        if delivery.error is not None:
            self._count("rejected")
            log.warning(
                "feishu.longconn_event_dropped",
                message_id=delivery.message_id,
                reason=delivery.error,
            )
            return 200  # re-delivery would bring the same unusable event back
        try:
            data = json.loads(delivery.payload)
            if not isinstance(data, dict):
                raise EventFormatError("event is not a JSON object")
            envelope = parse_envelope(data)
            if envelope.event_type != MESSAGE_RECEIVE:
                log.info("feishu.longconn_ignored", event_id=envelope.event_id)
                return 200
            msg = to_inbound(envelope, received_at=self._clock())
        except (ValueError, UnicodeDecodeError) as exc:
            self._count("rejected")
            log.warning(
                "feishu.longconn_bad_event", message_id=delivery.message_id, error=str(exc)[:200]
            )
            return 200
        sink = self._sink
        if sink is None:
            return 500
        is_new = await sink(msg)  # raising → the client acks 500 and Feishu re-delivers
        self._count("accepted" if is_new else "duplicate")
        log.info(
            "feishu.event",
            outcome="accepted" if is_new else "duplicate",
            message_id=msg.message_id,
            event_id=msg.event_id,
            trace_id=delivery.trace_id,
        )
        return 200

    def _count(self, outcome: EventOutcome) -> None:
        self._core.count(outcome)

    # --- outbound ------------------------------------------------------------------------------
    async def fetch_image(self, msg: InboundMessage, ref: ImageRef) -> bytes:
        """Download one image of ``msg`` (at most ``max_image_bytes``).

        Raises:
            ImageFetchError: the image cannot be had; answer with a short apology.
        """
        try:
            return await self.api.download_image(msg.message_id, ref.key, ref.kind)
        except FeishuApiError as exc:
            raise ImageFetchError(f"image {ref.key[:64]} of {msg.message_id}: {exc}") from None

    async def open_reply(
        self, msg: InboundMessage, existing_reply_id: str | None = None
    ) -> FeishuReplyStream:
        """Post the reply card for ``msg`` (``uuid`` derived from the message id), or resume one.

        Calling it again for the same message (a retry, or after a restart within Feishu's hour
        of uuid memory) returns the same card instead of posting a second one. Past that hour only
        the card's id can prevent a second card: with ``existing_reply_id`` nothing is posted and
        the stream's first update or ``finish`` PATCHes that card.

        Raises:
            ReplyError: the card could not be posted.
        """
        if existing_reply_id is not None:
            reply_id = existing_reply_id
            log.info("feishu.reply_resumed", message_id=msg.message_id, reply_id=reply_id)
        else:
            content = card_content(answer_card("", "thinking"))
            try:
                reply_id = await self.api.reply(
                    msg.message_id,
                    "interactive",
                    content,
                    idempotency_uuid(msg.message_id, "answer"),
                )
            except FeishuApiError as exc:
                raise ReplyError(f"reply to {msg.message_id}: {exc}") from None
            log.info("feishu.reply_opened", message_id=msg.message_id, reply_id=reply_id)
        stream = FeishuReplyStream(
            self.api,
            source_message_id=msg.message_id,
            reply_message_id=reply_id,
            interval_s=self.config.patch_interval_s,
            monotonic=self._monotonic,
        )
        self._core.track(stream)
        return stream

    async def send_text_reply(self, msg: InboundMessage, text: str) -> None:
        """Reply once with plain text (idempotent per message).

        Raises:
            ReplyError: the reply could not be posted.
        """
        try:
            await self.api.reply(
                msg.message_id, "text", text_content(text), idempotency_uuid(msg.message_id, "text")
            )
        except FeishuApiError as exc:
            raise ReplyError(f"text reply to {msg.message_id}: {exc}") from None


def _error(status: int, code: str, message: str) -> WebhookResponse:
    return WebhookResponse(status, {"error": {"code": code, "message": message}})
