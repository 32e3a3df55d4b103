"""Safe parsing of WeCom's flat callback XML and its translation into :class:`InboundMessage`.

WeCom sends ``<xml><Name><![CDATA[value]]></Name>...</xml>`` documents one level deep. They are
parsed with expat directly, refusing any DOCTYPE, entity declaration or processing instruction
(so no entity expansion, billion laughs or external entities can happen, whatever the encoding),
and refusing nesting deeper than the few levels WeCom uses.
"""

from __future__ import annotations

import xml.parsers.expat
from typing import Any

from adapters.base import ImageRef, InboundMessage

MAX_DEPTH = 4
MAX_FIELDS = 200


class XmlFormatError(ValueError):
    """The body is not a WeCom callback document we accept."""


class _Refused(Exception):
    pass


def parse_flat_xml(data: bytes) -> dict[str, str]:
    """The children of the root element as ``{tag: text}`` (nested elements are flattened away).

    Raises:
        XmlFormatError: not well-formed, a DOCTYPE or entity, too deep or too many fields.
    """
    parser = xml.parsers.expat.ParserCreate()
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    fields: dict[str, str] = {}
    stack: list[str] = []
    text: list[str] = []
    seen = [0]

    def refuse(*_args: Any) -> Any:
        raise _Refused("DOCTYPE, entities and processing instructions are refused")

    def start(name: str, _attrs: dict[str, str]) -> None:
        if len(stack) >= MAX_DEPTH:
            raise _Refused("document is nested too deep")
        stack.append(name)
        text.clear()

    def end(name: str) -> None:
        stack.pop()
        if len(stack) == 1:
            seen[0] += 1
            if seen[0] > MAX_FIELDS:
                raise _Refused("too many fields")
            fields.setdefault(name, "".join(text))
        text.clear()

    def chars(value: str) -> None:
        text.append(value)

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.ProcessingInstructionHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(data, True)
    except _Refused as exc:
        raise XmlFormatError(str(exc)) from None
    except (xml.parsers.expat.ExpatError, ValueError, UnicodeError) as exc:
        raise XmlFormatError(f"body is not well-formed XML: {str(exc)[:80]}") from None
    return fields


def to_inbound(fields: dict[str, str], *, received_at: float) -> InboundMessage | None:
    """The message of a decrypted callback, or None for events (subscribe, enter_agent, ...).

    ``message_id`` is MsgId (WeCom's own dedupe key; its three retries carry the same one), or
    FromUserName + CreateTime where a message has none, as WeCom recommends for events.

    Raises:
        XmlFormatError: a message lacks its sender or (for images) its MediaId.
    """
    msg_type = fields.get("MsgType", "").strip()
    if not msg_type:
        raise XmlFormatError("callback lacks MsgType")
    if msg_type == "event":
        return None
    sender = fields.get("FromUserName", "").strip()
    if not sender:
        raise XmlFormatError("message lacks FromUserName")
    msg_id = fields.get("MsgId", "").strip() or f"{sender}:{fields.get('CreateTime', '').strip()}"
    images: tuple[ImageRef, ...] = ()
    text = ""
    if msg_type == "image":
        media_id = fields.get("MediaId", "").strip()
        if not media_id:
            raise XmlFormatError("image message lacks MediaId")
        images = (ImageRef(key=media_id, kind="image"),)
    elif msg_type == "text":
        text = fields.get("Content", "")
    chat_id = fields.get("ChatId", "").strip() or sender
    return InboundMessage(
        platform="wecom",
        chat_id=chat_id[:256],
        message_id=msg_id[:256],
        event_id="",
        sender_id=sender[:256],
        text=text[:20_000],
        images=images,
        message_type=msg_type[:64],
        received_at=received_at,
        chat_type="group" if fields.get("ChatId") else "p2p",
    )
