"""Socket Mode messages and message events: parsing, filtering, ids, and hostile input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.slack.protocol import (
    ProtocolError,
    ack_frame,
    parse_socket_message,
    thread_ts,
    to_inbound,
)
from adapters.slack.reply import ELLIPSIS, PLACEHOLDER, fit_text
from tests.adapters.slack.fake_slack import message_envelope

PNG = {
    "id": "F1",
    "mimetype": "image/png",
    "url_private": "https://files.slack.com/files-pri/T1-F1/a.png",
    "url_private_download": "https://files.slack.com/files-pri/T1-F1/download/a.png",
}


def payload(**kw: Any) -> dict[str, Any]:
    env = message_envelope("e1", **kw)
    return dict(env["payload"])


def test_hello_disconnect_and_envelope_are_told_apart() -> None:
    assert parse_socket_message('{"type":"hello","num_connections":1}').kind == "hello"
    msg = parse_socket_message('{"type":"disconnect","reason":"refresh_requested"}')
    assert (msg.kind, msg.reason) == ("disconnect", "refresh_requested")
    env = parse_socket_message(json.dumps(message_envelope("abc-1", retry_attempt=2)))
    assert (env.kind, env.type, env.envelope_id, env.retry_attempt) == (
        "envelope",
        "events_api",
        "abc-1",
        2,
    )
    assert env.payload is not None and env.payload["type"] == "event_callback"
    assert parse_socket_message('{"type":"something_new"}').kind == "other"
    assert json.loads(ack_frame("abc-1")) == {"envelope_id": "abc-1"}


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[1,2]", '"hello"', '{"type": 5}', '{"envelope_id": 7}',
     '{"envelope_id": "x", "payload": []}', "[" * 100_000],
)  # fmt: skip
def test_malformed_socket_messages_are_protocol_errors(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_socket_message(text)


def test_oversized_socket_message_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_socket_message("{" + " " * 2000 + "}", max_bytes=1000)


def test_image_message_becomes_an_inbound_message_with_stable_ids() -> None:
    p = payload(
        event_id="Ev9",
        channel="C9",
        ts="1.000200",
        text="<@U0BOT> what is this?",
        files=[PNG, {"id": "F2", "mimetype": "application/pdf", "url_private": "https://x"}],
    )
    decision = to_inbound(p, received_at=5.0)
    msg = decision.message
    assert msg is not None
    assert msg.platform == "slack" and msg.chat_id == "C9" and msg.topic == "chat:slack:C9"
    assert msg.message_id == "C9:1.000200" and msg.event_id == "Ev9"
    assert msg.dedupe_keys == ("slack:msg:C9:1.000200", "slack:evt:Ev9")
    assert msg.text == "what is this?"
    assert [r.key for r in msg.images] == [PNG["url_private_download"]]
    assert msg.images[0].kind == "image/png" and msg.message_type == "image"
    assert thread_ts(msg) == "1.000200" and msg.chat_type == "group"
    again = to_inbound(payload(event_id="Ev9", channel="C9", ts="1.000200", retry_attempt=1,
                               files=[PNG]), received_at=9.0).message  # fmt: skip
    assert again is not None and again.dedupe_keys == msg.dedupe_keys


def test_url_private_is_used_without_a_download_url() -> None:
    file = {k: v for k, v in PNG.items() if k != "url_private_download"}
    msg = to_inbound(payload(files=[file]), received_at=0).message
    assert msg is not None and msg.images[0].key == PNG["url_private"]


def test_text_only_direct_message() -> None:
    msg = to_inbound(payload(text="hi", channel_type="im"), received_at=0).message
    assert msg is not None and msg.images == () and msg.text == "hi" and msg.chat_type == "p2p"
    assert msg.message_type == "text"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"bot_id": "B1"}, "bot message"),
        ({"subtype": "bot_message"}, "bot message"),
        ({"subtype": "message_changed"}, "subtype message_changed"),
        ({"subtype": "message_deleted"}, "subtype message_deleted"),
        ({"subtype": "channel_join"}, "subtype channel_join"),
    ],
)
def test_bot_messages_and_other_subtypes_are_ignored(extra: dict[str, Any], reason: str) -> None:
    decision = to_inbound(payload(files=[PNG], **extra), received_at=0)
    assert decision.message is None and decision.reason == reason and decision.event_id


def test_other_events_and_callbacks_are_ignored() -> None:
    p = payload()
    p["event"] = {"type": "app_mention", "channel": "C1", "ts": "1.0"}
    assert to_inbound(p, received_at=0).message is None
    assert to_inbound({"type": "url_verification"}, received_at=0).message is None


@pytest.mark.parametrize(
    "event",
    [None, [], {"type": "message"}, {"type": "message", "channel": "C1", "ts": 1.5},
     {"type": "message", "channel": "C1", "ts": "1", "files": {}},
     {"type": "message", "channel": "C1", "ts": "1", "files": ["x"]},
     {"type": "message", "channel": "C1", "ts": "1", "text": ["x"]}],
)  # fmt: skip
def test_malformed_message_events_are_protocol_errors(event: object) -> None:
    with pytest.raises(ProtocolError):
        to_inbound({"type": "event_callback", "event_id": "Ev1", "event": event}, received_at=0)


def test_file_urls_that_are_not_http_are_dropped() -> None:
    files = [dict(PNG, url_private_download="file:///etc/passwd", url_private="javascript:x")]
    msg = to_inbound(payload(files=files), received_at=0).message
    assert msg is not None and msg.images == ()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.sampled_from(["type", "envelope_id", "payload", "event", "files", "ts", "channel",
                         "subtype", "bot_id", "mimetype", "url_private", "retry_attempt",
                         "reason", "event_id", "text", "x"]),
        inner,
        max_size=6,
    ),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps)))
def test_hostile_socket_messages_only_ever_raise_protocol_error(text: str) -> None:
    try:
        msg = parse_socket_message(text)
    except ProtocolError:
        return
    if msg.kind == "envelope":
        assert msg.envelope_id and isinstance(msg.payload, dict)
        try:
            decision = to_inbound(msg.payload, received_at=0)
        except ProtocolError:
            return
        if decision.message is not None:
            assert decision.message.message_id.startswith(decision.message.chat_id + ":")


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_hostile_event_payloads_only_ever_raise_protocol_error(value: object) -> None:
    p = {"type": "event_callback", "event_id": "Ev1", "event": value}
    try:
        to_inbound(p, received_at=0)
    except ProtocolError as exc:
        assert len(str(exc)) < 100


def test_fit_text_cuts_with_an_ellipsis_and_never_sends_empty() -> None:
    assert fit_text("", 10) == PLACEHOLDER and fit_text("  ", 10) == PLACEHOLDER
    assert fit_text("abc", 10) == "abc"
    cut = fit_text("x" * 50, 10)
    assert len(cut) == 10 and cut.endswith(ELLIPSIS)
