"""A fake WeCom on loopback, built from WeCom's server API and callback documentation.

Server side: ``GET /cgi-bin/gettoken`` (access tokens with ``expires_in``), ``GET
/cgi-bin/media/get`` (the file, or a JSON ``errcode`` such as 40007 invalid media_id) and ``POST
/cgi-bin/message/send`` (records texts, returns ``msgid``). Faults on demand: errcode 45009 for
the next sends or for chosen sends within a window (:meth:`FakeWeCom.limit_sends`), and token
expiry (42001 for every token issued so far). Callback side:
:class:`CallbackSender` encrypts and signs messages the way WeCom does (its own implementation of
the documented algorithm, not the adapter's) and delivers them to a bridge.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CORP_ID = "ww0123456789abcdef"
AGENT_ID = "1000002"
SECRET = "fake-wecom-app-secret-QRS"
TOKEN = "fakeCallbackToken42"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"  # 43 characters


@dataclass
class Sent:
    """One ``message/send`` call the fake accepted."""

    msgid: str
    touser: str
    agentid: int
    content: str
    at: float
    loop_at: float = 0.0  # the fake's event-loop time, for tests that share its loop


@dataclass
class SendLimit:
    """A frequency limit on ``message/send``: every send that ``matches`` gets errcode 45009
    from the first one refused until ``window_s`` later (WeCom states no wait; it refuses until
    the window's quota frees up). ``served_at`` is the loop time of the first refusal."""

    matches: Callable[[dict[str, Any]], bool]
    window_s: float
    served_at: float | None = None
    refused: int = 0

    def refuses(self, body: dict[str, Any], now: float) -> bool:
        """Whether this send is refused now (and count it)."""
        if self.served_at is not None and now >= self.served_at + self.window_s:
            return False
        if not self.matches(body):
            return False
        if self.served_at is None:
            self.served_at = now
        self.refused += 1
        return True


class FakeWeCom:
    """The fake API; ``base_url`` for the adapter, records and fault switches for assertions."""

    def __init__(self) -> None:
        self.media: dict[str, tuple[bytes, str]] = {}  # media_id -> (bytes, content type)
        self.sent: list[Sent] = []
        self.requests: list[str] = []  # route names in order
        self.tokens_issued = 0
        self.issued_tokens: list[str] = []  # every token ever issued, expired ones too
        self.valid_tokens: set[str] = set()
        self.rate_limit_sends = 0
        self.expires_in = 7200
        self.send_limits: list[SendLimit] = []
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def limit_sends(self, matches: Callable[[dict[str, Any]], bool], window_s: float) -> SendLimit:
        """Refuse matching sends with 45009 for ``window_s`` from the first refusal."""
        limit = SendLimit(matches, window_s)
        self.send_limits.append(limit)
        return limit

    def expire_tokens(self) -> None:
        """Every token issued so far is expired: the next call with one answers 42001."""
        self.valid_tokens.clear()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/cgi-bin/gettoken", self._gettoken)
        app.router.add_get("/cgi-bin/media/get", self._media)
        app.router.add_post("/cgi-bin/message/send", self._send)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _token_error(self, request: web.Request) -> web.Response | None:
        token = request.query.get("access_token", "")
        if not token:
            return _err(41001, "access_token missing")
        if token not in self.valid_tokens:
            if token.startswith("fake-token-"):
                return _err(42001, "access_token expired")
            return _err(40014, "invalid access_token")
        return None

    async def _gettoken(self, request: web.Request) -> web.Response:
        self.requests.append("gettoken")
        if request.query.get("corpid") != CORP_ID:
            return _err(40013, "invalid corpid")
        if request.query.get("corpsecret") != SECRET:
            return _err(40001, "invalid credential")
        self.tokens_issued += 1
        token = f"fake-token-{self.tokens_issued}-{os.urandom(6).hex()}"
        self.valid_tokens.add(token)
        self.issued_tokens.append(token)
        return web.json_response(
            {"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": self.expires_in}
        )

    async def _media(self, request: web.Request) -> web.Response:
        self.requests.append("media")
        if (refused := self._token_error(request)) is not None:
            return refused
        item = self.media.get(request.query.get("media_id", ""))
        if item is None:
            return _err(40007, "invalid media_id")
        data, ctype = item
        return web.Response(
            body=data,
            content_type=ctype,
            headers={"Content-disposition": 'attachment; filename="photo.jpg"'},
        )

    async def _send(self, request: web.Request) -> web.Response:
        self.requests.append("send")
        if (refused := self._token_error(request)) is not None:
            return refused
        if self.rate_limit_sends > 0:
            self.rate_limit_sends -= 1
            return _err(45009, "api freq out of limit")
        body = await request.json()
        now = asyncio.get_running_loop().time()
        if any(limit.refuses(body, now) for limit in self.send_limits):
            return _err(45009, "api freq out of limit")
        content = body.get("text", {}).get("content", "")
        if body.get("msgtype") != "text" or str(body.get("agentid")) != AGENT_ID:
            return _err(40008, "invalid message type or agentid")
        if not content or len(content.encode()) > 2048:
            return _err(44004, "text content is empty or longer than 2048 bytes")
        msgid = f"msgid_{next(self._ids)}"
        sent = Sent(msgid, body["touser"], int(body["agentid"]), content, time.time(), now)
        self.sent.append(sent)
        return web.json_response({"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": msgid})


def _err(code: int, msg: str) -> web.Response:
    return web.json_response({"errcode": code, "errmsg": msg})


# --- the callback side ---------------------------------------------------------------------------
def doc_encrypt(plain: bytes, *, aes_key: str = AES_KEY, receive_id: str = CORP_ID) -> str:
    """Encrypt as the WeCom docs describe: random(16) + len(4, network order) + msg + receiveid."""
    key = base64.b64decode(aes_key + "=")
    data = os.urandom(16) + struct.pack("!I", len(plain)) + plain + receive_id.encode()
    padder = padding.PKCS7(256).padder()  # 32-byte blocks
    padded = padder.update(data) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(enc.update(padded) + enc.finalize()).decode()


def doc_signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """``msg_signature`` = sha1(sort(token, timestamp, nonce, msg_encrypt)) in hex."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypt])).encode()).hexdigest()


def message_xml(fields: dict[str, Any]) -> bytes:
    """A callback message document: text fields in CDATA, numbers bare, as WeCom sends them."""
    parts = []
    for name, value in fields.items():
        text = str(value) if isinstance(value, int) else f"<![CDATA[{value}]]>"
        parts.append(f"<{name}>{text}</{name}>")
    return ("<xml>" + "".join(parts) + "</xml>").encode()


def image_message(
    msg_id: int, media_id: str, *, user: str = "zhangsan", agent: str = AGENT_ID
) -> dict[str, Any]:
    """The fields of an image message to the app."""
    return {
        "ToUserName": CORP_ID,
        "FromUserName": user,
        "CreateTime": int(time.time()),
        "MsgType": "image",
        "PicUrl": f"https://wework.qpic.cn/fake/{media_id}",
        "MediaId": media_id,
        "MsgId": msg_id,
        "AgentID": int(agent),
    }


def text_message(msg_id: int, content: str, *, user: str = "zhangsan") -> dict[str, Any]:
    """The fields of a text message to the app."""
    return {
        "ToUserName": CORP_ID,
        "FromUserName": user,
        "CreateTime": int(time.time()),
        "MsgType": "text",
        "Content": content,
        "MsgId": msg_id,
        "AgentID": int(AGENT_ID),
    }


@dataclass(frozen=True)
class SignedRequest:
    """The query string and body of one callback POST."""

    query: dict[str, str]
    body: bytes


class CallbackSender:
    """Encrypts, signs and delivers callbacks as WeCom does, to ``<base>/webhooks/wecom``."""

    def __init__(self, token: str = TOKEN, aes_key: str = AES_KEY, corp_id: str = CORP_ID):
        self.token = token
        self.aes_key = aes_key
        self.corp_id = corp_id

    def sign_message(self, inner: bytes, *, nonce: str = "n0nce") -> SignedRequest:
        encrypt = doc_encrypt(inner, aes_key=self.aes_key, receive_id=self.corp_id)
        ts = str(int(time.time()))
        body = (
            f"<xml><ToUserName><![CDATA[{escape(self.corp_id)}]]></ToUserName>"
            f"<AgentID><![CDATA[{AGENT_ID}]]></AgentID>"
            f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
        ).encode()
        sig = doc_signature(self.token, ts, nonce, encrypt)
        return SignedRequest({"msg_signature": sig, "timestamp": ts, "nonce": nonce}, body)

    def url_check_query(self, echo: str, *, nonce: str = "echo-nonce") -> dict[str, str]:
        echostr = doc_encrypt(echo.encode(), aes_key=self.aes_key, receive_id=self.corp_id)
        ts = str(int(time.time()))
        sig = doc_signature(self.token, ts, nonce, echostr)
        return {"msg_signature": sig, "timestamp": ts, "nonce": nonce, "echostr": echostr}

    async def post(
        self, http: aiohttp.ClientSession, base: str, fields: dict[str, Any]
    ) -> tuple[int, str]:
        """Deliver one message; (status, body text)."""
        req = self.sign_message(message_xml(fields))
        async with http.post(base + "/webhooks/wecom", params=req.query, data=req.body) as resp:
            return resp.status, await resp.text()


def sent_json(fake: FakeWeCom) -> str:
    """The recorded sends, for assertion messages."""
    return json.dumps([s.__dict__ for s in fake.sent], ensure_ascii=False)[:2000]
