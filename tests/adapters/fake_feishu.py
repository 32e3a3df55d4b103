"""A fake Feishu on loopback: OpenAPI (aiohttp) and the long-connection gateway (websockets).

It behaves like the real service where the adapter cares (tokens, uuid-idempotent replies,
PATCH, resources, endpoint, pbbp2 frames, re-delivery of unacked events) and injects faults on
demand: 429 with a reset header, code 99991400, 5xx, token expiry, dropped pongs, abrupt closes,
fragmented events, and the end of Feishu's one hour of reply uuid memory (``forget_uuids``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from adapters.feishu.longconn.frame import (
    METHOD_CONTROL,
    METHOD_DATA,
    Frame,
    decode_frame,
    encode_frame,
)

APP_ID = "cli_test_app"
APP_SECRET = "fake-app-secret-XYZ"


@dataclass
class Fault:
    """One injected failure for the next matching request."""

    route: str  # "token", "resource", "reply", "patch", "endpoint"
    status: int = 200
    code: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    served_at: float | None = None  # loop time when it was answered


@dataclass
class Reply:
    """A message the bot created with a reply."""

    message_id: str
    parent_id: str
    msg_type: str
    content: str
    uuid: str
    posted_at: float = 0.0  # loop time when the post arrived


class FakeFeishu:
    """The fake service; ``base_url`` for the adapter, ``faults`` and records for assertions."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (route, path)
        self.replies: list[Reply] = []
        self.reply_posts = 0
        self.uuids: dict[str, str] = {}  # reply uuid -> message id, until forget_uuids()
        self.patches: list[tuple[float, str, str]] = []  # (loop time, message_id, content)
        self.tokens_issued = 0
        self.token_expire_s = 7200
        self.valid_tokens: set[str] = set()
        self.ws_credentials: list[str] = []  # access_key and ticket of every endpoint issued
        self.client_config: dict[str, Any] = {
            "PingInterval": 120,
            "ReconnectCount": -1,
            "ReconnectInterval": 120,
            "ReconnectNonce": 30,
        }
        self.gateway = FakeGateway(self)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def fail_next(self, route: str, *, status: int = 200, code: int = 0, **headers: str) -> Fault:
        """Make the next ``route`` request fail this way (queue several for several)."""
        fault = Fault(route, status, code, {k.replace("_", "-"): v for k, v in headers.items()})
        self.faults.append(fault)
        return fault

    def expire_tokens(self) -> None:
        """Invalidate every issued token (the next call answers 99991663)."""
        self.valid_tokens.clear()

    def forget_uuids(self) -> None:
        """Forget every reply uuid, as Feishu does after an hour: a replayed uuid posts anew."""
        self.uuids.clear()

    async def start(self) -> None:
        """Serve the OpenAPI and the gateway on loopback ports."""
        app = web.Application()
        app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", self._token)
        app.router.add_get("/open-apis/im/v1/messages/{mid}/resources/{key}", self._resource)
        app.router.add_post("/open-apis/im/v1/messages/{mid}/reply", self._reply)
        app.router.add_patch("/open-apis/im/v1/messages/{mid}", self._patch)
        app.router.add_post("/callback/ws/endpoint", self._endpoint)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        await self.gateway.start()

    async def stop(self) -> None:
        """Stop both servers."""
        await self.gateway.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- handlers ------------------------------------------------------------------------------
    def _fault(self, route: str) -> web.Response | None:
        for i, fault in enumerate(self.faults):
            if fault.route == route:
                del self.faults[i]
                fault.served_at = asyncio.get_running_loop().time()
                return web.json_response(
                    {"code": fault.code or fault.status, "msg": "injected"},
                    status=fault.status,
                    headers=fault.headers,
                )
        return None

    def _auth(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.valid_tokens:
            return web.json_response(
                {"code": 99991663, "msg": "Invalid access token for authorization."}, status=400
            )
        return None

    async def _token(self, request: web.Request) -> web.Response:
        self.requests.append(("token", request.path))
        fault = self._fault("token")
        if fault is not None:
            return fault
        body = await request.json()
        if body.get("app_id") != APP_ID or body.get("app_secret") != APP_SECRET:
            return web.json_response({"code": 10014, "msg": "app secret invalid"}, status=400)
        self.tokens_issued += 1
        token = f"t-fake-{self.tokens_issued}"
        self.valid_tokens.add(token)
        return web.json_response(
            {"code": 0, "msg": "ok", "tenant_access_token": token, "expire": self.token_expire_s}
        )

    async def _resource(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("resource", request.path))
        refused = self._auth(request) or self._fault("resource")
        if refused is not None:
            return refused
        if request.query.get("type") != "image":
            return web.json_response({"code": 234001, "msg": "Invalid request param."}, status=400)
        data = self.images.get(request.match_info["key"])
        if data is None:
            return web.json_response({"code": 234003, "msg": "File not in msg."}, status=400)
        return web.Response(body=data, content_type="image/jpeg")

    async def _reply(self, request: web.Request) -> web.Response:
        self.requests.append(("reply", request.path))
        refused = self._auth(request) or self._fault("reply")
        if refused is not None:
            return refused
        body = await request.json()
        self.reply_posts += 1
        uuid = body.get("uuid", "")
        if uuid and uuid in self.uuids:
            return web.json_response({"code": 0, "data": {"message_id": self.uuids[uuid]}})
        reply = Reply(
            message_id=f"om_reply_{next(self._ids)}",
            parent_id=request.match_info["mid"],
            msg_type=body["msg_type"],
            content=body["content"],
            uuid=uuid,
            posted_at=asyncio.get_running_loop().time(),
        )
        self.replies.append(reply)
        if uuid:
            self.uuids[uuid] = reply.message_id
        return web.json_response({"code": 0, "data": {"message_id": reply.message_id}})

    async def _patch(self, request: web.Request) -> web.Response:
        self.requests.append(("patch", request.path))
        refused = self._auth(request) or self._fault("patch")
        if refused is not None:
            return refused
        body = await request.json()
        mid = request.match_info["mid"]
        if not any(r.message_id == mid for r in self.replies):
            return web.json_response({"code": 230001, "msg": "message not found"}, status=400)
        self.patches.append((asyncio.get_running_loop().time(), mid, body["content"]))
        return web.json_response({"code": 0, "data": {}})

    async def _endpoint(self, request: web.Request) -> web.Response:
        self.requests.append(("endpoint", request.path))
        fault = self._fault("endpoint")
        if fault is not None:
            return fault
        body = await request.json()
        if body.get("AppID") != APP_ID or body.get("AppSecret") != APP_SECRET:
            return web.json_response({"code": 514, "msg": "auth failed"})
        # The real URL carries per-connection credentials (access_key, ticket) in its query.
        n = len(self.ws_credentials) + 1
        self.ws_credentials += [f"ak-fake-{n:04d}", f"tk-fake-{n:04d}"]
        url = (
            f"ws://127.0.0.1:{self.gateway.port}/ws/v2?fpid=493&aid=552564&device_id=d1"
            f"&access_key=ak-fake-{n:04d}&service_id=33&ticket=tk-fake-{n:04d}"
        )
        return web.json_response(
            {"code": 0, "msg": "ok", "data": {"URL": url, "ClientConfig": self.client_config}}
        )


@dataclass
class Pending:
    """An event the gateway pushed and has not seen acked with 200."""

    message_id: str
    payload: bytes
    fragments: int
    kind: str = "event"


class FakeGateway:
    """The long-connection gateway: pongs, pushes events (re-sending unacked ones), reads acks."""

    def __init__(self, owner: FakeFeishu) -> None:
        self._owner = owner
        self._server: Server | None = None
        self.port = 0
        self.conn: ServerConnection | None = None
        self.connections = 0
        self.connected = asyncio.Event()
        self.drop_pongs = False
        self.pings = 0
        self.acks: list[tuple[str, int]] = []
        self.ack_payloads: list[bytes] = []
        self.pending: dict[str, Pending] = {}
        self.deliveries = 0
        # (Handshake-Status, Handshake-Autherrcode) to refuse every upgrade with, as the real
        # gateway does (HTTP 403 with those headers); None accepts.
        self.refuse_handshake: tuple[int, int] | None = None
        self.refused = 0
        self.close_after_handshake = 0  # close this many next connections right after opening

    async def start(self) -> None:
        """Listen on a loopback port."""
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._upgrade)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def push(
        self, message_id: str, payload: bytes, *, fragments: int = 1, kind: str = "event"
    ) -> None:
        """Deliver an event now (if connected) and keep it until it is acked with 200.

        A ``card`` frame is a callback waiting for an answer, not a stored event: it is sent once
        and never re-delivered.
        """
        item = Pending(message_id, payload, fragments, kind)
        if kind == "event":
            self.pending[message_id] = item
        if self.conn is not None:
            await self._send_event(self.conn, item)

    def _upgrade(self, _conn: ServerConnection, _request: Request) -> Response | None:
        if self.refuse_handshake is None:
            return None
        self.refused += 1
        status, autherr = self.refuse_handshake
        headers = Headers(
            {
                "Handshake-Status": str(status),
                "Handshake-Msg": "refused",
                "Handshake-Autherrcode": str(autherr),
            }
        )
        return Response(403, "Forbidden", headers, b"")

    def abort(self) -> None:
        """Kill the current connection without a close handshake."""
        if self.conn is not None:
            self.conn.transport.abort()

    async def wait_connections(self, n: int, limit_s: float = 10.0) -> None:
        """Wait until ``n`` connections have been accepted in total."""
        async with asyncio.timeout(limit_s):
            while self.connections < n:
                self.connected.clear()
                await self.connected.wait()

    async def _send_event(self, conn: ServerConnection, event: Pending) -> None:
        self.deliveries += 1
        size = -(-len(event.payload) // event.fragments)
        parts = [event.payload[i * size : (i + 1) * size] for i in range(event.fragments)]
        # Fragments may arrive in any order; send them reversed to prove reassembly by seq.
        for seq in reversed(range(event.fragments)):
            frame = Frame(
                seq_id=self.deliveries,
                log_id=7,
                service=33,
                method=METHOD_DATA,
                headers=(
                    ("type", event.kind),
                    ("message_id", event.message_id),
                    ("sum", str(event.fragments)),
                    ("seq", str(seq)),
                    ("trace_id", f"tr-{event.message_id}"),
                ),
                payload=parts[seq],
            )
            try:
                await conn.send(encode_frame(frame))
            except Exception:
                return

    async def _handle(self, conn: ServerConnection) -> None:
        self.conn = conn
        self.connections += 1
        self.connected.set()
        if self.close_after_handshake > 0:
            self.close_after_handshake -= 1
            await conn.close(1000, "bye")
            return
        for event in list(self.pending.values()):  # re-delivery of everything unacked
            await self._send_event(conn, event)
        try:
            async for message in conn:
                assert isinstance(message, bytes)
                frame = decode_frame(message)
                if frame.method == METHOD_CONTROL and frame.header("type") == "ping":
                    self.pings += 1
                    if not self.drop_pongs:
                        pong = Frame(
                            service=frame.service,
                            method=METHOD_CONTROL,
                            headers=(("type", "pong"),),
                            payload=json.dumps(self._owner.client_config).encode(),
                        )
                        await conn.send(encode_frame(pong))
                elif frame.method == METHOD_DATA:
                    mid = frame.header("message_id") or ""
                    self.ack_payloads.append(frame.payload)
                    code = json.loads(frame.payload)["code"]
                    self.acks.append((mid, code))
                    if code == 200:
                        self.pending.pop(mid, None)
        except Exception:
            pass
        finally:
            if self.conn is conn:
                self.conn = None
