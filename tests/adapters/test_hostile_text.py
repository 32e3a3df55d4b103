"""Feishu events carrying text that is not valid Unicode are recorded, with the text repaired."""

from __future__ import annotations

import json

from adapters.feishu.events import parse_envelope, to_inbound, valid_text
from tests.adapters.conftest import load_sample
from tests.adapters.test_webhook import TOKEN, Recorder, make


def text_event(text_json: str, message_id: str = "om_hostile_1") -> bytes:
    """A plain ``text`` message event whose content text is raw JSON ``text_json``."""
    content = '{"text":' + text_json + "}"
    body = {
        "schema": "2.0",
        "header": {"event_id": "ev_h1", "event_type": "im.message.receive_v1", "token": TOKEN},
        "event": {
            "sender": {"sender_id": {"open_id": "ou_1"}},
            "message": {
                "message_id": message_id,
                "chat_id": "oc_1",
                "chat_type": "p2p",
                "message_type": "text",
                "content": content,
            },
        },
    }
    return json.dumps(body).encode()


def test_valid_text_repairs_only_lone_surrogates() -> None:
    assert valid_text("a\ud800b") == "a\ufffdb"
    assert valid_text("\ud83d\ude00") == "\U0001f600"
    assert valid_text("ok <image>") == "ok <image>"


async def test_text_with_lone_surrogates_is_recorded_with_valid_text() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    resp = await adapter.handle_webhook({}, text_event(r'"what \ud800 is \udfff this"'))
    assert resp.status == 200
    [msg] = rec.messages
    assert msg.text == "what \ufffd is \ufffd this"
    msg.to_json().encode("utf-8")  # the durable inbox can store it


async def test_surrogates_in_ids_and_tokens_never_raise() -> None:
    rec = Recorder()
    adapter, _ = await make(rec)
    body = text_event('"hi"', message_id="om_\ud800").replace(b'"ev_h1"', b'"ev_\\udc00"')
    assert (await adapter.handle_webhook({}, body)).status == 200
    [msg] = rec.messages
    assert msg.message_id == "om_\ufffd" and msg.event_id == "ev_\ufffd"
    challenge = {"type": "url_verification", "token": "t\ud800", "challenge": "c"}
    assert (await adapter.handle_webhook({}, json.dumps(challenge).encode())).status == 403


def test_post_with_image_and_placeholder_text_keeps_the_text() -> None:
    """``<image> what is this`` stays text at the edge; the engine neutralises it."""
    sample = json.loads(load_sample("image_message_plain")["body"])
    post = {
        "content": [
            [{"tag": "img", "image_key": "k1"}, {"tag": "text", "text": "<image> what is this"}]
        ]
    }
    sample["event"]["message"].update(message_type="post", content=json.dumps(post))
    msg = to_inbound(parse_envelope(sample), received_at=0.0)
    assert msg.text == "<image> what is this" and [r.key for r in msg.images] == ["k1"]
