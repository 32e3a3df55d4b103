"""Socket Mode wire format without I/O: socket messages, acks, and message events to inbound.

Slack sends JSON text frames: ``hello`` once a socket is ready, ``disconnect`` (with a
``reason``: ``warning``, ``refresh_requested``, ``link_disabled``, ``too_many_websockets``)
before it closes one, and envelopes (``envelope_id``, ``type``, ``payload``) that must be
acknowledged by sending back ``{"envelope_id": ...}`` within 3 seconds or they are re-delivered.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from adapters.base import ImageRef, InboundMessage

PLATFORM = "slack"
EVENTS_API = "events_api"
IMAGE_MIMETYPES = frozenset(
    {"image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp", "image/tiff"}
)
#: Message subtypes that are a person's own new message (``file_share``: one with files).
USER_SUBTYPES = frozenset({"", "file_share"})
MAX_ID_CHARS = 256
MAX_URL_CHARS = 2048
MAX_FILES = 20
_MENTION = re.compile(r"<@[A-Z0-9]+(?:\|[^>]*)?>")

Kind = Literal["hello", "disconnect", "envelope", "other"]


class ProtocolError(ValueError):
    """A socket message is not what Slack sends; the text is safe to log (no payload echo)."""


@dataclass(frozen=True, slots=True)
class SocketMessage:
    """One parsed socket message.

    Attributes:
        kind: ``hello``, ``disconnect``, ``envelope`` (anything with an ``envelope_id``), or
            ``other`` (a type the bridge does not use).
        type: Slack's ``type`` field as sent (``events_api``, ``slash_commands``, ...).
        reason: the ``disconnect`` reason, else empty.
        envelope_id: the id to acknowledge, else empty.
        payload: the envelope's payload object (empty when absent).
        retry_attempt: Slack's count of earlier deliveries of this envelope's event.
    """

    kind: Kind
    type: str
    reason: str = ""
    envelope_id: str = ""
    payload: dict[str, Any] | None = None
    retry_attempt: int = 0


def parse_socket_message(text: str | bytes, *, max_bytes: int = 4 * 2**20) -> SocketMessage:
    """Parse one text frame from the socket.

    Raises:
        ProtocolError: not JSON, not an object, too large, or fields of the wrong type.
    """
    if len(text) > max_bytes:
        raise ProtocolError(f"socket message of {len(text)} bytes exceeds {max_bytes}")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("socket message is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("socket message is not a JSON object")
    mtype = _opt_str(data, "type")
    envelope_id = _opt_str(data, "envelope_id")
    if envelope_id:
        if len(envelope_id) > MAX_ID_CHARS:
            raise ProtocolError("envelope_id is too long")
        payload = data.get("payload")
        if payload is not None and not isinstance(payload, dict):
            raise ProtocolError("envelope payload is not an object")
        retry = data.get("retry_attempt", 0)
        if not isinstance(retry, int) or isinstance(retry, bool):
            retry = 0
        return SocketMessage(
            "envelope", mtype, envelope_id=envelope_id, payload=payload or {}, retry_attempt=retry
        )
    if mtype == "hello":
        return SocketMessage("hello", mtype)
    if mtype == "disconnect":
        return SocketMessage("disconnect", mtype, reason=_opt_str(data, "reason")[:64])
    return SocketMessage("other", mtype[:64])


def ack_frame(envelope_id: str) -> str:
    """The acknowledgement of an envelope (no response payload: the bridge answers later)."""
    return json.dumps({"envelope_id": envelope_id}, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class EventDecision:
    """What an ``events_api`` payload means for the bridge: a message, or why it is ignored."""

    message: InboundMessage | None
    reason: str
    event_id: str = ""


def to_inbound(payload: dict[str, Any], *, received_at: float) -> EventDecision:
    """Turn an ``event_callback`` payload into an :class:`InboundMessage`, or say why not.

    Only a person's new ``message`` is taken: bot messages (``bot_id`` or subtype
    ``bot_message``), edits, deletions and every other subtype except ``file_share`` are ignored.
    The message id is ``<channel>:<ts>``, which Slack keeps for a message across re-deliveries.

    Raises:
        ProtocolError: the payload is an event callback with fields of the wrong shape.
    """
    if _opt_str(payload, "type") != "event_callback":
        return EventDecision(None, "not an event_callback")
    event_id = _opt_str(payload, "event_id")[:MAX_ID_CHARS]
    event = payload.get("event")
    if not isinstance(event, dict):
        raise ProtocolError("event_callback lacks an event object")
    if _opt_str(event, "type") != "message":
        return EventDecision(None, "not a message event", event_id)
    subtype = _opt_str(event, "subtype")
    if event.get("bot_id") or subtype == "bot_message":
        return EventDecision(None, "bot message", event_id)
    if subtype not in USER_SUBTYPES:
        return EventDecision(None, f"subtype {subtype[:40]}", event_id)
    channel = _opt_str(event, "channel")
    ts = _opt_str(event, "ts")
    if not channel or not ts or len(channel) > MAX_ID_CHARS or len(ts) > MAX_ID_CHARS:
        raise ProtocolError("message event lacks channel or ts")
    text = _MENTION.sub("", _opt_str(event, "text")).strip()
    images = _images(event.get("files"))
    channel_type = _opt_str(event, "channel_type")
    return EventDecision(
        InboundMessage(
            platform=PLATFORM,
            chat_id=channel,
            message_id=f"{channel}:{ts}",
            event_id=event_id,
            sender_id=_opt_str(event, "user")[:MAX_ID_CHARS],
            text=text,
            images=images,
            message_type="image" if images else ("file_share" if subtype else "text"),
            received_at=received_at,
            chat_type="p2p" if channel_type == "im" else ("group" if channel_type else ""),
        ),
        "message",
        event_id,
    )


def thread_ts(msg: InboundMessage) -> str:
    """The ``ts`` of the message a reply threads under (the part after the channel)."""
    return msg.message_id.rsplit(":", 1)[-1]


def _images(files: object) -> tuple[ImageRef, ...]:
    if files is None:
        return ()
    if not isinstance(files, list):
        raise ProtocolError("message files is not a list")
    refs: list[ImageRef] = []
    for item in files[:MAX_FILES]:
        if not isinstance(item, dict):
            raise ProtocolError("a message file is not an object")
        mimetype = _opt_str(item, "mimetype").lower()
        if mimetype not in IMAGE_MIMETYPES:
            continue
        url = _opt_str(item, "url_private_download") or _opt_str(item, "url_private")
        if url.startswith(("https://", "http://")) and len(url) <= MAX_URL_CHARS:
            refs.append(ImageRef(key=url, kind=mimetype))
    return tuple(refs)


def _opt_str(data: dict[str, Any], key: str) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} is not a string")
    return value
