"""DingTalk's conformance harness: Stream mode with AI-card answers, over ``FakeDingTalk``.

The bridge dials the fake's stream gateway (``connections/open`` ticket, then a WebSocket);
each user message is a ``CALLBACK`` frame on topic ``/v1.0/im/bot/messages/get`` whose ``data``
is a group bot message (``conversationType`` "2"), acked by a client frame with code 200 and
re-sent under the same frame ``messageId`` (on reconnect, or here when the platform doubts the
ack). A plain robot message cannot be edited, so answers are streamed in an AI card
(``--dingtalk-card-template-id``): the card's create is the "reply", each ``PUT
/v1.0/card/streaming`` and ``PUT /v1.0/card/instances`` that sets the text is an "edit". Text
answers (the help text) are plain messages through the sessionWebhook or the robot API.

DingTalk has no quoted replies: an answer follows the message in its conversation, so a reply's
``reply_to`` is the latest user message delivered in that chat before the answer was posted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from typing import Any

from tests.adapters.conformance.harness import (
    BotReply,
    Delivery,
    EditRate,
    Method,
    Streaming,
    Throttle,
    Version,
)
from tests.adapters.dingtalk.fake_dingtalk import (
    CLIENT_ID,
    CLIENT_SECRET,
    Card,
    FakeDingTalk,
    Sent,
    bot_message,
)

CARD_TEMPLATE_ID = "conformance-card-template.schema"
CONTENT_KEY = "content"
_ROUTES: dict[Method, str] = {"reply": "card_create", "edit": "card_stream"}


class DingTalkStreamHarness:
    """The bridge holds DingTalk's stream; answers stream into AI cards in the group."""

    name = "dingtalk-stream"
    platform = "dingtalk"
    long_connection = True
    # DingTalk publishes no per-card update limit, only per-app API QPS limits (answered with
    # Forbidden.AccessDenied.QpsLimitForApi); the suite holds the adapter to 5 updates a second.
    edit_rate = EditRate(max_edits=5, per_s=1.0)
    streaming: Streaming = "edits"

    def __init__(self) -> None:
        self.fake = FakeDingTalk()
        self._ids = itertools.count(1)
        # chat -> [(loop time delivered, user message id)], oldest first
        self._asked: dict[str, list[tuple[float, str]]] = {}
        self._webhook_chat: dict[str, str] = {}  # sessionWebhook URL -> its chat

    async def start(self) -> None:
        await self.fake.start()

    async def stop(self) -> None:
        await self.fake.stop()

    def bridge_args(self) -> list[str]:
        return [
            "--dingtalk-mode", "stream",
            "--dingtalk-client-id", CLIENT_ID,
            "--dingtalk-client-secret", CLIENT_SECRET,
            "--dingtalk-base-url", self.fake.base_url,
            "--dingtalk-card-template-id", CARD_TEMPLATE_ID,
            "--dingtalk-card-content-key", CONTENT_KEY,
        ]  # fmt: skip

    def attach(self, bridge_base_url: str) -> None:
        del bridge_base_url  # the bridge connects out

    def secrets(self) -> list[str]:
        issued = [f"tok-{i}-SECRETTOKEN" for i in range(1, self.fake.tokens_issued + 1)]
        return [CLIENT_SECRET, *issued]

    def new_chat(self) -> str:
        return f"cidCONF{next(self._ids):06d}=="

    def new_message_id(self) -> str:
        return f"msgCONF{next(self._ids):06d}=="

    async def deliver_image(
        self, chat: str, message_id: str, image: bytes, text: str = ""
    ) -> Delivery:
        code = f"dlcode-conf-{message_id}"
        self.fake.files[code] = image
        # A photo alone is a "picture"; a photo with words is "richText" (text, then picture).
        kind = "richText" if text else "picture"
        return await self._push_new(chat, message_id, kind, download_code=code, text=text)

    async def deliver_text(self, chat: str, message_id: str, text: str) -> Delivery:
        return await self._push_new(chat, message_id, "text", text=text)

    async def redeliver(self, delivery: Delivery) -> None:
        delivery.deliveries += 1
        data = delivery.data["data"]
        assert isinstance(data, dict)
        await self.fake.push_callback(data, message_id=str(delivery.data["frame"]))

    async def acked(self, delivery: Delivery) -> bool:
        acks = [a for a in self.fake.acks_for(str(delivery.data["frame"])) if a.get("code") == 200]
        return len(acks) >= delivery.deliveries

    async def _push_new(self, chat: str, message_id: str, kind: str, **fields: Any) -> Delivery:
        data = bot_message(
            self.fake, msg_id=message_id, msgtype=kind, conversation_id=chat, **fields
        )
        frame = f"cb_{message_id}"  # the frame's messageId: the same on every re-delivery
        self._asked.setdefault(chat, []).append((_now(), message_id))
        self._webhook_chat[str(data["sessionWebhook"])] = chat
        await self.fake.push_callback(data, message_id=frame)
        return Delivery(chat, message_id, {"frame": frame, "data": data})

    def replies(self, chat: str) -> list[BotReply]:
        out = [self._card(chat, c) for c in self.fake.cards.values() if _card_chat(c) == chat]
        out += [
            BotReply(f"sent-{i}", chat, self._reply_to(chat, s.at), [Version(s.at, _sent_text(s))])
            for i, s in enumerate(self.fake.sent)
            if self._sent_chat(s) == chat
        ]
        return sorted(out, key=lambda r: r.posted_at)

    def _card(self, chat: str, card: Card) -> BotReply:
        params = card.create["cardData"]["cardParamMap"]
        versions = [Version(card.created_at, str(params.get(CONTENT_KEY, "")))]
        # (loop time, text set or None, whether it is an instance update), in arrival order
        changes: list[tuple[float, Any, bool]] = [
            (at, str(body["content"]), False)
            for at, body in zip(card.stream_times, card.streams, strict=True)
        ]
        changes += [
            (at, u["cardData"]["cardParamMap"].get(CONTENT_KEY), True)
            for at, u in zip(card.update_times, card.updates, strict=True)
        ]
        for at, text, update in sorted(changes, key=lambda c: c[0]):
            # An instance update that sets no text, or the text already shown (the closing
            # flowStatus), changes only the card's status line, not the answer the user reads.
            if text is None or (update and text == versions[-1].text):
                continue
            versions.append(Version(at, str(text)))
        track = str(card.create["outTrackId"])
        return BotReply(track, chat, self._reply_to(chat, card.created_at), versions)

    def _sent_chat(self, sent: Sent) -> str:
        """The robot API names the chat; a sessionWebhook is the one handed out with a message
        of that chat."""
        if sent.via == "webhook":
            return self._webhook_chat.get(sent.url, "")
        return str(sent.body.get("openConversationId", ""))

    def _reply_to(self, chat: str, posted_at: float) -> str:
        earlier = [mid for at, mid in self._asked.get(chat, []) if at <= posted_at]
        return earlier[-1] if earlier else ""

    def inject_429(self, method: Method, retry_after_s: float) -> Throttle:
        # The API gateway answers 429 with the QPS-limit code; the wait is in whole seconds.
        stated = math.ceil(retry_after_s)
        fault = self.fake.fail_next(
            _ROUTES[method],
            429,
            {"code": "Forbidden.AccessDenied.QpsLimitForApi", "message": "qps limit"},
            {"Retry-After": str(stated)},
        )
        return Throttle(method, float(stated), lambda: fault.served_at)

    async def take_down(self) -> None:
        await self.fake.take_down()

    async def bring_up(self) -> None:
        self.fake.bring_up()


def _now() -> float:
    return asyncio.get_running_loop().time()


def _card_chat(card: Card) -> str:
    space = str(card.create.get("openSpaceId", ""))
    return space.removeprefix("dtv1.card//IM_GROUP.")


def _sent_text(sent: Sent) -> str:
    """The text a DingTalk user reads in a sent text or markdown message."""
    body = sent.body
    if sent.via == "webhook":
        kind = body["msgtype"]
        return str(body["text"]["content"] if kind == "text" else body["markdown"]["text"])
    param = json.loads(body["msgParam"])
    return str(param.get("content", param.get("text", "")))
