"""WeCom's conformance harness: callback mode over ``FakeWeCom``.

Messages reach the bridge as WeCom callbacks (XML, AES-256-CBC with the EncodingAESKey and its
first 16 bytes as IV, ``msg_signature`` = SHA-1 of the sorted token, timestamp, nonce and
ciphertext); an HTTP 200 is the ack. WeCom cannot edit a sent app message, so the adapter sends a
placeholder text first and the answer as a follow-up text: :meth:`WeComHarness.replies` reports
the placeholder as a reply's post (text "") and each follow-up as its next version (the texts so
far, joined, as the user reads them). A chat is the user (an app message goes to ``touser``), and
app messages do not quote the message they answer, so a reply is the answer to the latest
message the user sent before it.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.adapters.conformance.harness import (
    BotReply,
    Delivery,
    EditRate,
    Method,
    Streaming,
    Throttle,
    Version,
)
from tests.adapters.wecom.fake_wecom import (
    AES_KEY,
    AGENT_ID,
    CORP_ID,
    SECRET,
    TOKEN,
    CallbackSender,
    FakeWeCom,
    image_message,
    message_xml,
    text_message,
)

#: The adapter's default placeholder (``WeComConfig.placeholder``), sent before every answer.
PLACEHOLDER = "Looking at your photo…"


@dataclass
class _Shown:
    """A reply being assembled from the fake's sends."""

    reply_id: str
    reply_to: str
    versions: list[Version]
    answer: str = ""


class WeComHarness:
    """WeCom POSTs encrypted, signed callbacks to ``/webhooks/wecom``; a 200 is the ack."""

    name = "wecom-webhook"
    platform = "wecom"
    long_connection = False
    # A sent app message cannot be edited: placeholder, then the answer as a follow-up text.
    streaming: Streaming = "placeholder"
    # WeCom: an app may send one member at most 30 messages a minute (beyond that they are
    # dropped); the follow-ups of one reply are held to it.
    edit_rate = EditRate(max_edits=30, per_s=60.0)

    def __init__(self) -> None:
        self.fake = FakeWeCom()
        self._sender = CallbackSender()
        self._ids = itertools.count(1)
        self._base = ""
        self._asked: dict[str, list[tuple[float, str]]] = {}  # chat -> (loop time, message id)

    async def start(self) -> None:
        await self.fake.start()

    async def stop(self) -> None:
        await self.fake.stop()

    def bridge_args(self) -> list[str]:
        return [
            "--wecom-mode", "webhook",
            "--wecom-corp-id", CORP_ID,
            "--wecom-agent-id", AGENT_ID,
            "--wecom-secret", SECRET,
            "--wecom-token", TOKEN,
            "--wecom-aes-key", AES_KEY,
            "--wecom-base-url", self.fake.base_url,
        ]  # fmt: skip

    def attach(self, bridge_base_url: str) -> None:
        self._base = bridge_base_url

    def secrets(self) -> list[str]:
        return [SECRET, TOKEN, AES_KEY, *self.fake.issued_tokens]

    def new_chat(self) -> str:
        return f"conf_user{next(self._ids):06d}"

    def new_message_id(self) -> str:
        # MsgId is a 64-bit number in WeCom's callbacks.
        return str(7_300_000_000_000_000_000 + next(self._ids))

    async def deliver_image(
        self, chat: str, message_id: str, image: bytes, text: str = ""
    ) -> Delivery:
        # A WeCom message is a photo or a text, never both: a question cannot travel with it.
        del text
        media_id = f"media_conf_{message_id}"
        self.fake.media[media_id] = (image, "image/jpeg")
        return await self._deliver_new(
            chat, message_id, image_message(int(message_id), media_id, user=chat)
        )

    async def deliver_text(self, chat: str, message_id: str, text: str) -> Delivery:
        return await self._deliver_new(
            chat, message_id, text_message(int(message_id), text, user=chat)
        )

    async def redeliver(self, delivery: Delivery) -> None:
        delivery.deliveries += 1
        fields = delivery.data["fields"]
        assert isinstance(fields, dict)
        delivery.data["status"] = await self._post(fields)

    async def acked(self, delivery: Delivery) -> bool:
        return delivery.data.get("status") == 200

    async def _deliver_new(self, chat: str, message_id: str, fields: dict[str, Any]) -> Delivery:
        self._asked.setdefault(chat, []).append((asyncio.get_running_loop().time(), message_id))
        delivery = Delivery(chat, message_id, {"fields": fields})
        delivery.data["status"] = await self._post(fields)
        return delivery

    async def _post(self, fields: dict[str, Any]) -> int:
        """One callback, freshly signed (WeCom signs each retry with a new timestamp)."""
        req = self._sender.sign_message(message_xml(fields))
        async with (
            aiohttp.ClientSession() as http,
            http.post(self._base + "/webhooks/wecom", params=req.query, data=req.body) as resp,
        ):
            await resp.read()
            return resp.status

    def replies(self, chat: str) -> list[BotReply]:
        out: list[_Shown] = []
        open_reply: _Shown | None = None
        for sent in self.fake.sent:
            if sent.touser != chat:
                continue
            if sent.content == PLACEHOLDER:
                open_reply = _Shown(sent.msgid, self._answering(chat, sent.loop_at), [])
                open_reply.versions.append(Version(sent.loop_at, ""))
                out.append(open_reply)
            elif open_reply is not None:  # a follow-up of the placeholder: the answer
                open_reply.answer += sent.content
                open_reply.versions.append(Version(sent.loop_at, open_reply.answer))
            else:  # a text reply of its own (help text, apology)
                reply_to = self._answering(chat, sent.loop_at)
                out.append(_Shown(sent.msgid, reply_to, [Version(sent.loop_at, sent.content)]))
        return [BotReply(r.reply_id, chat, r.reply_to, r.versions) for r in out]

    def _answering(self, chat: str, at: float) -> str:
        """The user's latest message sent before ``at``: the one a text sent then answers."""
        before = [mid for when, mid in self._asked.get(chat, []) if when <= at]
        return before[-1] if before else ""

    def inject_429(self, method: Method, retry_after_s: float) -> Throttle:
        # WeCom answers a frequency limit with errcode 45009 and states no wait: it refuses
        # until its window frees up. The fake refuses every such call for the window.
        def is_followup(body: dict[str, Any]) -> bool:
            before = [s for s in self.fake.sent if s.touser == body.get("touser")]
            return bool(before) and before[-1].content == PLACEHOLDER

        def matches(body: dict[str, Any]) -> bool:
            return is_followup(body) == (method == "edit")

        limit = self.fake.limit_sends(matches, retry_after_s)
        return Throttle(method, retry_after_s, lambda: limit.served_at)

    async def take_down(self) -> None:
        raise NotImplementedError("a webhook has no link to take down")

    async def bring_up(self) -> None:
        raise NotImplementedError("a webhook has no link to bring up")
