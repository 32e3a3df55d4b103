"""A fake DingTalk on loopback: the OpenAPI, the Stream gateway and the robot's reply channels.

Built from DingTalk's documented formats: ``/v1.0/gateway/connections/open`` hands out a
single-use ticket for the stream WebSocket; the stream sends JSON frames (SYSTEM ``ping`` and
``disconnect``, CALLBACK bot messages) whose ``data`` is JSON text, and re-sends every unacked
CALLBACK on the next connection; ``/v1.0/oauth2/accessToken``, ``messageFiles/download`` (a
download URL), the ``sessionWebhook`` and the robot send APIs answer as the docs show. Faults
(429, the QPS-limit code, 5xx) are injected per route with :meth:`FakeDingTalk.fail_next`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

CLIENT_ID = "dingtest_client_id"
CLIENT_SECRET = "fake-dingtalk-secret-QWERTY"
ROBOT_CODE = CLIENT_ID
BOT_TOPIC = "/v1.0/im/bot/messages/get"


@dataclass
class Fault:
    """One injected answer for the next request to ``route``."""

    route: str  # "open", "token", "download", "file", "webhook", "single", "group", "card_*"
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    served_at: float | None = None  # loop time when it was answered


@dataclass
class Sent:
    """A message the robot sent: by ``webhook``, ``single`` (batchSend) or ``group``."""

    via: str
    body: dict[str, Any]
    at: float = 0.0  # loop time when the fake accepted it
    url: str = ""  # the sessionWebhook it was posted to ("" for the robot API)


@dataclass
class Card:
    """An AI card the robot created: its create body, streamed texts and card-data updates."""

    create: dict[str, Any]
    streams: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    stream_times: list[float] = field(default_factory=list)
    created_at: float = 0.0
    update_times: list[float] = field(default_factory=list)

    @property
    def flow_status(self) -> str:
        """The latest ``flowStatus`` set on the card."""
        status = self.create["cardData"]["cardParamMap"].get("flowStatus", "")
        for update in self.updates:
            status = update["cardData"]["cardParamMap"].get("flowStatus", status)
        return str(status)


class FakeDingTalk:
    """The fake service; ``base_url`` for the adapter, records and controls for tests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # downloadCode -> bytes
        self.faults: list[Fault] = []
        self.sent: list[Sent] = []
        self.opens: list[dict[str, Any]] = []
        self.tokens_issued = 0
        self.valid_tokens: set[str] = set()
        self.token_expire_s = 7200
        self.acks: list[dict[str, Any]] = []  # every client frame, decoded
        self.pending: dict[str, dict[str, Any]] = {}  # messageId -> CALLBACK frame, until acked
        self.bad_client_frames = 0
        self.connections = 0
        self.silent = False  # stop sending anything (pings included) on the stream
        self.down = False  # an outage: connections/open answers 503 and the stream refuses
        self.ping_every_s: float | None = None  # DingTalk pings the client this often
        self.ping_ids: list[str] = []
        self.cards: dict[str, Card] = {}  # outTrackId -> card
        self.card_creates = 0
        self._tickets: set[str] = set()
        self._ws: web.WebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._connected = asyncio.Condition()

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1.0/gateway/connections/open", self._open)
        app.router.add_get("/connect", self._stream)
        app.router.add_post("/v1.0/oauth2/accessToken", self._token)
        app.router.add_post("/v1.0/robot/messageFiles/download", self._download)
        app.router.add_get("/files/{code}", self._file)
        app.router.add_post("/robot/sendBySession", self._webhook)
        app.router.add_post("/v1.0/robot/oToMessages/batchSend", self._single)
        app.router.add_post("/v1.0/robot/groupMessages/send", self._group)
        app.router.add_post("/v1.0/card/instances/createAndDeliver", self._card_create)
        app.router.add_put("/v1.0/card/streaming", self._card_stream)
        app.router.add_put("/v1.0/card/instances", self._card_update)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def fail_next(
        self,
        route: str,
        status: int,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """Answer the next ``route`` request with ``status``, ``body`` and ``headers``."""
        fault = Fault(route, status, body or {}, headers or {})
        self.faults.append(fault)
        return fault

    async def take_down(self) -> None:
        """Start an outage: drop the stream link and refuse new ones until :meth:`bring_up`."""
        self.down = True
        await self.abort()

    def bring_up(self) -> None:
        """End the outage."""
        self.down = False

    def session_webhook(self, expires_in_s: float = 3600.0) -> tuple[str, int]:
        """A fresh sessionWebhook URL and its expiry (epoch ms), as a callback carries them."""
        return (
            f"{self.base_url}/robot/sendBySession?session=sess{next(self._ids)}",
            int((time.time() + expires_in_s) * 1000),
        )

    # --- stream controls ---------------------------------------------------------------------
    async def wait_connections(self, n: int, limit_s: float = 10.0) -> None:
        """Wait until ``n`` stream connections were made in all."""
        async with asyncio.timeout(limit_s), self._connected:
            await self._connected.wait_for(lambda: self.connections >= n and self._ws is not None)

    async def push_callback(self, data: dict[str, Any], message_id: str | None = None) -> str:
        """Send a bot-message CALLBACK frame; it stays pending (re-sent later) until acked."""
        mid = message_id or f"cb-{next(self._ids)}"
        frame = {
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {
                "appId": "app-1",
                "connectionId": f"conn-{self.connections}",
                "contentType": "application/json",
                "messageId": mid,
                "time": str(int(time.time() * 1000)),
                "topic": BOT_TOPIC,
            },
            "data": json.dumps(data, ensure_ascii=False),
        }
        self.pending[mid] = frame
        await self._send(frame)
        return mid

    async def send_system(self, topic: str, data: dict[str, Any] | None = None) -> str:
        """Send a SYSTEM frame (``ping`` or ``disconnect``); returns its messageId."""
        mid = f"sys-{next(self._ids)}"
        frame = {
            "specVersion": "1.0",
            "type": "SYSTEM",
            "headers": {
                "contentType": "application/json",
                "messageId": mid,
                "time": str(int(time.time() * 1000)),
                "topic": topic,
            },
            "data": json.dumps(data or {}),
        }
        await self._send(frame)
        return mid

    async def send_raw(self, text: str) -> None:
        """Send arbitrary text on the stream (hostile-input tests)."""
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_str(text)

    async def abort(self) -> None:
        """Close the current stream connection abruptly."""
        if self._ws is not None:
            await self._ws.close(code=1011)

    def acks_for(self, message_id: str) -> list[dict[str, Any]]:
        """The client frames that answered ``message_id``."""
        return [a for a in self.acks if a.get("headers", {}).get("messageId") == message_id]

    async def wait_ack(self, message_id: str, limit_s: float = 10.0) -> dict[str, Any]:
        """Poll until ``message_id`` was answered; its first answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while loop.time() < deadline:
            found = self.acks_for(message_id)
            if found:
                return found[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no ack for {message_id}; acks: {self.acks}")

    async def _send(self, frame: dict[str, Any]) -> None:
        if self._ws is not None and not self._ws.closed and not self.silent:
            await self._ws.send_str(json.dumps(frame, ensure_ascii=False))

    # --- handlers ----------------------------------------------------------------------------
    def _fault(self, route: str) -> web.Response | None:
        for i, fault in enumerate(self.faults):
            if fault.route == route:
                del self.faults[i]
                fault.served_at = asyncio.get_running_loop().time()
                return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        return None

    def _authorized(self, request: web.Request) -> web.Response | None:
        if request.headers.get("x-acs-dingtalk-access-token") not in self.valid_tokens:
            return web.json_response(
                {"code": "InvalidAuthentication", "message": "不合法的access_token"}, status=401
            )
        return None

    async def _open(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.opens.append(body)
        if (fault := self._fault("open")) is not None:
            return fault
        if self.down:
            return web.json_response({"code": "ServiceUnavailable"}, status=503)
        if body.get("clientId") != CLIENT_ID or body.get("clientSecret") != CLIENT_SECRET:
            return web.json_response(
                {"code": "InvalidAuthentication", "message": "clientId or clientSecret wrong"},
                status=401,
            )
        ticket = f"ticket-{next(self._ids)}"
        self._tickets.add(ticket)
        host = self.base_url.split("://", 1)[1]
        return web.json_response({"endpoint": f"ws://{host}/connect", "ticket": ticket})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets or self.down:
            return web.json_response({"code": "InvalidTicket"}, status=401)
        self._tickets.discard(ticket)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws  # new frames go here; an older link stays open until the client closes it
        async with self._connected:
            self.connections += 1
            self._connected.notify_all()
        for frame in list(self.pending.values()):  # DingTalk re-pushes what was not acked
            await self._send(frame)
        pinger = asyncio.create_task(self._pings(ws)) if self.ping_every_s else None
        try:
            await self._read(ws)
        finally:
            if pinger is not None:
                pinger.cancel()
        return ws

    async def _pings(self, ws: web.WebSocketResponse) -> None:
        assert self.ping_every_s is not None
        while not ws.closed:
            await asyncio.sleep(self.ping_every_s)
            if self._ws is ws:
                self.ping_ids.append(await self.send_system("ping", {"opaque": "keepalive"}))

    async def _read(self, ws: web.WebSocketResponse) -> None:
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            try:
                answer = json.loads(message.data)
                assert isinstance(answer, dict)
            except (ValueError, AssertionError):
                self.bad_client_frames += 1
                continue
            self.acks.append(answer)
            mid = answer.get("headers", {}).get("messageId")
            if answer.get("code") == 200 and mid in self.pending:
                del self.pending[mid]

    async def _token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if (fault := self._fault("token")) is not None:
            return fault
        if body.get("appKey") != CLIENT_ID or body.get("appSecret") != CLIENT_SECRET:
            return web.json_response({"code": "invalidClientIdOrSecret"}, status=400)
        self.tokens_issued += 1
        token = f"tok-{self.tokens_issued}-SECRETTOKEN"
        self.valid_tokens.add(token)
        return web.json_response({"accessToken": token, "expireIn": self.token_expire_s})

    async def _download(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        if (fault := self._fault("download")) is not None:
            return fault
        body = await request.json()
        code = body.get("downloadCode")
        if body.get("robotCode") != ROBOT_CODE or code not in self.files:
            return web.json_response({"code": "resource.not.found"}, status=404)
        return web.json_response({"downloadUrl": f"{self.base_url}/files/{code}?sig=abc"})

    async def _file(self, request: web.Request) -> web.Response:
        if (fault := self._fault("file")) is not None:
            return fault
        data = self.files.get(request.match_info["code"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/jpeg")

    async def _webhook(self, request: web.Request) -> web.Response:
        if (fault := self._fault("webhook")) is not None:
            return fault
        body = await request.json()
        if body.get("msgtype") not in ("text", "markdown"):
            return web.json_response({"errcode": 40035, "errmsg": "缺少参数 msgtype"})
        now = asyncio.get_running_loop().time()
        self.sent.append(Sent("webhook", body, now, str(request.url)))
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    async def _single(self, request: web.Request) -> web.Response:
        return await self._robot_send(request, "single")

    async def _group(self, request: web.Request) -> web.Response:
        return await self._robot_send(request, "group")

    async def _robot_send(self, request: web.Request, via: str) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        if (fault := self._fault(via)) is not None:
            return fault
        body = await request.json()
        need = "userIds" if via == "single" else "openConversationId"
        if body.get("robotCode") != ROBOT_CODE or not body.get(need) or "msgKey" not in body:
            return web.json_response({"code": "invalidParameter"}, status=400)
        json.loads(body.get("msgParam", ""))  # must be JSON text
        self.sent.append(Sent(via, body, asyncio.get_running_loop().time()))
        return web.json_response({"processQueryKey": f"pqk-{next(self._ids)}"})

    async def _card_create(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        if (fault := self._fault("card_create")) is not None:
            return fault
        body = await request.json()
        track = body.get("outTrackId")
        space = str(body.get("openSpaceId", ""))
        params = body.get("cardData", {}).get("cardParamMap")
        if not body.get("cardTemplateId") or not track or not isinstance(params, dict):
            return web.json_response({"code": "invalidParameter"}, status=400)
        if not space.startswith(("dtv1.card//IM_GROUP.", "dtv1.card//IM_ROBOT.")):
            return web.json_response({"code": "invalidParameter.openSpaceId"}, status=400)
        group = space.startswith("dtv1.card//IM_GROUP.")
        model = body.get("imGroupOpenDeliverModel" if group else "imRobotOpenDeliverModel")
        if not isinstance(model, dict) or (group and model.get("robotCode") != ROBOT_CODE):
            return web.json_response({"code": "invalidParameter.deliverModel"}, status=400)
        if track in self.cards:
            return web.json_response({"code": "param.outTrackIdExist"}, status=400)
        self.card_creates += 1
        self.cards[track] = Card(create=body, created_at=asyncio.get_running_loop().time())
        return web.json_response({"success": True, "result": {"outTrackId": track}})

    async def _card_stream(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        if (fault := self._fault("card_stream")) is not None:
            return fault
        body = await request.json()
        card = self.cards.get(body.get("outTrackId"))
        if card is None or not isinstance(body.get("content"), str) or not body.get("guid"):
            return web.json_response({"code": "invalidParameter"}, status=400)
        card.streams.append(body)
        card.stream_times.append(asyncio.get_running_loop().time())
        return web.json_response({})

    async def _card_update(self, request: web.Request) -> web.Response:
        if (denied := self._authorized(request)) is not None:
            return denied
        if (fault := self._fault("card_update")) is not None:
            return fault
        body = await request.json()
        card = self.cards.get(body.get("outTrackId"))
        if card is None or not isinstance(body.get("cardData", {}).get("cardParamMap"), dict):
            return web.json_response({"code": "cardNotExist"}, status=400)
        card.updates.append(body)
        card.update_times.append(asyncio.get_running_loop().time())
        return web.json_response({"success": True})


def bot_message(
    fake: FakeDingTalk,
    *,
    msg_id: str = "msgABC123==",
    msgtype: str = "picture",
    conversation_id: str = "cidGROUP1==",
    conversation_type: str = "2",
    download_code: str = "dlcode-coffee",
    text: str = "what is this?",
    webhook_ttl_s: float = 3600.0,
) -> dict[str, Any]:
    """A bot message callback ``data`` as DingTalk documents it."""
    webhook, expires = fake.session_webhook(webhook_ttl_s)
    data: dict[str, Any] = {
        "conversationId": conversation_id,
        "chatbotCorpId": "dingcorp",
        "chatbotUserId": "$:LWCP_v1:$bot",
        "msgId": msg_id,
        "senderNick": "Zhang San",
        "isAdmin": False,
        "senderStaffId": "staff001",
        "sessionWebhookExpiredTime": expires,
        "createAt": int(time.time() * 1000),
        "senderCorpId": "dingcorp",
        "conversationType": conversation_type,
        "senderId": "$:LWCP_v1:$sender",
        "sessionWebhook": webhook,
        "robotCode": ROBOT_CODE,
        "msgtype": msgtype,
    }
    if conversation_type == "2":
        data["conversationTitle"] = "Test group"
        data["isInAtList"] = True
    if msgtype == "text":
        data["text"] = {"content": text}
    elif msgtype == "picture":
        data["content"] = {"downloadCode": download_code, "pictureDownloadCode": "pdc"}
    elif msgtype == "richText":
        data["content"] = {
            "richText": [{"text": text}, {"downloadCode": download_code, "type": "picture"}]
        }
    return data
