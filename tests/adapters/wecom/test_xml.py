"""WeCom XML: the flat documents WeCom sends, and hostile ones (entities, DTDs, depth)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.wecom.xmlmsg import XmlFormatError, parse_flat_xml, to_inbound
from tests.adapters.wecom.fake_wecom import image_message, message_xml, text_message

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<xml><Content>&lol9;</Content></xml>"""

EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<xml><Content>&xxe;</Content></xml>"""


def test_image_message_fields() -> None:
    fields = parse_flat_xml(message_xml(image_message(1234567890123456, "media-1")))
    msg = to_inbound(fields, received_at=5.0)
    assert msg is not None
    assert msg.message_id == "1234567890123456" and msg.chat_id == "zhangsan"
    assert msg.sender_id == "zhangsan" and msg.message_type == "image"
    assert [r.key for r in msg.images] == ["media-1"]
    assert msg.topic == "chat:wecom:zhangsan"
    assert msg.dedupe_keys == ("wecom:msg:1234567890123456",)


def test_text_message_and_chat_id() -> None:
    fields = text_message(7, "hello & <world>")
    fields["ChatId"] = "wrOgAAAD3"
    msg = to_inbound(parse_flat_xml(message_xml(fields)), received_at=0.0)
    assert msg is not None and msg.text == "hello & <world>"
    assert msg.chat_id == "wrOgAAAD3" and msg.sender_id == "zhangsan"
    assert msg.chat_type == "group"


def test_events_are_not_messages_and_missing_msgid_falls_back() -> None:
    event = {"ToUserName": "ww", "FromUserName": "u1", "CreateTime": 9, "MsgType": "event",
             "Event": "enter_agent", "AgentID": 1}  # fmt: skip
    assert to_inbound(parse_flat_xml(message_xml(event)), received_at=0.0) is None
    voice = {"FromUserName": "u1", "CreateTime": 99, "MsgType": "voice", "MediaId": "m"}
    msg = to_inbound(parse_flat_xml(message_xml(voice)), received_at=0.0)
    assert msg is not None and msg.message_id == "u1:99" and msg.images == ()


@pytest.mark.parametrize(
    "fields",
    [
        {"FromUserName": "u"},  # no MsgType
        {"MsgType": "image", "MediaId": "m"},  # no sender
        {"MsgType": "image", "FromUserName": "u", "MsgId": 1},  # no MediaId
    ],
)
def test_incomplete_messages_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(XmlFormatError):
        to_inbound(parse_flat_xml(message_xml(fields)), received_at=0.0)


@pytest.mark.parametrize(
    "body",
    [
        BILLION_LAUGHS,
        EXTERNAL,
        b'<!DOCTYPE xml SYSTEM "http://127.0.0.1:1/x.dtd"><xml/>',
        b'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY % p SYSTEM "http://x/">%p;]><xml/>',
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY b "c">]><xml/>'.encode(
            "utf-16"
        ),
        b"<?php echo 1; ?><xml/>",
        b"<xml>" + b"<a>" * 10 + b"</a>" * 10 + b"</xml>",
        b"<xml>" + b"<F>1</F>" * 1000 + b"</xml>",
    ],
)
def test_hostile_documents_are_refused(body: bytes) -> None:
    with pytest.raises(XmlFormatError, match=r"refused|deep|too many"):
        parse_flat_xml(body)


@pytest.mark.parametrize("body", [b"", b"<xml>", b"not xml", b"<xml></wrong>", b"\xff\xfe\x00"])
def test_malformed_documents_are_refused(body: bytes) -> None:
    with pytest.raises(XmlFormatError, match="well-formed"):
        parse_flat_xml(body)


@given(st.binary(max_size=500))
def test_any_bytes_parse_or_raise_the_format_error(data: bytes) -> None:
    try:
        result = parse_flat_xml(data)
    except XmlFormatError:
        return
    assert isinstance(result, dict)


FIELD_NAMES = ["MsgType", "FromUserName", "MediaId", "MsgId", "Content", "ChatId", "CreateTime"]


@given(st.dictionaries(st.sampled_from(FIELD_NAMES), st.text(max_size=50)))
def test_any_fields_give_a_message_none_or_the_format_error(fields: dict[str, str]) -> None:
    try:
        msg = to_inbound(fields, received_at=0.0)
    except XmlFormatError as exc:
        assert str(exc)
        return
    assert msg is None or (msg.platform == "wecom" and msg.sender_id)
