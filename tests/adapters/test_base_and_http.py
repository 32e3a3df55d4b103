"""The platform-neutral types and the HTTP seam (aiohttp client on loopback, mock transport)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from adapters.base import (
    Adapter,
    AdapterStatus,
    ImageRef,
    InboundMessage,
    MessageFormatError,
    ReplyStream,
)
from adapters.feishu import FeishuAdapter, FeishuConfig
from adapters.feishu.reply import FeishuReplyStream
from adapters.http import (
    AiohttpClient,
    BodyTooLarge,
    HttpError,
    HttpRequest,
    HttpResponse,
    MockTransport,
)

MSG = InboundMessage(
    platform="feishu",
    chat_id="oc_1",
    message_id="om_1",
    event_id="ev_1",
    sender_id="ou_1",
    text='什么? "quoted"',
    images=(ImageRef("img_a"), ImageRef("img_b", "image")),
    message_type="post",
    received_at=1763800000.5,
    chat_type="group",
)


def test_inbound_message_round_trips_through_json() -> None:
    assert InboundMessage.from_json(MSG.to_json()) == MSG
    assert InboundMessage.from_json(MSG.to_json().encode()) == MSG
    assert MSG.dedupe_keys == ("feishu:msg:om_1", "feishu:evt:ev_1")
    assert MSG.topic == "chat:feishu:oc_1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        "{}",
        '{"platform": 1, "chat_id": "c", "message_id": "m"}',
        '{"platform": "f"}',
        '{"platform":"f","chat_id":"c","message_id":"m","images":[{"kind":"image"}]}',
        "\xff",
    ],
)
def test_bad_serialized_messages_raise_a_clear_error(text: str) -> None:
    with pytest.raises(MessageFormatError):
        InboundMessage.from_json(text)


def test_feishu_adapter_satisfies_the_protocols() -> None:
    cfg = FeishuConfig(app_id="a", app_secret="b", verification_token="v")
    adapter = FeishuAdapter(cfg, http=MockTransport(lambda r: HttpResponse(200)))
    assert isinstance(adapter, Adapter)
    stream = FeishuReplyStream(
        adapter.api, source_message_id="om_1", reply_message_id="om_r", interval_s=0.2
    )
    assert isinstance(stream, ReplyStream) and stream.reply_message_id == "om_r"
    status = adapter.status()
    assert isinstance(status, AdapterStatus) and status.state == "off" and not status.healthy
    assert status.to_dict()["mode"] == "webhook"


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length to check up front
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"x" * 1000)
        await resp.write_eof()
        return resp

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "method": request.method,
                "query": dict(request.query),
                "body": (await request.read()).decode(),
            },
            headers={"X-Custom": "1"},
        )

    app = web.Application()
    app.router.add_get("/big", big)

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"y" * 5000)

    app.router.add_get("/sized", sized)
    app.router.add_route("*", "/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_aiohttp_client_sends_and_caps_bodies(server: str) -> None:
    client = AiohttpClient()
    try:
        req = HttpRequest.build("post", f"{server}/echo", params={"a": "1 2"}, json_body={"k": "v"})
        resp = await client.send(req)
        assert resp.status == 200 and resp.header("X-CUSTOM") == "1"
        assert resp.json() == {"method": "POST", "query": {"a": "1 2"}, "body": '{"k":"v"}'}
        assert (
            len((await client.send(HttpRequest("GET", f"{server}/big"), max_body_bytes=10000)).body)
            == 10000
        )
        with pytest.raises(BodyTooLarge):
            await client.send(HttpRequest("GET", f"{server}/big"), max_body_bytes=9999)
        with pytest.raises(BodyTooLarge):
            await client.send(HttpRequest("GET", f"{server}/sized"), max_body_bytes=4999)
        with pytest.raises(HttpError) as info:
            await client.send(HttpRequest("GET", "http://127.0.0.1:1/x?secret=1", timeout_s=2))
        assert "secret" not in str(info.value)
    finally:
        await client.close()
        await client.close()


async def test_mock_transport_answers_from_a_function() -> None:
    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse.of_json({"echo": request.json()}, headers={"X-A": "b"})

    transport = MockTransport(handler)
    resp = await transport.send(HttpRequest.build("POST", "http://fake/x", json_body=[1]))
    assert resp.json() == {"echo": [1]} and resp.header("x-a") == "b"
    assert len(transport.requests) == 1
    with pytest.raises(BodyTooLarge):
        await transport.send(HttpRequest("GET", "http://fake/y"), max_body_bytes=3)
