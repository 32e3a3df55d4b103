"""DingTalk Stream frames: the JSON messages on the stream WebSocket, parsed and built.

A server frame is ``{"specVersion", "type": SYSTEM|EVENT|CALLBACK, "headers": {...},
"data": "<JSON text>"}``; the client answers with ``{"code", "headers": {"contentType",
"messageId"}, "message", "data": "<JSON text>"}``, as the official dingtalk-stream SDKs do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TYPE_SYSTEM = "SYSTEM"
TYPE_EVENT = "EVENT"
TYPE_CALLBACK = "CALLBACK"
TOPIC_PING = "ping"
TOPIC_DISCONNECT = "disconnect"
CONTENT_TYPE_JSON = "application/json"
MAX_FRAME_BYTES = 4 * 1024 * 1024


class FrameError(ValueError):
    """A frame is not a DingTalk Stream frame; the message never quotes the frame."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One server frame; ``data`` stays the JSON text it came as (decode with :meth:`payload`)."""

    type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    data: str = ""
    spec_version: str = ""

    @property
    def message_id(self) -> str:
        """The delivery id (``headers.messageId``); acks carry it back."""
        return self.headers.get("messageId", "")

    @property
    def topic(self) -> str:
        """``headers.topic``: ``ping``/``disconnect`` for SYSTEM, the callback path for CALLBACK."""
        return self.headers.get("topic", "")

    def payload(self) -> dict[str, Any]:
        """``data`` decoded as a JSON object.

        Raises:
            FrameError: ``data`` is not a JSON object.
        """
        try:
            value = json.loads(self.data) if self.data else {}
        except ValueError:
            raise FrameError("frame data is not JSON") from None
        if not isinstance(value, dict):
            raise FrameError("frame data is not a JSON object")
        return value


def parse_frame(raw: str | bytes) -> Frame:
    """Decode one WebSocket text message into a :class:`Frame`.

    Header values that are numbers (``time``) become strings; other non-string header values
    are dropped. Raises :class:`FrameError` for anything that is not a frame.
    """
    if len(raw) > MAX_FRAME_BYTES:
        raise FrameError("frame too large")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise FrameError("frame is not JSON") from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise FrameError("frame has no type")
    raw_headers = obj.get("headers", {})
    if not isinstance(raw_headers, dict):
        raise FrameError("frame headers are not an object")
    headers: dict[str, str] = {}
    for key, value in raw_headers.items():
        if isinstance(value, str):
            headers[key] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            headers[key] = str(value)
    data = obj.get("data", "")
    if data is None:
        data = ""
    if not isinstance(data, str):
        raise FrameError("frame data is not a string")
    spec = obj.get("specVersion", "")
    return Frame(
        type=kind, headers=headers, data=data, spec_version=spec if isinstance(spec, str) else ""
    )


def ack_text(message_id: str, data: str, *, code: int = 200, message: str = "OK") -> str:
    """The answer to a frame: the same ``messageId``, a JSON content type, ``data`` as text."""
    body = {
        "code": code,
        "headers": {"contentType": CONTENT_TYPE_JSON, "messageId": message_id},
        "message": message,
        "data": data,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def callback_ack(message_id: str) -> str:
    """The ack of a CALLBACK: ``data`` is ``{"response": null}`` (the bridge answers later)."""
    return ack_text(message_id, json.dumps({"response": None}))


def system_ack(frame: Frame) -> str:
    """The answer to a SYSTEM frame (``ping``: the server's own ``data`` echoed back)."""
    return ack_text(frame.message_id, frame.data or "{}")
