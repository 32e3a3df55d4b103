"""The I/O-free stream core and frame parser: acks in the SDK's shape, pings, our deadline."""

from __future__ import annotations

import contextlib
import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.dingtalk.config import DingTalkConfig
from adapters.dingtalk.frames import Frame, FrameError, callback_ack, parse_frame
from adapters.dingtalk.protocol import CallbackDelivery, DisconnectRequested, StreamProtocol
from adapters.dingtalk.stream import reconnect_backoff


def frame(kind: str, topic: str, mid: str, data: object = None) -> str:
    return json.dumps(
        {
            "specVersion": "1.0",
            "type": kind,
            "headers": {"messageId": mid, "topic": topic, "contentType": "application/json",
                        "time": 1700000000000},
            "data": json.dumps(data if data is not None else {}),
        }
    )  # fmt: skip


def test_callback_ack_has_the_sdk_shape() -> None:
    ack = json.loads(callback_ack("m-1"))
    assert ack == {
        "code": 200,
        "headers": {"contentType": "application/json", "messageId": "m-1"},
        "message": "OK",
        "data": json.dumps({"response": None}),
    }


def test_ping_is_answered_with_its_id_and_data() -> None:
    proto = StreamProtocol(now=0.0, silent_timeout_s=10.0)
    proto.receive(frame("SYSTEM", "ping", "p-1", {"opaque": "x-42"}), 1.0)
    [out] = [json.loads(t) for t in proto.data_to_send()]
    assert out["code"] == 200 and out["headers"]["messageId"] == "p-1"
    assert json.loads(out["data"]) == {"opaque": "x-42"}
    assert proto.events_received() == [] and proto.pings == 1


def test_callback_is_acked_only_when_told() -> None:
    proto = StreamProtocol(now=0.0, silent_timeout_s=10.0)
    proto.receive(frame("CALLBACK", "/v1.0/im/bot/messages/get", "c-1", {"msgId": "a"}), 1.0)
    [event] = proto.events_received()
    assert isinstance(event, CallbackDelivery) and event.message_id == "c-1"
    assert event.frame.payload() == {"msgId": "a"}
    assert proto.data_to_send() == []  # nothing before the sink recorded it
    proto.ack(event)
    [out] = [json.loads(t) for t in proto.data_to_send()]
    assert out["headers"]["messageId"] == "c-1" and out["code"] == 200


def test_disconnect_is_answered_and_stops_new_callbacks() -> None:
    proto = StreamProtocol(now=0.0, silent_timeout_s=10.0)
    proto.receive(frame("SYSTEM", "disconnect", "d-1", {"reason": "upgrade"}), 1.0)
    assert proto.events_received() == [DisconnectRequested()]
    assert json.loads(proto.data_to_send()[0])["headers"]["messageId"] == "d-1"
    proto.receive(frame("CALLBACK", "/v1.0/im/bot/messages/get", "c-2"), 2.0)
    assert proto.events_received() == []  # left unacked: DingTalk re-sends it on the new link


def test_silent_socket_fails_on_our_deadline_with_a_fake_clock() -> None:
    proto = StreamProtocol(now=100.0, silent_timeout_s=30.0)
    proto.tick(129.9)
    assert proto.failure is None and proto.next_wakeup() == 130.0
    proto.receive(frame("SYSTEM", "ping", "p"), 120.0)  # any frame proves the link
    proto.tick(149.9)
    assert proto.failure is None
    proto.tick(150.0)
    assert proto.failure == "silent"
    proto.receive(frame("SYSTEM", "ping", "p2"), 151.0)
    assert proto.data_to_send() == [json.dumps(json.loads(proto_ack("p")), separators=(",", ":"))]


def proto_ack(mid: str) -> str:
    return json.dumps(
        {"code": 200, "headers": {"contentType": "application/json", "messageId": mid},
         "message": "OK", "data": "{}"}
    )  # fmt: skip


def test_unsubscribed_event_frames_are_acked_and_garbage_is_counted() -> None:
    proto = StreamProtocol(now=0.0, silent_timeout_s=10.0)
    proto.receive(frame("EVENT", "chat_update", "e-1"), 0.5)
    proto.receive("not json", 0.6)
    proto.receive(json.dumps({"type": "WHAT", "headers": {}}), 0.7)
    proto.receive(frame("CALLBACK", "/v1.0/im/bot/messages/get", ""), 0.8)  # no messageId
    [out] = proto.data_to_send()
    assert json.loads(out)["headers"]["messageId"] == "e-1"
    assert proto.bad_frames == 3 and proto.events_received() == []


def test_reconnect_delay_doubles_with_jitter_up_to_the_cap() -> None:
    cfg = DingTalkConfig(client_id="id", client_secret="s", reconnect_base_s=1.0,
                         reconnect_max_s=60.0)  # fmt: skip
    backoff = reconnect_backoff(cfg, random.Random(7))
    for step in range(1, 12):
        ceiling = min(60.0, 1.0 * 2.0 ** (step - 1))
        d = backoff.next_delay()
        assert ceiling * 0.5 <= d <= ceiling


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), json_values.map(json.dumps)))
def test_parser_only_ever_raises_frame_error(raw: str | bytes) -> None:
    try:
        parsed = parse_frame(raw)
    except FrameError as exc:
        assert "{" not in str(exc)  # never echoes the frame
        return
    assert isinstance(parsed, Frame) and isinstance(parsed.type, str)
    assert all(isinstance(v, str) for v in parsed.headers.values())


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["SYSTEM", "CALLBACK", "EVENT", "x"]) | st.text(max_size=5),
    headers=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    data=json_values,
)
def test_protocol_survives_hostile_frames(
    kind: str, headers: dict[str, object], data: object
) -> None:
    proto = StreamProtocol(now=0.0, silent_timeout_s=10.0)
    raw = json.dumps({"type": kind, "headers": headers, "data": data})
    proto.receive(raw, 1.0)
    for text in proto.data_to_send():
        assert json.loads(text)["code"] == 200
    for event in proto.events_received():
        if isinstance(event, CallbackDelivery):
            with contextlib.suppress(FrameError):
                event.frame.payload()
    assert proto.failure is None


def test_oversized_frame_is_refused() -> None:
    try:
        parse_frame("x" * (4 * 1024 * 1024 + 1))
    except FrameError as exc:
        assert "too large" in str(exc)
    else:
        raise AssertionError("accepted a frame over the cap")
