"""Telegram's conformance harness: webhook mode over ``FakeTelegram``.

Updates are Bot API ``Update`` objects with a ``message`` in a private chat (chat id = the user's
id). A photo arrives as Telegram sends one (a ``photo`` list of PhotoSize, largest last); bytes
that are not a JPEG arrive as a ``document`` with an image MIME type, which is how a client sends
a file it calls a picture (Telegram re-encodes every photo, so a ``photo`` is always a JPEG).
Telegram POSTs each update to the webhook with ``X-Telegram-Bot-Api-Secret-Token``; a 2xx is
the ack, and a re-delivery is the same update (same ``update_id``) posted again.

Telegram's ``message_id`` is unique only within its chat, so the bridge names a message
``<chat id>:<message_id>``; ``new_message_id`` returns that form for the chat made last by
``new_chat`` (the suite always asks for a chat, then its message).
"""

from __future__ import annotations

import itertools
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
from tests.adapters.telegram.fake_telegram import (
    TOKEN,
    FakeTelegram,
    message,
    photo_sizes,
    user,
)

WEBHOOK_SECRET = "conformance-telegram-secret_R8"
_METHODS: dict[Method, str] = {"reply": "sendMessage", "edit": "editMessageText"}
_PLACEHOLDER = "…"  # what the adapter posts before the model wrote anything
_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


class TelegramWebhookHarness:
    """Telegram POSTs updates to ``/webhooks/telegram``; the HTTP 200 is the ack."""

    name = "telegram-webhook"
    platform = "telegram"
    long_connection = False
    # Telegram asks bots not to send more than one message a second in one chat (edits count),
    # short bursts tolerated. The adapter paces to exactly one a second, so two paced sends can
    # land a few ms under a second apart on loopback; two in a second is the check (an unpaced
    # stream sends many more), as for Slack.
    edit_rate = EditRate(max_edits=2, per_s=1.0)
    streaming: Streaming = "edits"

    def __init__(self) -> None:
        self.fake = FakeTelegram()
        self._ids = itertools.count(1)
        self._chat = ""
        self._url = ""

    async def start(self) -> None:
        await self.fake.start()

    async def stop(self) -> None:
        await self.fake.stop()

    def bridge_args(self) -> list[str]:
        return [
            "--telegram-mode", "webhook",
            "--telegram-token", TOKEN,
            "--telegram-base-url", self.fake.base_url,
            "--telegram-webhook-secret", WEBHOOK_SECRET,
        ]  # fmt: skip

    def attach(self, bridge_base_url: str) -> None:
        self._url = bridge_base_url + "/webhooks/telegram"

    def secrets(self) -> list[str]:
        return [TOKEN, WEBHOOK_SECRET]

    def new_chat(self) -> str:
        self._chat = str(7_000_000 + next(self._ids))
        return self._chat

    def new_message_id(self) -> str:
        assert self._chat, "new_chat comes first: a Telegram message id names its chat"
        return f"{self._chat}:{next(self._ids)}"

    async def deliver_image(
        self, chat: str, message_id: str, image: bytes, text: str = ""
    ) -> Delivery:
        chat_id, mid = _split(chat, message_id)
        file_id = f"conf-{chat_id}-{mid}"
        caption = text or None
        if image.startswith(_JPEG):
            sizes = photo_sizes(file_id, (max(1, len(image) // 16), len(image)))
            self.fake.add_file(sizes[-1]["file_id"], image)
            msg = self._message(chat_id, mid, caption=caption, photo=sizes)
        else:
            mime = "image/png" if image.startswith(_PNG) else "image/jpeg"
            self.fake.add_file(file_id, image, f"documents/{file_id}")
            document = {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "file_name": "picture.png" if mime == "image/png" else "picture.jpg",
                "mime_type": mime,
                "file_size": len(image),
            }
            msg = self._message(chat_id, mid, caption=caption, document=document)
        return await self._post_new(chat, message_id, msg)

    async def deliver_text(self, chat: str, message_id: str, text: str) -> Delivery:
        chat_id, mid = _split(chat, message_id)
        return await self._post_new(chat, message_id, self._message(chat_id, mid, text=text))

    async def redeliver(self, delivery: Delivery) -> None:
        delivery.deliveries += 1
        delivery.data["status"] = await self._post(_update(delivery))

    async def acked(self, delivery: Delivery) -> bool:
        return delivery.data.get("status") == 200

    def replies(self, chat: str) -> list[BotReply]:
        chat_id = int(chat)
        out = []
        for sent in self.fake.sent:
            if sent.chat_id != chat_id:
                continue
            reply_to = f"{chat}:{sent.reply_to}" if sent.reply_to is not None else ""
            first = Version(sent.posted_at, _shown(sent.posted_text))
            edits = [Version(at, _shown(text)) for at, text in sent.edits]
            out.append(BotReply(str(sent.message_id), chat, reply_to, [first, *edits]))
        return out

    def inject_429(self, method: Method, retry_after_s: float) -> Throttle:
        # Telegram states whole seconds in the error's parameters.retry_after.
        stated = math.ceil(retry_after_s)
        fault = self.fake.fail_next(_METHODS[method], status=429, retry_after=stated)
        return Throttle(method, float(stated), lambda: fault.served_at)

    async def take_down(self) -> None:
        raise NotImplementedError("a webhook has no link to take down")

    async def bring_up(self) -> None:
        raise NotImplementedError("a webhook has no link to bring up")

    def _message(self, chat_id: int, mid: int, **fields: Any) -> dict[str, Any]:
        msg = message(mid, chat_id=chat_id, chat_type="private", **fields)
        msg["from"] = user(chat_id, f"conf{chat_id}")  # in a private chat, the chat is the user
        return msg

    async def _post_new(self, chat: str, message_id: str, msg: dict[str, Any]) -> Delivery:
        update = {"update_id": self.fake.new_update_id(), "message": msg}
        delivery = Delivery(chat, message_id, {"update": update})
        delivery.data["status"] = await self._post(update)
        return delivery

    async def _post(self, update: dict[str, Any]) -> int:
        status, _body = await self.fake.post_webhook(self._url, update, WEBHOOK_SECRET)
        return status


def _split(chat: str, message_id: str) -> tuple[int, int]:
    """Telegram's chat id and per-chat message_id of a ``<chat>:<message_id>`` id."""
    prefix, _, mid = message_id.rpartition(":")
    assert prefix == chat, f"message {message_id} is not in chat {chat}"
    return int(chat), int(mid)


def _update(delivery: Delivery) -> dict[str, Any]:
    update = delivery.data["update"]
    assert isinstance(update, dict)
    return update


def _shown(text: str) -> str:
    """The answer as the user reads it: the placeholder is no answer yet."""
    return "" if text == _PLACEHOLDER else text
