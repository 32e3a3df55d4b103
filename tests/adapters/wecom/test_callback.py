"""The callback path of the adapter: URL check, signatures, sink contract, dedupe, limits."""

from __future__ import annotations

import pytest

from adapters.base import InboundMessage
from adapters.wecom import WeComAdapter
from tests.adapters.wecom.fake_wecom import (
    AES_KEY,
    CORP_ID,
    CallbackSender,
    FakeWeCom,
    image_message,
    message_xml,
    text_message,
)
from tests.adapters.wecom.test_xml import BILLION_LAUGHS, EXTERNAL

SENDER = CallbackSender()


class Sink:
    """A sink that dedupes on the message's keys like the relay does, or fails on demand."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.messages: list[InboundMessage] = []
        self.fail = False

    async def __call__(self, msg: InboundMessage) -> bool:
        if self.fail:
            raise RuntimeError("store down")
        self.messages.append(msg)
        new = not any(k in self.seen for k in msg.dedupe_keys)
        self.seen.update(msg.dedupe_keys)
        return new


@pytest.fixture
async def sink(adapter: WeComAdapter) -> Sink:
    s = Sink()
    await adapter.start(s)
    return s


def test_url_check_answers_the_plain_echostr(adapter: WeComAdapter) -> None:
    result = adapter.handle_url_check(SENDER.url_check_query("1616140317555161061"))
    assert (result.status, result.text) == (200, "1616140317555161061")


def test_url_check_survives_an_unescaped_plus(adapter: WeComAdapter) -> None:
    for i in range(40):  # find an echostr with a "+", as a proxy that does not escape it sees it
        query = SENDER.url_check_query(f"echo-{i}")
        if "+" in query["echostr"]:
            break
    else:
        raise AssertionError("no echostr with a '+' in 40 tries")
    mangled = {**query, "echostr": query["echostr"].replace("+", " ")}
    assert adapter.handle_url_check(mangled).text == f"echo-{i}"


def test_url_check_with_a_bad_signature_is_refused(adapter: WeComAdapter) -> None:
    query = SENDER.url_check_query("echo")
    query["msg_signature"] = "0" * 40
    assert adapter.handle_url_check(query).status == 403
    forged = CallbackSender(token="guessed").url_check_query("echo")
    assert adapter.handle_url_check(forged).status == 403
    missing = {k: v for k, v in SENDER.url_check_query("e").items() if k != "echostr"}
    assert adapter.handle_url_check(missing).status == 400
    assert adapter.status().events["rejected"] == 3


async def test_image_message_is_recorded_then_acknowledged(
    adapter: WeComAdapter, sink: Sink
) -> None:
    req = SENDER.sign_message(message_xml(image_message(42, "media-coffee")))
    result = await adapter.handle_callback(req.query, req.body)
    assert (result.status, result.text) == (200, "")
    [msg] = sink.messages
    assert msg.platform == "wecom" and msg.message_id == "42"
    assert msg.images[0].key == "media-coffee"
    status = adapter.status()
    assert status.platform == "wecom" and status.state == "listening" and status.healthy


async def test_three_retries_of_one_msgid_are_duplicates(adapter: WeComAdapter, sink: Sink) -> None:
    fields = image_message(77, "media-coffee")
    for nonce in ("a", "b", "c", "d"):  # WeCom retries with new nonces and timestamps
        req = SENDER.sign_message(message_xml(fields), nonce=nonce)
        assert (await adapter.handle_callback(req.query, req.body)).status == 200
    assert adapter.status().events == {"accepted": 1, "duplicate": 3, "rejected": 0}


async def test_bad_signature_never_reaches_the_sink(adapter: WeComAdapter, sink: Sink) -> None:
    req = SENDER.sign_message(message_xml(text_message(1, "hi")))
    bad = {**req.query, "msg_signature": "f" * 40}
    assert (await adapter.handle_callback(bad, req.body)).status == 403
    other_key = CallbackSender(aes_key="Z" * 42 + "A").sign_message(b"<xml/>")
    assert (await adapter.handle_callback(other_key.query, other_key.body)).status == 403
    other_corp = CallbackSender(corp_id="ww_other").sign_message(b"<xml/>")
    assert (await adapter.handle_callback(other_corp.query, other_corp.body)).status == 403
    no_sig = {k: v for k, v in req.query.items() if k != "msg_signature"}
    assert (await adapter.handle_callback(no_sig, req.body)).status == 400
    assert sink.messages == []


@pytest.mark.parametrize("hostile", [BILLION_LAUGHS, EXTERNAL])
async def test_hostile_xml_outside_and_inside_is_refused(
    adapter: WeComAdapter, sink: Sink, hostile: bytes
) -> None:
    req = SENDER.sign_message(b"<xml/>")
    assert (await adapter.handle_callback(req.query, hostile)).status == 400
    inner = SENDER.sign_message(hostile)
    assert (await adapter.handle_callback(inner.query, inner.body)).status == 400
    assert sink.messages == []


async def test_oversized_body_is_refused(adapter: WeComAdapter, sink: Sink) -> None:
    req = SENDER.sign_message(b"<xml/>")
    body = b"<xml>" + b" " * adapter.config.max_body_bytes + b"</xml>"
    assert (await adapter.handle_callback(req.query, body)).status == 413


async def test_sink_failure_is_a_5xx_and_the_retry_is_accepted(
    adapter: WeComAdapter, sink: Sink
) -> None:
    req = SENDER.sign_message(message_xml(image_message(5, "media-coffee")))
    sink.fail = True
    assert (await adapter.handle_callback(req.query, req.body)).status == 500
    sink.fail = False
    assert (await adapter.handle_callback(req.query, req.body)).status == 200
    assert adapter.status().events["accepted"] == 1


async def test_not_started_answers_503(wecom: FakeWeCom) -> None:
    from tests.adapters.wecom.conftest import make_config

    a = WeComAdapter(make_config(wecom.base_url))
    req = SENDER.sign_message(message_xml(text_message(1, "hi")))
    assert (await a.handle_callback(req.query, req.body)).status == 503
    await a.stop()


async def test_events_and_other_agents_are_acknowledged_and_ignored(
    adapter: WeComAdapter, sink: Sink
) -> None:
    event = {"ToUserName": CORP_ID, "FromUserName": "u", "CreateTime": 1, "MsgType": "event",
             "Event": "enter_agent", "AgentID": 1000002}  # fmt: skip
    req = SENDER.sign_message(message_xml(event))
    assert (await adapter.handle_callback(req.query, req.body)).status == 200
    foreign = SENDER.sign_message(message_xml(image_message(9, "m", agent="1000099")))
    assert (await adapter.handle_callback(foreign.query, foreign.body)).status == 200
    assert sink.messages == []


def test_repr_and_status_hold_no_secret(adapter: WeComAdapter) -> None:
    text = repr(adapter) + repr(adapter.config) + repr(adapter.status().to_dict())
    assert AES_KEY not in text and "fakeCallbackToken42" not in text
    assert "fake-wecom-app-secret" not in text
