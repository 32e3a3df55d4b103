"""The I/O-free update parser: one Bot API ``Update`` to an :class:`InboundMessage`, or a reason.

It never raises on hostile input: anything that is not a usable ``message`` update is ``ignored``
(authentic but not for us) or ``rejected`` (malformed), with a short reason for logs. The group
rule lives here too: in a group the bot answers only when mentioned or replied to (or always,
in ``all`` mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from adapters.base import ImageRef, InboundMessage
from adapters.telegram.config import GroupMode

PLATFORM = "telegram"
GROUP_TYPES = frozenset({"group", "supergroup"})
IMAGE_MIME_PREFIX = "image/"
MAX_TEXT_IN = 8192

Kind = Literal["message", "ignored", "rejected"]


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is (from ``getMe``): needed to recognise mentions and replies to it."""

    user_id: int
    username: str


@dataclass(frozen=True, slots=True)
class Parsed:
    """What to do with one update.

    Attributes:
        kind: ``message`` (hand ``message`` to the sink), ``ignored`` or ``rejected``.
        update_id: the update's id when it had a valid one (the polling offset moves past it).
        message: the message for ``message`` decisions.
        reason: a short, secret-free reason for logs.
    """

    kind: Kind
    update_id: int | None
    message: InboundMessage | None = None
    reason: str = ""


def update_id_of(data: object) -> int | None:
    """The ``update_id`` of a decoded update, if it has a valid one."""
    if isinstance(data, dict):
        uid = data.get("update_id")
        if isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid < 2**53:
            return uid
    return None


def parse_update(
    data: object,
    bot: BotIdentity,
    *,
    group_mode: GroupMode,
    max_image_bytes: int,
    received_at: float,
) -> Parsed:
    """Classify one decoded update; never raises."""
    uid = update_id_of(data)
    if uid is None or not isinstance(data, dict):
        return Parsed("rejected", None, reason="no valid update_id")
    message = data.get("message")
    if message is None:
        kinds = sorted(k for k in data if k != "update_id")[:1]
        return Parsed("ignored", uid, reason=f"update kind {str(kinds)[:40]}")
    if not isinstance(message, dict):
        return Parsed("rejected", uid, reason="message is not an object")
    chat = message.get("chat")
    mid = message.get("message_id")
    if not isinstance(chat, dict) or not _is_int(chat.get("id")) or not _is_int(mid):
        return Parsed("rejected", uid, reason="message lacks chat.id or message_id")
    chat_type = chat.get("type")
    if not isinstance(chat_type, str):
        return Parsed("rejected", uid, reason="chat.type is not a string")
    sender = message.get("from")
    sender = sender if isinstance(sender, dict) else {}
    if sender.get("is_bot") is True:
        return Parsed("ignored", uid, reason="sent by a bot")
    if chat_type not in GROUP_TYPES and chat_type != "private":
        return Parsed("ignored", uid, reason=f"chat type {chat_type[:20]}")
    text, entities = _text_and_entities(message)
    if (
        chat_type in GROUP_TYPES
        and group_mode != "all"
        and not _addressed(message, text, entities, bot)
    ):
        return Parsed("ignored", uid, reason="group message not addressed to the bot")
    images = _images(message, max_image_bytes)
    sender_id = sender.get("id")
    msg = InboundMessage(
        platform=PLATFORM,
        chat_id=str(chat["id"]),
        message_id=f"{chat['id']}:{mid}",
        event_id=str(uid),
        sender_id=str(sender_id) if _is_int(sender_id) else "",
        text=_strip_mention(text, bot)[:MAX_TEXT_IN],
        images=images,
        message_type=_message_type(message, images),
        received_at=received_at,
        chat_type="group" if chat_type in GROUP_TYPES else "p2p",
    )
    return Parsed("message", uid, message=msg)


def telegram_message_id(msg: InboundMessage) -> int:
    """The Telegram ``message_id`` of a message (its id is ``<chat id>:<message id>``)."""
    return int(msg.message_id.rsplit(":", 1)[1])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63


def _text_and_entities(message: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(message.get("text"), str):
        text, raw = message["text"], message.get("entities")
    elif isinstance(message.get("caption"), str):
        text, raw = message["caption"], message.get("caption_entities")
    else:
        return "", []
    entities = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
    return text, entities


def _utf16_slice(text: str, offset: object, length: object) -> str:
    """Entity offsets and lengths count UTF-16 code units, as the Bot API documents."""
    if not (_is_int(offset) and _is_int(length)):
        return ""
    assert isinstance(offset, int) and isinstance(length, int)
    if offset < 0 or length <= 0:
        return ""
    units = text.encode("utf-16-le", "surrogatepass")
    return units[2 * offset : 2 * (offset + length)].decode("utf-16-le", "replace")


def _addressed(
    message: dict[str, Any], text: str, entities: list[dict[str, Any]], bot: BotIdentity
) -> bool:
    reply_to = message.get("reply_to_message")
    if isinstance(reply_to, dict):
        author = reply_to.get("from")
        if isinstance(author, dict) and author.get("id") == bot.user_id:
            return True
    handle = "@" + bot.username.lower()
    for entity in entities:
        kind = entity.get("type")
        if kind == "text_mention":
            user = entity.get("user")
            if isinstance(user, dict) and user.get("id") == bot.user_id:
                return True
        elif kind in ("mention", "bot_command"):
            word = _utf16_slice(text, entity.get("offset"), entity.get("length")).lower()
            if word == handle or (kind == "bot_command" and word.endswith(handle)):
                return True
    return False


def _strip_mention(text: str, bot: BotIdentity) -> str:
    if not bot.username:
        return text.strip()
    handle = "@" + bot.username
    out = text
    idx = out.lower().find(handle.lower())
    while idx >= 0:
        out = out[:idx] + out[idx + len(handle) :]
        idx = out.lower().find(handle.lower())
    return " ".join(out.split())


def _images(message: dict[str, Any], limit: int) -> tuple[ImageRef, ...]:
    photo = message.get("photo")
    if isinstance(photo, list):
        sizes = [p for p in photo if isinstance(p, dict) and _file_id(p)]
        if sizes:
            return (ImageRef(key=_file_id(_choose_size(sizes, limit)), kind="photo"),)
    doc = message.get("document")
    if isinstance(doc, dict) and _file_id(doc):
        mime = doc.get("mime_type")
        if isinstance(mime, str) and mime.lower().startswith(IMAGE_MIME_PREFIX):
            return (ImageRef(key=_file_id(doc), kind="document"),)
    return ()


def _choose_size(sizes: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """The largest PhotoSize whose ``file_size`` fits ``limit``; the smallest if none fits.

    A size without ``file_size`` is taken to fit (the download still enforces the limit).
    """

    def area(p: dict[str, Any]) -> int:
        return _count(p.get("width")) * _count(p.get("height"))

    def size(p: dict[str, Any]) -> int:
        return _count(p.get("file_size"))

    fitting = [p for p in sizes if size(p) <= limit]
    if fitting:
        return max(fitting, key=lambda p: (area(p), size(p)))
    return min(sizes, key=size)


def _count(value: object) -> int:
    """A non-negative integer field, 0 when absent or malformed."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _file_id(obj: dict[str, Any]) -> str:
    fid = obj.get("file_id")
    return fid if isinstance(fid, str) and 0 < len(fid) <= 512 else ""


def _message_type(message: dict[str, Any], images: tuple[ImageRef, ...]) -> str:
    if images:
        return images[0].kind
    for kind in ("text", "document", "sticker", "video", "voice", "audio"):
        if kind in message:
            return kind
    return "other"
