"""Bot message callbacks (``/v1.0/im/bot/messages/get``) turned into the bridge's messages.

The callback ``data`` holds ``msgtype`` (``text``, ``picture``, ``richText``, ...), ``msgId``,
``conversationId``, ``conversationType`` (``"1"`` single chat, ``"2"`` group), the sender, the
``robotCode`` and a ``sessionWebhook`` the robot may post its answer to until
``sessionWebhookExpiredTime`` (epoch milliseconds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters.base import ImageRef, InboundMessage

PLATFORM = "dingtalk"
MAX_TEXT_CHARS = 8000
MAX_IMAGES = 16


class MessageError(ValueError):
    """A callback lacks what a bot message must have; the text never quotes user content."""


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    """Where the answer to one message goes (kept in memory; never logged whole)."""

    conversation_id: str
    single_chat: bool
    sender_staff_id: str
    robot_code: str
    session_webhook: str
    webhook_expires_ms: int


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


def _millis(value: object) -> int:
    """An epoch-milliseconds field (a number or digits); 0, i.e. expired, when unusable."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and math.isfinite(value):
        return max(int(value), 0)
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    return 0


def to_inbound(
    data: Mapping[str, Any], *, received_at: float
) -> tuple[InboundMessage, ReplyTarget]:
    """The message and its reply target.

    Raises:
        MessageError: ``msgId`` or ``conversationId`` is missing.
    """
    msg_id = _text(data, "msgId")
    conversation = _text(data, "conversationId")
    if not msg_id or not conversation:
        raise MessageError("bot message lacks msgId or conversationId")
    msgtype = _text(data, "msgtype")
    texts: list[str] = []
    codes: list[str] = []
    content = data.get("content")
    if msgtype == "text":
        text = data.get("text")
        if isinstance(text, dict) and isinstance(text.get("content"), str):
            texts.append(text["content"])
    elif msgtype == "picture" and isinstance(content, dict):
        code = content.get("downloadCode")
        if isinstance(code, str) and code:
            codes.append(code)
    elif msgtype == "richText" and isinstance(content, dict):
        items = content.get("richText")
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("text"), str):
                texts.append(item["text"])
            code = item.get("downloadCode")
            if isinstance(code, str) and code:
                codes.append(code)
    single = _text(data, "conversationType") == "1"
    sender = _text(data, "senderStaffId") or _text(data, "senderId")
    msg = InboundMessage(
        platform=PLATFORM,
        chat_id=conversation,
        message_id=msg_id,
        event_id="",
        sender_id=sender,
        text=" ".join(t.strip() for t in texts if t.strip())[:MAX_TEXT_CHARS],
        images=tuple(ImageRef(key=c, kind="downloadCode") for c in codes[:MAX_IMAGES]),
        message_type=msgtype,
        received_at=received_at,
        chat_type="p2p" if single else "group",
    )
    target = ReplyTarget(
        conversation_id=conversation,
        single_chat=single,
        sender_staff_id=sender,
        robot_code=_text(data, "robotCode"),
        session_webhook=_text(data, "sessionWebhook"),
        webhook_expires_ms=_millis(data.get("sessionWebhookExpiredTime")),
    )
    return msg, target
