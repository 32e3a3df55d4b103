"""``DingTalkAdapter``: the bridge's one handle on a DingTalk robot in Stream mode."""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections import OrderedDict
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
from adapters.dingtalk.cards import (
    CREATE_PATH,
    FLOW_INPUTING,
    DingTalkCardReply,
    create_body,
    out_track_id,
)
from adapters.dingtalk.config import BOT_MESSAGE_TOPIC, DingTalkConfig
from adapters.dingtalk.frames import FrameError
from adapters.dingtalk.messages import MessageError, ReplyTarget, to_inbound
from adapters.dingtalk.openapi import DingTalkApi, DingTalkApiError
from adapters.dingtalk.protocol import CallbackDelivery
from adapters.dingtalk.reply import DingTalkReply
from adapters.dingtalk.stream import StreamClient
from adapters.http import AiohttpClient, HttpClient
from adapters.status import StatusTracker

log = structlog.get_logger(__name__)

MAX_TARGETS = 10_000
WEBHOOK_MARGIN_S = 30.0
TITLE_CHARS = 24


class DingTalkAdapter:
    """Receives robot messages over the stream and answers them with one message each.

    Args:
        config: the settings; validated here (raises ``ConfigError``).
        http: the HTTP seam; an :class:`AiohttpClient` owned (and closed) by the adapter if None.
        clock: wall-clock seconds (webhook expiry, timestamps).
        observer: told the outcome of every delivery.
        monotonic: monotonic seconds for token expiry and the socket deadline.
    """

    platform = "dingtalk"

    def __init__(
        self,
        config: DingTalkConfig,
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
        self._monotonic = monotonic
        self._observer = observer
        self.api = DingTalkApi(config, self._http, monotonic=monotonic)
        self._status = StatusTracker("stream", clock, platform="dingtalk")
        self._sink: MessageSink | None = None
        self._client: StreamClient | None = None
        # Reply routes by message id, learnt from callbacks (a restart forgets them: the robot
        # API, which needs only the conversation or the sender, is used then).
        self._targets: OrderedDict[str, ReplyTarget] = OrderedDict()
        self._cards: weakref.WeakSet[DingTalkCardReply] = weakref.WeakSet()
        self._posted: OrderedDict[str, None] = OrderedDict()  # "answer:<id>"/"text:<id>" sent

    def __repr__(self) -> str:
        return f"DingTalkAdapter(mode={self.config.mode!r}, client_id={self.config.client_id!r})"

    @property
    def stream(self) -> StreamClient | None:
        """The stream client while running."""
        return self._client

    async def start(self, sink: MessageSink) -> None:
        """Accept messages into ``sink`` and connect out (in the background)."""
        self._sink = sink
        if self._client is None:
            self._client = StreamClient(
                self.config, self.api, self._on_callback, self._status, monotonic=self._monotonic
            )
        self._client.start()

    async def stop(self) -> None:
        """Stop receiving, cancel background work and close owned connections."""
        if self._client is not None:
            await self._client.stop()
            self._client = None
        cards = list(self._cards)
        await asyncio.gather(*(c.aclose() for c in cards), return_exceptions=True)
        self._sink = None
        self._status.set_state("stopped")
        if self._owns_http:
            await self._http.close()

    def status(self) -> AdapterStatus:
        """State for the dashboard and ``/readyz`` (no secrets)."""
        return self._status.snapshot(api_errors=self.api.permanent_errors)

    # --- inbound -------------------------------------------------------------------------------
    async def _on_callback(self, delivery: CallbackDelivery) -> bool:
        """Record a callback via the sink; True: ack it, False: DingTalk delivers it again."""
        frame = delivery.frame
        if frame.topic != BOT_MESSAGE_TOPIC:
            log.info("dingtalk.callback_ignored", topic=frame.topic[:80], delivery=frame.message_id)
            return True
        try:
            msg, target = to_inbound(frame.payload(), received_at=self._clock())
        except (FrameError, MessageError) as exc:
            self._count("rejected")
            log.warning("dingtalk.bad_message", delivery=frame.message_id, error=str(exc))
            return True  # re-delivery would bring the same unusable message back
        sink = self._sink
        if sink is None:
            return False
        self._remember(msg.message_id, target)
        try:
            async with asyncio.timeout(self.config.sink_timeout_s):
                is_new = await sink(msg)
        except TimeoutError:
            log.warning("dingtalk.sink_timeout", message_id=msg.message_id)
            return False
        outcome: EventOutcome = "accepted" if is_new else "duplicate"
        self._count(outcome)
        log.info(
            "dingtalk.event",
            outcome=outcome,
            message_id=msg.message_id,
            delivery=frame.message_id,
            message_type=msg.message_type,
            images=len(msg.images),
        )
        return True

    def _remember(self, message_id: str, target: ReplyTarget) -> None:
        self._targets[message_id] = target
        self._targets.move_to_end(message_id)
        while len(self._targets) > MAX_TARGETS:
            self._targets.popitem(last=False)

    def _count(self, outcome: EventOutcome) -> None:
        self._status.count(outcome)
        if self._observer is not None:
            try:
                self._observer.on_event(outcome)
            except Exception:
                log.exception("dingtalk.observer_failed")

    # --- outbound ------------------------------------------------------------------------------
    async def fetch_image(self, msg: InboundMessage, ref: ImageRef) -> bytes:
        """Download one picture of ``msg`` by its ``downloadCode`` (at most ``max_image_bytes``).

        Raises:
            ImageFetchError: the picture cannot be had; answer with a short apology.
        """
        target = self._targets.get(msg.message_id)
        robot = target.robot_code if target is not None else ""
        try:
            return await self.api.download_image(ref.key, robot)
        except DingTalkApiError as exc:
            raise ImageFetchError(f"picture of {msg.message_id}: {exc}") from None

    async def open_reply(
        self, msg: InboundMessage, existing_reply_id: str | None = None
    ) -> DingTalkReply | DingTalkCardReply:
        """The reply to ``msg``: a streamed AI card when a template is set, else one message.

        A card's ``outTrackId`` and a message reply's id are derived from the message, so a
        resumed reply (``existing_reply_id``) is the same reply: nothing new is posted.

        Raises:
            ReplyError: the card could not be created.
        """
        if self.config.card_template_id:
            return await self._open_card(msg, existing_reply_id)
        reply_id = existing_reply_id or f"dingtalk:{msg.message_id}"

        async def post(text: str) -> None:
            await self._send_once(msg, "answer", text, markdown=True)

        return DingTalkReply(post, source_message_id=msg.message_id, reply_message_id=reply_id)

    async def _open_card(self, msg: InboundMessage, existing: str | None) -> DingTalkCardReply:
        track_id = existing or out_track_id(msg.message_id)
        if existing is None:
            target = self._targets.get(msg.message_id)
            robot = target.robot_code if target is not None else ""
            body = create_body(self.config, msg, track_id, robot)
            try:
                await self.api.call("POST", CREATE_PATH, body)
            except DingTalkApiError as exc:
                # A run that died after creating it: the card exists if it takes an update.
                if not await self._card_exists(track_id):
                    raise ReplyError(f"card for {msg.message_id}: {exc}") from None
            log.info("dingtalk.card_opened", message_id=msg.message_id, track_id=track_id)
        stream = DingTalkCardReply(
            self.api,
            self.config,
            source_message_id=msg.message_id,
            track_id=track_id,
            monotonic=self._monotonic,
        )
        self._cards.add(stream)
        return stream

    async def _card_exists(self, track_id: str) -> bool:
        try:
            await self.api.call(
                "PUT",
                "/v1.0/card/instances",
                {
                    "outTrackId": track_id,
                    "cardData": {"cardParamMap": {"flowStatus": FLOW_INPUTING}},
                },
            )
        except DingTalkApiError:
            return False
        return True

    async def send_text_reply(self, msg: InboundMessage, text: str) -> None:
        """Reply once with plain text.

        Raises:
            ReplyError: the reply could not be posted.
        """
        try:
            await self._send_once(msg, "text", text, markdown=False)
        except DingTalkApiError as exc:
            raise ReplyError(f"text reply to {msg.message_id}: {exc}") from None

    async def _send_once(
        self, msg: InboundMessage, purpose: str, text: str, *, markdown: bool
    ) -> None:
        key = f"{purpose}:{msg.message_id}"
        if key in self._posted:
            log.info("dingtalk.reply_already_sent", message_id=msg.message_id, purpose=purpose)
            return
        await self._send(msg, text, markdown=markdown)
        self._posted[key] = None
        while len(self._posted) > MAX_TARGETS:
            self._posted.popitem(last=False)

    async def _send(self, msg: InboundMessage, text: str, *, markdown: bool) -> None:
        """To the sessionWebhook while it is valid, else (or if it fails) by the robot API."""
        target = self._targets.get(msg.message_id)
        title = (text.strip().splitlines() or ["Answer"])[0][:TITLE_CHARS] or "Answer"
        if (
            target is not None
            and target.session_webhook
            and (target.webhook_expires_ms / 1000.0 > self._clock() + WEBHOOK_MARGIN_S)
        ):
            body = (
                {"msgtype": "markdown", "markdown": {"title": title, "text": text}}
                if markdown
                else {"msgtype": "text", "text": {"content": text}}
            )
            try:
                await self.api.post_webhook(target.session_webhook, body)
                log.info("dingtalk.reply_sent", message_id=msg.message_id, via="sessionWebhook")
                return
            except DingTalkApiError as exc:
                log.warning("dingtalk.webhook_failed", message_id=msg.message_id, error=str(exc))
        single = msg.chat_type == "p2p"
        param = {"title": title, "text": text} if markdown else {"content": text}
        await self.api.send_robot_message(
            single_chat=single,
            robot_code=target.robot_code if target is not None else "",
            target=msg.sender_id if single else msg.chat_id,
            msg_key="sampleMarkdown" if markdown else "sampleText",
            param=json.dumps(param, ensure_ascii=False),
        )
        log.info("dingtalk.reply_sent", message_id=msg.message_id, via="robot_api", single=single)
