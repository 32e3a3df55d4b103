"""The webhook path on the wire samples: verification, refusals, and what reaches the sink."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.base import ImageRef, InboundMessage
from adapters.feishu import ConfigError, FeishuAdapter, FeishuConfig
from adapters.feishu.crypto import AESCipher, signature
from adapters.http import HttpRequest, HttpResponse, MockTransport
from tests.adapters.conftest import load_sample

TOKEN = "test-verification-token"
KEY = "test-encrypt-key-0123"
SIGNED_AT = 1763800000.0


class Recorder:
    """A sink and observer that records what it sees."""

    def __init__(self, new: bool = True, fail: bool = False) -> None:
        self.messages: list[InboundMessage] = []
        self.outcomes: list[str] = []
        self.new = new
        self.fail = fail

    async def sink(self, msg: InboundMessage) -> bool:
        if self.fail:
            raise RuntimeError("store down")
        self.messages.append(msg)
        return self.new

    def on_event(self, outcome: str) -> None:
        self.outcomes.append(outcome)


def no_http(request: HttpRequest) -> HttpResponse:
    raise AssertionError(f"unexpected HTTP call {request.method} {request.url}")


async def make(
    rec: Recorder, *, encrypt_key: str = "", now: float = SIGNED_AT, **kw: Any
) -> tuple[FeishuAdapter, MockTransport]:
    transport = MockTransport(no_http)
    cfg = FeishuConfig(
        mode="webhook",
        app_id="cli_test_app",
        app_secret="s3cret-app",
        verification_token=TOKEN,
        encrypt_key=encrypt_key,
        **kw,
    )
    adapter = FeishuAdapter(cfg, http=transport, clock=lambda: now, observer=rec)
    await adapter.start(rec.sink)
    return adapter, transport


async def test_plain_image_message_reaches_the_sink_with_its_ids() -> None:
    rec = Recorder()
    adapter, transport = await make(rec)
    sample = load_sample("image_message_plain")
    resp = await adapter.handle_webhook(sample["headers"], sample["body"])
    assert resp.status == 200
    [msg] = rec.messages
    assert msg.platform == "feishu"
    assert msg.message_id == "om_sample_image_1"
    assert msg.event_id == "ev_sample_1"
    assert msg.chat_id == "oc_sample_chat_1"
    assert msg.sender_id == "ou_b52c9987b467458c"
    assert msg.message_type == "image"
    assert msg.images == (ImageRef("img_v3_sample_coffee", "image"),)
    assert msg.received_at == SIGNED_AT
    assert msg.topic == "chat:feishu:oc_sample_chat_1"
    assert rec.outcomes == ["accepted"]
    assert transport.requests == []  # the webhook downloads nothing before the 200
    assert InboundMessage.from_json(msg.to_json()) == msg


async def test_encrypted_signed_sample_is_accepted_with_the_injected_clock() -> None:
    rec = Recorder()
    adapter, _ = await make(rec, encrypt_key=KEY, now=SIGNED_AT + 100)
    sample = load_sample("image_message_encrypted_signed")
    resp = await adapter.handle_webhook(sample["headers"], sample["body"])
    assert resp.status == 200
    assert [m.message_id for m in rec.messages] == ["om_sample_image_1"]
    assert rec.messages[0].event_id == "ev_sample_1"


async def test_duplicate_is_answered_200_and_counted() -> None:
    rec = Recorder(new=False)
    adapter, _ = await make(rec)
    sample = load_sample("image_message_plain")
    for _ in range(4):
        assert (await adapter.handle_webhook(sample["headers"], sample["body"])).status == 200
    assert rec.outcomes == ["duplicate"] * 4
    assert adapter.status().events["duplicate"] == 4


async def test_bad_signature_is_refused_and_nothing_is_processed() -> None:
    rec = Recorder()
    adapter, transport = await make(rec, encrypt_key=KEY)
    sample = load_sample("image_message_bad_signature")
    resp = await adapter.handle_webhook(sample["headers"], sample["body"])
    assert resp.status == 401
    assert resp.body["error"]["code"] == "bad_signature"
    assert rec.messages == [] and transport.requests == []
    assert rec.outcomes == ["rejected"]


@pytest.mark.parametrize("skew", [-301.0, 301.0])
async def test_timestamp_outside_the_replay_window_is_refused(skew: float) -> None:
    rec = Recorder()
    adapter, _ = await make(rec, encrypt_key=KEY, now=SIGNED_AT + skew)
    sample = load_sample("image_message_encrypted_signed")
    resp = await adapter.handle_webhook(sample["headers"], sample["body"])
    assert resp.status == 401 and resp.body["error"]["code"] == "stale"
    assert rec.messages == []


async def test_replay_window_is_configurable() -> None:
    rec = Recorder()
    adapter, _ = await make(rec, encrypt_key=KEY, now=SIGNED_AT + 3600, replay_window_s=7200.0)
    sample = load_sample("image_message_encrypted_signed")
    assert (await adapter.handle_webhook(sample["headers"], sample["body"])).status == 200


async def test_missing_signature_headers_are_refused_when_a_key_is_set() -> None:
    rec = Recorder()
    adapter, _ = await make(rec, encrypt_key=KEY)
    sample = load_sample("image_message_encrypted_signed")
    resp = await adapter.handle_webhook({"Content-Type": "application/json"}, sample["body"])
    assert resp.status == 401 and rec.messages == []
    # A plain body with no signature cannot bypass the key either.
    plain = load_sample("image_message_plain")
    assert (await adapter.handle_webhook(plain["headers"], plain["body"])).status == 401


async def test_wrong_verification_token_is_refused() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    body = load_sample("image_message_plain")["body"].replace(TOKEN.encode(), b"wrong-token")
    resp = await adapter.handle_webhook({}, body)
    assert resp.status == 403 and rec.messages == []


def _signed(body: bytes, ts: str = str(int(SIGNED_AT))) -> dict[str, str]:
    return {
        "X-Lark-Request-Timestamp": ts,
        "X-Lark-Request-Nonce": "abc",
        "X-Lark-Signature": signature(ts, "abc", KEY, body),
    }


async def test_undecryptable_body_is_refused() -> None:
    rec = Recorder()
    adapter, _ = await make(rec, encrypt_key=KEY)
    wrong = AESCipher("another-key").encrypt(b'{"type": "url_verification"}', b"\x01" * 16)
    for encrypted in (wrong, "not base64 !!", "QUJD"):
        body = json.dumps({"encrypt": encrypted}).encode()
        resp = await adapter.handle_webhook(_signed(body), body)
        assert resp.status == 401, encrypted
    assert rec.messages == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b"\xff\xfe", b'{"schema": "2.0", "header": 5}', b'{"encrypt": 5}'],
)
async def test_malformed_bodies_are_400(body: bytes) -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    resp = await adapter.handle_webhook({}, body)
    assert resp.status == 400
    assert rec.messages == []


async def test_oversized_body_is_400_before_parsing() -> None:
    rec = Recorder()
    adapter, _ = await make(rec, max_body_bytes=1000)
    resp = await adapter.handle_webhook({}, b"{" + b" " * 2000 + b"}")
    assert resp.status == 400 and resp.body["error"]["code"] == "too_large"


async def test_url_verification_plain_and_encrypted() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    sample = load_sample("url_verification_plain")
    resp = await adapter.handle_webhook(sample["headers"], sample["body"])
    assert (resp.status, resp.body) == (200, {"challenge": "ajls384kdjx98XX"})
    adapter, _ = await make(rec, encrypt_key=KEY, now=1795381725.0)
    sample = load_sample("url_verification_encrypted")
    resp = await adapter.handle_webhook(sample["headers"], sample["body"])
    assert (resp.status, resp.body) == (200, {"challenge": "ajls384kdjx98XX"})
    assert rec.messages == []


async def test_an_unsigned_url_check_is_answered_only_when_encrypted_with_our_key() -> None:
    """As the official SDKs do: Feishu's URL check may come without signature headers."""
    rec = Recorder()
    adapter, _ = await make(rec, encrypt_key=KEY)
    cipher = AESCipher(KEY)
    check = {"challenge": "c-1", "token": TOKEN, "type": "url_verification"}
    body = json.dumps({"encrypt": cipher.encrypt(json.dumps(check).encode(), b"\x02" * 16)})
    resp = await adapter.handle_webhook({}, body.encode())
    assert (resp.status, resp.body) == (200, {"challenge": "c-1"})
    # Not with a wrong token, not in plain text, and never an unsigned event.
    wrong = json.dumps({**check, "token": "nope"}).encode()
    body = json.dumps({"encrypt": cipher.encrypt(wrong, b"\x03" * 16)}).encode()
    assert (await adapter.handle_webhook({}, body)).status in (401, 403)
    assert (await adapter.handle_webhook({}, json.dumps(check).encode())).status == 401
    event = load_sample("image_message_plain")["body"]
    body = json.dumps({"encrypt": cipher.encrypt(event, b"\x04" * 16)}).encode()
    assert (await adapter.handle_webhook({}, body)).status == 401
    assert rec.messages == []


