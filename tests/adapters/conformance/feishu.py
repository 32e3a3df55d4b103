"""Feishu's conformance harnesses: webhook mode and long-connection mode over ``FakeFeishu``.

Events are built as Feishu documents ``im.message.receive_v1`` (schema 2.0). The webhook harness
encrypts and signs each callback as Feishu does with an Encrypt Key (AES-256-CBC with the key's
SHA-256, random IV in front, base64; ``X-Lark-Signature`` = hex SHA-256 of timestamp + nonce +
key + body); the long-connection harness pushes the event as pbbp2 frames through the fake
gateway. Replies are read back from the fake's records of ``reply`` and ``PATCH`` calls.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import time
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.adapters.conformance.harness import (
    BotReply,
    Delivery,
    EditRate,
    Method,
    Streaming,
    Throttle,
    Version,
)
from tests.adapters.fake_feishu import APP_ID, APP_SECRET, FakeFeishu

VERIFICATION_TOKEN = "conformance-verification-token-Q7"
ENCRYPT_KEY = "conformance-encrypt-key-W3"
_ROUTES: dict[Method, str] = {"reply": "reply", "edit": "patch"}
_CURSOR = " ▌"
_PLACEHOLDERS = ("…", " ", "")


class _FeishuBase:
    """What both modes share: the fake, event bodies, reading replies back, faults, secrets."""

    name = "feishu"
    platform = "feishu"
    long_connection = False
    # Feishu: a message may be updated at most 5 times a second.
    edit_rate = EditRate(max_edits=5, per_s=1.0)
    streaming: Streaming = "edits"

    def __init__(self) -> None:
        self.fake = FakeFeishu()
        self._ids = itertools.count(1)
        self._chat_of: dict[str, str] = {}  # user message id -> chat
        self._events = itertools.count(1)

    async def start(self) -> None:
        await self.fake.start()

    async def stop(self) -> None:
        await self.fake.stop()

    def common_args(self, mode: str) -> list[str]:
        return [
            "--feishu-mode", mode,
            "--feishu-app-id", APP_ID,
            "--feishu-app-secret", APP_SECRET,
            "--feishu-base-url", self.fake.base_url,
        ]  # fmt: skip

    def attach(self, bridge_base_url: str) -> None:
        del bridge_base_url

    def secrets(self) -> list[str]:
        issued = [f"t-fake-{i}" for i in range(1, self.fake.tokens_issued + 1)]
        return [APP_SECRET, VERIFICATION_TOKEN, ENCRYPT_KEY, *issued, *self.fake.ws_credentials]

    def new_chat(self) -> str:
        return f"oc_conf{next(self._ids):06d}"

    def new_message_id(self) -> str:
        return f"om_conf{next(self._ids):06d}"

    def event(self, chat: str, message_id: str, message_type: str, content: Any) -> bytes:
        """An ``im.message.receive_v1`` callback body, as Feishu sends it."""
        self._chat_of[message_id] = chat
        now_ms = str(int(time.time() * 1000))
        body = {
            "schema": "2.0",
            "header": {
                "event_id": f"ev_conf{next(self._events):06d}",
                "event_type": "im.message.receive_v1",
                "create_time": now_ms,
                "token": VERIFICATION_TOKEN,
                "app_id": APP_ID,
                "tenant_key": "tenant_conf",
            },
            "event": {
                "sender": {
                    "sender_id": {"open_id": "ou_conformance", "user_id": "u_conf"},
                    "sender_type": "user",
                    "tenant_key": "tenant_conf",
                },
                "message": {
                    "message_id": message_id,
                    "root_id": "",
                    "parent_id": "",
                    "create_time": now_ms,
                    "chat_id": chat,
                    "chat_type": "group",
                    "message_type": message_type,
                    "content": json.dumps(content, ensure_ascii=False),
                    "mentions": [],
                },
            },
        }
        return json.dumps(body, ensure_ascii=False).encode()

    def image_event(self, chat: str, message_id: str, image: bytes, text: str) -> bytes:
        key = f"img_v3_conf_{message_id}"
        self.fake.images[key] = image
        if not text:
            return self.event(chat, message_id, "image", {"image_key": key})
        # A photo with words is a rich-text "post" in Feishu: an img element, then the text.
        post = {
            "title": "",
            "content": [[{"tag": "img", "image_key": key}], [{"tag": "text", "text": text}]],
        }
        return self.event(chat, message_id, "post", post)

    def replies(self, chat: str) -> list[BotReply]:
        out: list[BotReply] = []
        for reply in self.fake.replies:
            if self._chat_of.get(reply.parent_id) != chat:
                continue
            versions = [Version(reply.posted_at, _shown(reply.msg_type, reply.content))]
            versions += [
                Version(at, _shown("interactive", content))
                for at, mid, content in self.fake.patches
                if mid == reply.message_id
            ]
            out.append(BotReply(reply.message_id, chat, reply.parent_id, versions))
        return out

    def inject_429(self, method: Method, retry_after_s: float) -> Throttle:
        # Feishu states whole seconds in x-ogw-ratelimit-reset, with code 99991400 in the body.
        stated = math.ceil(retry_after_s)
        fault = self.fake.fail_next(
            _ROUTES[method], status=429, code=99991400, x_ogw_ratelimit_reset=str(stated)
        )
        return Throttle(method, float(stated), lambda: fault.served_at)

    async def take_down(self) -> None:
        raise NotImplementedError("a webhook has no link to take down")

    async def bring_up(self) -> None:
        raise NotImplementedError("a webhook has no link to bring up")


def _shown(msg_type: str, content: str) -> str:
    """The answer text a Feishu user reads in a text message or an answer card."""
    data = json.loads(content)
    if msg_type == "text":
        return str(data["text"])
    body = str(data["elements"][0]["text"]["content"])
    if body.endswith(_CURSOR):
        body = body[: -len(_CURSOR)]
    return "" if body in _PLACEHOLDERS else body


class FeishuWebhookHarness(_FeishuBase):
    """Feishu POSTs encrypted, signed callbacks to ``/webhooks/feishu``; a 200 is the ack."""

    name = "feishu-webhook"

    def __init__(self) -> None:
        super().__init__()
        self._url = ""

    def bridge_args(self) -> list[str]:
        return [
            *self.common_args("webhook"),
            "--feishu-verification-token", VERIFICATION_TOKEN,
            "--feishu-encrypt-key", ENCRYPT_KEY,
        ]  # fmt: skip

    def attach(self, bridge_base_url: str) -> None:
        self._url = bridge_base_url + "/webhooks/feishu"

    async def deliver_image(
        self, chat: str, message_id: str, image: bytes, text: str = ""
    ) -> Delivery:
        return await self._post_new(
            chat, message_id, self.image_event(chat, message_id, image, text)
        )

    async def deliver_text(self, chat: str, message_id: str, text: str) -> Delivery:
        return await self._post_new(
            chat, message_id, self.event(chat, message_id, "text", {"text": text})
        )

    async def redeliver(self, delivery: Delivery) -> None:
        delivery.deliveries += 1
        delivery.data["status"] = await self._post(_bytes(delivery.data["body"]))

    async def acked(self, delivery: Delivery) -> bool:
        return delivery.data.get("status") == 200

    async def _post_new(self, chat: str, message_id: str, plain: bytes) -> Delivery:
        body = json.dumps({"encrypt": _encrypt(ENCRYPT_KEY, plain)}).encode()
        delivery = Delivery(chat, message_id, {"body": body})
        delivery.data["status"] = await self._post(body)
        return delivery

    async def _post(self, body: bytes) -> int:
        timestamp, nonce = str(int(time.time())), os.urandom(8).hex()
        signature = hashlib.sha256((timestamp + nonce + ENCRYPT_KEY).encode() + body).hexdigest()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "X-Lark-Request-Timestamp": timestamp,
            "X-Lark-Request-Nonce": nonce,
            "X-Lark-Signature": signature,
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(self._url, data=body, headers=headers) as resp,
        ):
            await resp.read()
            return resp.status


class FeishuLongConnHarness(_FeishuBase):
    """The bridge dials Feishu's gateway; events arrive as frames and are acked with code 200."""

    name = "feishu-longconn"
    long_connection = True

    async def start(self) -> None:
        await super().start()
        # Feishu's ClientConfig sets the reconnect waits; short ones keep the outage test fast.
        self.fake.client_config.update({"ReconnectInterval": 1, "ReconnectNonce": 1})

    def bridge_args(self) -> list[str]:
        return self.common_args("longconn")

    async def deliver_image(
        self, chat: str, message_id: str, image: bytes, text: str = ""
    ) -> Delivery:
        return await self._push_new(
            chat, message_id, self.image_event(chat, message_id, image, text)
        )

    async def deliver_text(self, chat: str, message_id: str, text: str) -> Delivery:
        return await self._push_new(
            chat, message_id, self.event(chat, message_id, "text", {"text": text})
        )

    async def redeliver(self, delivery: Delivery) -> None:
        delivery.deliveries += 1
        await self.fake.gateway.push(str(delivery.data["frame"]), _bytes(delivery.data["body"]))

    async def acked(self, delivery: Delivery) -> bool:
        frame = delivery.data["frame"]
        acks = sum(1 for mid, code in self.fake.gateway.acks if mid == frame and code == 200)
        return acks >= delivery.deliveries

    async def _push_new(self, chat: str, message_id: str, payload: bytes) -> Delivery:
        frame = f"ws_{message_id}"  # the frame header's message_id: the same on a re-delivery
        await self.fake.gateway.push(frame, payload)
        return Delivery(chat, message_id, {"frame": frame, "body": payload})

    async def take_down(self) -> None:
        await self.fake.gateway.stop()

    async def bring_up(self) -> None:
        await self.fake.gateway.start()


def _encrypt(key: str, plain: bytes) -> str:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    iv = os.urandom(16)
    encryptor = Cipher(
        algorithms.AES(hashlib.sha256(key.encode()).digest()), modes.CBC(iv)
    ).encryptor()
    return base64.b64encode(iv + encryptor.update(padded) + encryptor.finalize()).decode()


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes)
    return value
