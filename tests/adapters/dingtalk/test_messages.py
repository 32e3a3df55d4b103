"""Bot message callbacks → InboundMessage: text, picture, richText, and hostile data."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import InboundMessage
from adapters.dingtalk.messages import MessageError, to_inbound

BASE: dict[str, Any] = {
    "msgId": "msgX==",
    "conversationId": "cidX==",
    "conversationType": "1",
    "senderStaffId": "staff9",
    "robotCode": "dingrobot",
    "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=s",
    "sessionWebhookExpiredTime": 1_900_000_000_000,
}


def test_text_message() -> None:
    msg, target = to_inbound(
        {**BASE, "msgtype": "text", "text": {"content": " hi "}}, received_at=1.0
    )
    assert (msg.text, msg.images, msg.chat_type, msg.sender_id) == ("hi", (), "p2p", "staff9")
    assert msg.dedupe_keys == ("dingtalk:msg:msgX==",)
    assert target.single_chat and target.webhook_expires_ms == 1_900_000_000_000
    assert InboundMessage.from_json(msg.to_json()) == msg


def test_picture_and_rich_text() -> None:
    pic, _ = to_inbound(
        {**BASE, "conversationType": "2", "msgtype": "picture", "content": {"downloadCode": "dc1"}},
        received_at=1.0,
    )
    assert [r.key for r in pic.images] == ["dc1"] and pic.chat_type == "group"
    rich, _ = to_inbound(
        {
            **BASE,
            "msgtype": "richText",
            "content": {"richText": [{"text": "what"}, {"downloadCode": "dc2"}, {"text": "is it"}]},
        },
        received_at=1.0,
    )
    assert rich.text == "what is it" and [r.key for r in rich.images] == ["dc2"]


@pytest.mark.parametrize("missing", ["msgId", "conversationId"])
def test_missing_ids_are_refused(missing: str) -> None:
    with pytest.raises(MessageError):
        to_inbound({k: v for k, v in BASE.items() if k != missing}, received_at=1.0)


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=12), kids, max_size=3)
    ),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(
    extra=st.dictionaries(
        st.sampled_from(
            ["msgtype", "text", "content", "conversationType", "senderStaffId",
             "sessionWebhookExpiredTime", "robotCode", "sessionWebhook", "msgId"]
        ),
        values,
    ),
    msgtype=st.sampled_from(["text", "picture", "richText", "file", ""]),
)  # fmt: skip
def test_hostile_fields_never_crash(extra: dict[str, Any], msgtype: str) -> None:
    data = {**BASE, "msgtype": msgtype, **extra}
    try:
        msg, target = to_inbound(data, received_at=1.0)
    except MessageError:
        return
    assert isinstance(msg.text, str) and all(isinstance(r.key, str) for r in msg.images)
    assert isinstance(target.webhook_expires_ms, int)
    InboundMessage.from_json(msg.to_json())