async def test_url_verification_with_a_wrong_token_is_refused() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    body = b'{"challenge": "x", "token": "nope", "type": "url_verification"}'
    assert (await adapter.handle_webhook({}, body)).status == 403


async def test_unknown_event_type_is_ignored_with_200() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    body = json.dumps(
        {
            "schema": "2.0",
            "header": {"event_id": "e9", "event_type": "im.chat.disbanded_v1", "token": TOKEN},
            "event": {},
        }
    ).encode()
    resp = await adapter.handle_webhook({}, body)
    assert resp.status == 200 and rec.messages == [] and rec.outcomes == []


async def test_text_message_becomes_a_text_only_message() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    sample = load_sample("text_message_plain")
    assert (await adapter.handle_webhook(sample["headers"], sample["body"])).status == 200
    [msg] = rec.messages
    assert (msg.text, msg.images, msg.message_type) == ("hello", (), "text")


def _event(message: dict[str, Any]) -> bytes:
    base = {"message_id": "om_p", "chat_id": "oc_1", "chat_type": "group"}
    return json.dumps(
        {
            "schema": "2.0",
            "header": {"event_id": "ev_p", "event_type": "im.message.receive_v1", "token": TOKEN},
            "event": {"sender": {"sender_id": {"open_id": "ou_1"}}, "message": {**base, **message}},
        }
    ).encode()


