"""``TelegramAdapter``: the bridge's one handle on a Telegram bot, by long polling or webhook."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import weakref
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
from adapters.http import AiohttpClient, HttpClient
from adapters.pacing import Pacer
from adapters.status import StatusTracker
from adapters.telegram.api import BotApi, DelaysFactory, TelegramApiError
from adapters.telegram.config import TelegramConfig
from adapters.telegram.poller import OffsetStore, Poller
from adapters.telegram.reply import PLACEHOLDER, TelegramReplyStream, fit_text
from adapters.telegram.updates import (
    PLATFORM,
    BotIdentity,
    parse_update,
    telegram_message_id,
    update_id_of,
)

log = structlog.get_logger(__name__)

SECRET_HEADER = "x-telegram-bot-api-secret-token"


class SinkFailed(Exception):
    """The sink could not record an update; it must not be confirmed."""


class TelegramAdapter:
    """Receives Telegram messages (polling or webhook) and answers them with edited replies.

    Args:
        config: the settings; validated here (raises ``ConfigError``).
        offsets: where the polling offset is kept durably (the bridge's store).
        delays: makes a :class:`~adapters.retry.Backoff` for retries and re-polls.
        http: the HTTP seam; an :class:`AiohttpClient` owned (and closed) by the adapter if None.
        clock: wall-clock seconds for timestamps.
        observer: told the outcome of every delivery.
        monotonic: monotonic seconds for edit pacing.
    """

    platform = PLATFORM

    def __init__(
        self,
        config: TelegramConfig,
        *,
        offsets: OffsetStore,
        delays: DelaysFactory,
        http: HttpClient | None = None,
        clock: Callable[[], float] = time.time,
        observer: AdapterObserver | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        self.config = config
        self._owns_http = http is None
        self._http: HttpClient = http if http is not None else AiohttpClient()
        self._clock = clock
        self._delays = delays
        self.api = BotApi(config, self._http, delays)
        self._status = StatusTracker(config.mode, clock, platform=PLATFORM, observer=observer)
        self.pacer = Pacer(config.edit_interval_s, monotonic=monotonic)
        self.api.on_rate_limited = self._hold_chat
        self.bot: BotIdentity | None = None
        self._identified = asyncio.Event()
        self._sink: MessageSink | None = None
        self._identity_task: asyncio.Task[None] | None = None
        self.poller: Poller | None = None
        if config.mode == "polling":
            self.poller = Poller(
                config,
                self.api,
                offsets,
                self._on_update,
                self._status,
                delays(),
                update_id_of=update_id_of,
            )
        self._streams: weakref.WeakSet[TelegramReplyStream] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"TelegramAdapter(mode={self.config.mode!r}, token='***')"

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self, sink: MessageSink) -> None:
        """Accept messages into ``sink``; learn the bot's identity and (polling) start polling."""
        self._sink = sink
        self._status.set_state("connecting")
        if self._identity_task is None:
            self._identity_task = asyncio.create_task(self._identify(), name="telegram-getme")
        if self.poller is not None:
            self.poller.start(self._identified.wait)

    async def stop(self) -> None:
        """Stop receiving, cancel background work and close owned connections."""
        if self.poller is not None:
            await self.poller.stop()
        if self._identity_task is not None:
            self._identity_task.cancel()
            await asyncio.gather(self._identity_task, return_exceptions=True)
            self._identity_task = None
        streams = list(self._streams)
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        self._sink = None
        self._status.set_state("stopped")
        if self._owns_http:
            await self._http.close()

    def status(self) -> AdapterStatus:
        """State for the dashboard and ``/readyz`` (no secrets)."""
        return self._status.snapshot(api_errors=self.api.permanent_errors)

    async def _identify(self) -> None:
        """``getMe`` until it answers: the username is needed for the group mention rule."""
        delays = self._delays()
        while True:
            try:
                me = await self.api.call("getMe", {})
                if not isinstance(me, dict) or not isinstance(me.get("id"), int):
                    raise TelegramApiError("getMe: answer lacks the bot's id")
                username = me.get("username")
                self.bot = BotIdentity(me["id"], username if isinstance(username, str) else "")
                break
            except TelegramApiError as exc:
                self._status.record_error(str(exc))
                refused = exc.error_code in (401, 403, 404)
                wait = self.config.identity_retry_s if refused else delays.next_delay()
                self._status.set_state(
                    "failed" if refused else "reconnecting", attempts=self._status.attempts + 1
                )
                log.warning("telegram.getme_failed", error=str(exc), retry_in_s=round(wait, 3))
                await asyncio.sleep(wait)
        log.info("telegram.identified", bot_id=self.bot.user_id, username=self.bot.username)
        if self.config.mode == "webhook":
            self._status.set_state("listening", attempts=0)
        self._identified.set()

    # --- inbound -------------------------------------------------------------------------------
    async def handle_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookResponse:
        """Answer one ``POST /webhooks/telegram``: check the secret, record, acknowledge.

        401 without the right ``X-Telegram-Bot-Api-Secret-Token`` (nothing is parsed); 400 for a
        malformed or oversized body; 200 once the sink recorded the message (or knew it), or for
        an update that is not for us; 503/500 while not ready or when the sink fails, so Telegram
        delivers again.
        """
        received = next((v for k, v in headers.items() if k.lower() == SECRET_HEADER), "")
        expected = self.config.webhook_secret.encode()
        if not hmac.compare_digest(received.encode("utf-8", "replace"), expected):
            self._status.count("rejected")
            log.warning("telegram.webhook_rejected", reason="bad_secret")
            return _error(401, "unauthorized", "secret token does not match")
        if len(body) > self.config.max_body_bytes:
            self._status.count("rejected")
            return _error(400, "too_large", f"body larger than {self.config.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            self._status.count("rejected")
            log.warning("telegram.webhook_rejected", reason="bad_json")
            return _error(400, "bad_json", "body is not JSON")
        if not isinstance(data, dict):
            self._status.count("rejected")
            return _error(400, "bad_json", "body is not a JSON object")
        if self.bot is None or self._sink is None:
            return _error(503, "not_ready", "the adapter is not ready")
        try:
            async with asyncio.timeout(self.config.sink_timeout_s):
                outcome = await self._process(data)
        except TimeoutError:
            log.warning("telegram.sink_timeout", update_id=update_id_of(data))
            return _error(503, "busy", "could not record the update in time")
        except SinkFailed:
            return _error(500, "internal", "could not record the update")
        if outcome == "rejected":
            return _error(400, "bad_update", "not a valid update")
        return WebhookResponse(200, {"ok": True})

    async def _on_update(self, data: object) -> None:
        """Polling: handle one update; raises (so it is not confirmed) when the sink failed."""
        await self._process(data)

    async def _process(self, data: object) -> EventOutcome | None:
        """Parse and record one update; the outcome, None when ignored.

        Raises:
            SinkFailed: the sink raised; the update must be delivered again.
        """
        assert self.bot is not None
        parsed = parse_update(
            data,
            self.bot,
            group_mode=self.config.group_mode,
            max_image_bytes=self.config.max_image_bytes,
            received_at=self._clock(),
        )
        if parsed.kind == "rejected":
            self._status.count("rejected")
            log.warning(
                "telegram.update_rejected", update_id=parsed.update_id, reason=parsed.reason
            )
            return "rejected"
        if parsed.kind == "ignored" or parsed.message is None:
            log.info("telegram.update_ignored", update_id=parsed.update_id, reason=parsed.reason)
            return None
        msg = parsed.message
        sink = self._sink
        if sink is None:
            raise SinkFailed("not started")
        try:
            is_new = await sink(msg)
        except Exception as exc:
            log.warning(
                "telegram.sink_failed",
                update_id=parsed.update_id,
                message_id=msg.message_id,
                error=type(exc).__name__,
            )
            raise SinkFailed(type(exc).__name__) from None
        outcome: EventOutcome = "accepted" if is_new else "duplicate"
        self._status.count(outcome)
        log.info(
            "telegram.update",
            outcome=outcome,
            update_id=parsed.update_id,
            message_id=msg.message_id,
            message_type=msg.message_type,
        )
        return outcome

    def _hold_chat(self, params: Mapping[str, object], seconds: float) -> None:
        """A 429 for one chat holds every other send and edit in that chat as long, plus one
        interval: the retried call itself goes out when the wait ends and takes that slot."""
        chat_id = params.get("chat_id")
        if isinstance(chat_id, int):
            self.pacer.hold(str(chat_id), seconds + self.config.edit_interval_s)

    # --- outbound ------------------------------------------------------------------------------
    async def fetch_image(self, msg: InboundMessage, ref: ImageRef) -> bytes:
        """``getFile`` then download it (at most ``max_image_bytes``).

        Raises:
            ImageFetchError: the image cannot be had; answer with a short apology.
        """
        try:
            info = await self.api.call("getFile", {"file_id": ref.key})
            path = info.get("file_path") if isinstance(info, dict) else None
            size = info.get("file_size") if isinstance(info, dict) else None
            if not isinstance(path, str) or not path or ".." in path.split("/"):
                raise TelegramApiError("getFile: no usable file_path")
            if isinstance(size, int) and size > self.config.max_image_bytes:
                raise TelegramApiError(f"getFile: file of {size} bytes is over the limit")
            return await self.api.download(path)
        except TelegramApiError as exc:
            raise ImageFetchError(f"image of {msg.message_id}: {exc}") from None

    async def open_reply(
        self, msg: InboundMessage, existing_reply_id: str | None = None
    ) -> TelegramReplyStream:
        """Post the reply that will carry the answer, or bind to the one posted before.

        With ``existing_reply_id`` nothing is posted: the first update edits that message.

        Raises:
            ReplyError: the reply could not be posted.
        """
        if existing_reply_id is not None:
            reply_id = existing_reply_id
            log.info("telegram.reply_resumed", message_id=msg.message_id, reply_id=reply_id)
        else:
            reply_id = await self._send(msg, PLACEHOLDER)
            log.info("telegram.reply_opened", message_id=msg.message_id, reply_id=reply_id)
        stream = TelegramReplyStream(
            self.api,
            self.pacer,
            chat_id=msg.chat_id,
            source_id=msg.message_id,
            reply_message_id=reply_id,
        )
        self._streams.add(stream)
        return stream

    async def send_text_reply(self, msg: InboundMessage, text: str) -> None:
        """Reply once with plain text (the relay remembers that it was sent).

        Raises:
            ReplyError: the reply could not be posted.
        """
        await self._send(msg, fit_text(text))

    async def _send(self, msg: InboundMessage, text: str) -> str:
        params = {
            "chat_id": int(msg.chat_id),
            "text": text,
            "reply_parameters": {
                "message_id": telegram_message_id(msg),
                "allow_sending_without_reply": True,
            },
        }
        try:
            await self.pacer.wait(msg.chat_id)
            sent = await self.api.call("sendMessage", params)
        except TelegramApiError as exc:
            raise ReplyError(f"reply to {msg.message_id}: {exc}") from None
        reply_id = sent.get("message_id") if isinstance(sent, dict) else None
        if not isinstance(reply_id, int):
            raise ReplyError(f"reply to {msg.message_id}: answer lacks message_id")
        return str(reply_id)


def _error(status: int, code: str, message: str) -> WebhookResponse:
    return WebhookResponse(status, {"ok": False, "error": {"code": code, "message": message}})
