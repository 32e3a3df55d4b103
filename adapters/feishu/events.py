"""Turns Feishu event envelopes (schema 2.0) into the bridge's :class:`InboundMessage`.

Shared by the webhook and the long connection, which deliver the same JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from adapters.base import ImageRef, InboundMessage

MESSAGE_RECEIVE = "im.message.receive_v1"
_MENTION = re.compile(r"@_user_\d+")
_MAX_IMAGES = 9
_MAX_TEXT_CHARS = 4000


class EventFormatError(ValueError):
    """The event JSON does not have the shape Feishu documents."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """The parts of an event callback the adapter routes on.

    Attributes:
        event_type: e.g. ``im.message.receive_v1`` (empty for a URL check).
        event_id: the delivery's id (schema 2.0 header) or ``uuid`` (schema 1.0).
        token: the verification token the event carries.
        event: the ``event`` object.
    """

    event_type: str
    event_id: str
    token: str
    event: dict[str, Any]


def parse_envelope(data: dict[str, Any]) -> Envelope:
    """Read the routing fields of a decoded callback body (schema 2.0, or 1.0 for old apps).

    Raises:
        EventFormatError: required fields are missing or of the wrong type.
    """
    header = data.get("header")
    if isinstance(header, dict):
        event_type = header.get("event_type")
        event_id = header.get("event_id", "")
        token = header.get("token", "")
    else:
        event_type = _get_dict(data, "event").get("type", data.get("type"))
        event_id = data.get("uuid", "")
        token = data.get("token", "")
    if not isinstance(event_type, str) or not isinstance(event_id, str):
        raise EventFormatError("event header lacks event_type or event_id")
    if not isinstance(token, str):
        raise EventFormatError("event token is not a string")
    return Envelope(
        event_type=valid_text(event_type),
        event_id=valid_text(event_id),
        token=valid_text(token),
        event=_get_dict(data, "event"),
    )


def to_inbound(envelope: Envelope, received_at: float) -> InboundMessage:
    """Build the bridge's message from an ``im.message.receive_v1`` event.

    Text, images and ``post`` (rich text with images) are understood; other message types become
    a message with no text and no images, which the relay answers with a short hint.

    Raises:
        EventFormatError: the message lacks its ids or its content is not JSON.
    """
    event = envelope.event
    message = _get_dict(event, "message")
    message_id = message.get("message_id")
    chat_id = message.get("chat_id")
    if not isinstance(message_id, str) or not message_id:
        raise EventFormatError("message has no message_id")
    if not isinstance(chat_id, str) or not chat_id:
        raise EventFormatError("message has no chat_id")
    message_type = _opt_str(message.get("message_type"))
    sender_ids = _get_dict(_get_dict(event, "sender"), "sender_id")
    sender_id = _opt_str(sender_ids.get("open_id")) or _opt_str(sender_ids.get("user_id"))
    raw_content = message.get("content", "{}")
    try:
        content = json.loads(raw_content) if isinstance(raw_content, str) else raw_content
    except ValueError:
        raise EventFormatError("message content is not JSON") from None
    if not isinstance(content, dict):
        content = {}
    text, images = _content(message_type, content)
    # Every string is made valid Unicode here: JSON can carry lone surrogates ("\ud800"), which
    # the durable inbox cannot encode (the intake would answer 500 and Feishu re-deliver
    # forever) and no tokenizer accepts. The message is kept, with U+FFFD in their place.
    return InboundMessage(
        platform="feishu",
        chat_id=valid_text(chat_id),
        message_id=valid_text(message_id),
        event_id=valid_text(envelope.event_id),
        sender_id=valid_text(sender_id),
        text=_clean(valid_text(text)),
        images=tuple(ImageRef(valid_text(r.key), r.kind) for r in images[:_MAX_IMAGES]),
        message_type=valid_text(message_type),
        received_at=received_at,
        chat_type=valid_text(_opt_str(message.get("chat_type"))),
    )


def _content(message_type: str, content: dict[str, Any]) -> tuple[str, list[ImageRef]]:
    if message_type == "text":
        return _opt_str(content.get("text")), []
    if message_type == "image":
        key = _opt_str(content.get("image_key"))
        return "", [ImageRef(key=key)] if key else []
    if message_type == "post":
        return _post(content)
    return "", []


def _post(content: dict[str, Any]) -> tuple[str, list[ImageRef]]:
    """Rich text: ``{"title", "content": [[elements]]}``, possibly wrapped in a locale key."""
    body: Any = content
    if "content" not in body:
        body = next((v for v in content.values() if isinstance(v, dict) and "content" in v), {})
    texts: list[str] = []
    images: list[ImageRef] = []
    title = _opt_str(body.get("title"))
    if title:
        texts.append(title)
    paragraphs = body.get("content")
    for paragraph in paragraphs if isinstance(paragraphs, list) else []:
        line: list[str] = []
        for element in paragraph if isinstance(paragraph, list) else []:
            if not isinstance(element, dict):
                continue
            tag = element.get("tag")
            if tag == "img":
                key = _opt_str(element.get("image_key"))
                if key:
                    images.append(ImageRef(key=key))
            elif tag in ("text", "a", "md"):
                line.append(_opt_str(element.get("text")))
        if line:
            texts.append("".join(line))
    return "\n".join(texts), images


def valid_text(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate replaced by U+FFFD (unchanged when valid)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _clean(text: str) -> str:
    return _MENTION.sub("", text).strip()[:_MAX_TEXT_CHARS]


def _get_dict(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _opt_str(value: object) -> str:
    return value if isinstance(value, str) else ""