async def test_post_with_images_and_mentions() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    content = {
        "title": "Look",
        "content": [
            [{"tag": "at", "user_id": "@_user_1"}, {"tag": "text", "text": "what is "}],
            [{"tag": "img", "image_key": "img_a"}, {"tag": "text", "text": "this?"}],
            [{"tag": "img", "image_key": "img_b"}, "junk", {"tag": "img"}],
        ],
    }
    body = _event({"message_type": "post", "content": json.dumps(content)})
    assert (await adapter.handle_webhook({}, body)).status == 200
    [msg] = rec.messages
    assert [r.key for r in msg.images] == ["img_a", "img_b"]
    assert msg.text == "Look\nwhat is \nthis?"
    assert msg.chat_type == "group"


async def test_locale_wrapped_post_and_mention_placeholders() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    content = {"zh_cn": {"title": "", "content": [[{"tag": "img", "image_key": "img_z"}]]}}
    await adapter.handle_webhook(
        {}, _event({"message_type": "post", "content": json.dumps(content)})
    )
    text = {"text": "@_user_1 describe please"}
    await adapter.handle_webhook(
        {}, _event({"message_id": "om_t", "message_type": "text", "content": json.dumps(text)})
    )
    assert [r.key for r in rec.messages[0].images] == ["img_z"]
    assert rec.messages[1].text == "describe please"


@pytest.mark.parametrize(
    "message",
    [{"message_id": ""}, {"chat_id": None}, {"message_type": "text", "content": "{not json"}],
)
async def test_message_without_ids_or_with_bad_content_is_400(message: dict[str, Any]) -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    assert (await adapter.handle_webhook({}, _event(message))).status == 400
    assert rec.messages == []


async def test_sink_failure_answers_500_so_feishu_redelivers() -> None:
    rec = Recorder(fail=True)
    adapter, _ = await make(rec)
    sample = load_sample("image_message_plain")
    resp = await adapter.handle_webhook(sample["headers"], sample["body"])
    assert resp.status == 500 and rec.outcomes == []


async def test_not_started_answers_503() -> None:
    cfg = FeishuConfig(app_id="a", app_secret="b", verification_token=TOKEN)
    adapter = FeishuAdapter(cfg, http=MockTransport(no_http))
    sample = load_sample("image_message_plain")
    assert (await adapter.handle_webhook(sample["headers"], sample["body"])).status == 503


async def test_secrets_never_show_in_repr_or_status() -> None:
    rec = Recorder()
    adapter, _ = await make(rec, encrypt_key=KEY)
    sample = load_sample("image_message_bad_signature")
    await adapter.handle_webhook(sample["headers"], sample["body"])
    shown = repr(adapter.config) + str(adapter.config) + repr(adapter) + repr(adapter.status())
    for secret in ("s3cret-app", TOKEN, KEY):
        assert secret not in shown
    assert "app_id='cli_test_app'" in repr(adapter.config)
    assert adapter.status().state == "listening" and adapter.status().healthy


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        FeishuConfig(app_id="a", app_secret="").validate()
    with pytest.raises(ConfigError):
        FeishuConfig(app_id="a", app_secret="b").validate()  # webhook without token or key
    with pytest.raises(ConfigError, match="mode"):
        FeishuConfig(mode="smoke", app_id="a", app_secret="b").validate()  # type: ignore[arg-type]
    FeishuConfig(mode="longconn", app_id="a", app_secret="b").validate()
