"""DingTalk OpenAPI: stream connection tickets, a cached access token, files, robot messages.

Every call goes through the :class:`~adapters.http.HttpClient` seam and one retry policy
(tenacity): HTTP 429, ``Forbidden.AccessDenied.QpsLimitForApi``/``Throttling`` codes and
``errcode`` 130101 (sending too fast) wait and retry, as do 5xx and transport errors; a 401 or
``InvalidAuthentication`` refreshes the token once. Other errors are permanent
(:class:`DingTalkApiError`). Secrets and tokens go only into request bodies and headers, never
into messages or logs.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from adapters.base import AdapterError
from adapters.dingtalk.config import BOT_MESSAGE_TOPIC, DingTalkConfig
from adapters.http import BodyTooLarge, HttpClient, HttpError, HttpRequest, HttpResponse
from adapters.retry import Retryable, call_with_retries
from adapters.tokens import TokenCache

log = structlog.get_logger(__name__)

OPEN_PATH = "/v1.0/gateway/connections/open"
TOKEN_PATH = "/v1.0/oauth2/accessToken"
DOWNLOAD_PATH = "/v1.0/robot/messageFiles/download"
SINGLE_SEND_PATH = "/v1.0/robot/oToMessages/batchSend"
GROUP_SEND_PATH = "/v1.0/robot/groupMessages/send"
TOKEN_HEADER = "x-acs-dingtalk-access-token"
RATE_LIMIT_CODES = frozenset(
    {"Forbidden.AccessDenied.QpsLimitForApi", "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"}
)
RATE_LIMIT_ERRCODES = frozenset({130101})  # "send too fast" (robot webhooks)
USER_AGENT = "the-bridge/0.1 (dingtalk stream)"


class DingTalkApiError(AdapterError):
    """A call failed for good; ``code`` is DingTalk's code (or ``""``), never a secret."""

    def __init__(self, message: str, *, code: str = "", http_status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


def local_ip() -> str:
    """This host's outbound address for ``localIp`` (no packet is sent; empty when unknown)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            return str(sock.getsockname()[0])
    except OSError:
        return ""


class DingTalkApi:
    """Calls DingTalk's OpenAPI for one app; safe for concurrent use on one event loop."""

    def __init__(
        self,
        config: DingTalkConfig,
        http: HttpClient,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = config
        self._http = http
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.tokens = TokenCache(
            self._fetch_token,
            refresh_margin_s=config.token_refresh_margin_s,
            clock=monotonic,
            name="dingtalk",
        )
        self.permanent_errors = 0

    def __repr__(self) -> str:
        return f"DingTalkApi(base_url={self._cfg.api_root!r})"

    async def open_connection(self) -> tuple[str, str]:
        """Register a stream connection; returns ``(endpoint, ticket)``."""
        data = await self._call(
            "POST",
            self._cfg.api_root + OPEN_PATH,
            {
                "clientId": self._cfg.client_id,
                "clientSecret": self._cfg.client_secret,
                "subscriptions": [{"type": "CALLBACK", "topic": BOT_MESSAGE_TOPIC}],
                "ua": USER_AGENT,
                "localIp": local_ip(),
            },
            auth=False,
        )
        endpoint, ticket = data.get("endpoint"), data.get("ticket")
        if not isinstance(endpoint, str) or not endpoint.startswith(("ws://", "wss://")):
            raise self._permanent("connections/open answer lacks a ws endpoint")
        if not isinstance(ticket, str) or not ticket:
            raise self._permanent("connections/open answer lacks a ticket")
        return endpoint, ticket

    async def access_token(self) -> str:
        """The cached app access token, fetched when absent or within the refresh margin."""
        return await self.tokens.get()

    async def _fetch_token(self) -> tuple[str, float]:
        data = await self._call(
            "POST",
            self._cfg.api_root + TOKEN_PATH,
            {"appKey": self._cfg.client_id, "appSecret": self._cfg.client_secret},
            auth=False,
        )
        token, expire = data.get("accessToken"), data.get("expireIn")
        if not isinstance(token, str) or not isinstance(expire, int | float):
            raise self._permanent("accessToken answer lacks accessToken/expireIn")
        return token, float(expire)

    def invalidate_token(self, token: str | None = None) -> None:
        """Forget the cached token (DingTalk said it, or ``token`` if given, is no longer valid)."""
        self.tokens.invalidate(token)

    async def download_image(self, download_code: str, robot_code: str) -> bytes:
        """Exchange a ``downloadCode`` for its URL and fetch it (at most ``max_image_bytes``)."""
        data = await self._call(
            "POST",
            self._cfg.api_root + DOWNLOAD_PATH,
            {"downloadCode": download_code, "robotCode": robot_code or self._cfg.client_id},
        )
        url = data.get("downloadUrl")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise self._permanent("messageFiles/download answer lacks downloadUrl")
        resp = await self._send("GET", url, None, auth=False, limit=self._cfg.max_image_bytes)
        if resp.status >= 400 or not resp.body:
            raise self._permanent(f"file download: http {resp.status}", http_status=resp.status)
        return resp.body

    async def post_webhook(self, url: str, body: Mapping[str, Any]) -> None:
        """Post a message to a conversation's ``sessionWebhook``."""
        await self._call("POST", url, body, auth=False, name="sessionWebhook")

    async def send_robot_message(
        self, *, single_chat: bool, robot_code: str, target: str, msg_key: str, param: str
    ) -> str:
        """Send through the robot API (to a user in single chat, or to a group); its query key."""
        body: dict[str, Any] = {
            "robotCode": robot_code or self._cfg.client_id,
            "msgKey": msg_key,
            "msgParam": param,
        }
        if single_chat:
            body["userIds"] = [target]
            path = SINGLE_SEND_PATH
        else:
            body["openConversationId"] = target
            path = GROUP_SEND_PATH
        data = await self._call("POST", self._cfg.api_root + path, body)
        key = data.get("processQueryKey")
        return key if isinstance(key, str) else ""

    async def call(self, method: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """One authenticated OpenAPI call (``path`` under the base URL); its JSON answer."""
        return await self._call(method, self._cfg.api_root + path, body)

    # --- machinery ---------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        url: str,
        body: Mapping[str, Any] | None,
        *,
        auth: bool = True,
        name: str | None = None,
    ) -> dict[str, Any]:
        resp = await self._send(method, url, body, auth=auth, limit=1_000_000, name=name)
        data = _json(resp)
        if data is None:
            raise self._permanent(f"{_name(url, name)}: answer is not JSON")
        return data

    async def _send(
        self,
        method: str,
        url: str,
        body: Mapping[str, Any] | None,
        *,
        auth: bool,
        limit: int,
        name: str | None = None,
    ) -> HttpResponse:
        label = _name(url, name)
        try:
            return await call_with_retries(
                lambda: self._once(method, url, body, auth, limit, label),
                attempts=self._cfg.api_max_attempts,
                base_s=self._cfg.api_backoff_base_s,
                cap_s=self._cfg.api_backoff_max_s,
                rng=self._rng,
                sleep=self._sleep,
                event="dingtalk.api_retry",
                max_wait_s=self._cfg.api_backoff_max_s,
            )
        except Retryable as exc:
            raise self._permanent(f"{label}: gave up: {exc}") from None

    async def _once(
        self,
        method: str,
        url: str,
        body: Mapping[str, Any] | None,
        auth: bool,
        limit: int,
        label: str,
    ) -> HttpResponse:
        headers = {"Accept": "application/json"}
        token = ""
        if auth:
            token = headers[TOKEN_HEADER] = await self.access_token()
        request = HttpRequest.build(
            method, url, json_body=body, headers=headers, timeout_s=self._cfg.api_timeout_s
        )
        try:
            resp = await self._http.send(request, max_body_bytes=limit)
        except BodyTooLarge:
            raise self._permanent(f"{label}: answer too large") from None
        except HttpError as exc:
            raise Retryable(f"transport: {exc}") from None
        data = _json(resp)
        code = data.get("code") if data is not None else None
        errcode = data.get("errcode") if data is not None else None
        if resp.status == 429 or code in RATE_LIMIT_CODES or errcode in RATE_LIMIT_ERRCODES:
            raise Retryable("rate limited", wait_s=self._retry_after(resp))
        if resp.status >= 500:
            raise Retryable(f"http {resp.status}")
        if auth and (resp.status == 401 or code == "InvalidAuthentication"):
            self.invalidate_token(token)
            raise Retryable("token invalid", wait_s=0.0)
        if isinstance(errcode, int) and errcode != 0:
            raise self._permanent(f"{label}: errcode {errcode}", code=str(errcode))
        if resp.status >= 400:
            detail = f" code {str(code)[:80]}" if isinstance(code, str) else ""
            raise self._permanent(
                f"{label}: http {resp.status}{detail}",
                code=code if isinstance(code, str) else "",
                http_status=resp.status,
            )
        return resp

    def _retry_after(self, resp: HttpResponse) -> float | None:
        raw = resp.header("retry-after")
        try:
            return max(float(raw), 0.0) if raw else None  # never shortened (see max_wait_s)
        except ValueError:
            return None

    def _permanent(self, message: str, *, code: str = "", http_status: int = 0) -> DingTalkApiError:
        self.permanent_errors += 1
        log.warning("dingtalk.api_error", error=message, code=code, http_status=http_status)
        return DingTalkApiError(message, code=code, http_status=http_status)


def _name(url: str, name: str | None) -> str:
    """What a log line may say about a URL: its path (webhooks and file URLs carry tokens)."""
    if name is not None:
        return name
    path = url.split("?", 1)[0].split("://", 1)[-1]
    path = "/" + path.split("/", 1)[1] if "/" in path else "/"
    return path if path.startswith("/v1.0/") else "file"


def _json(resp: HttpResponse) -> dict[str, Any] | None:
    """The body as a JSON object; ``{}`` when empty, None when not JSON (a file, an HTML page)."""
    if not resp.body:
        return {}
    if resp.body[:64].lstrip()[:1] != b"{":
        return None
    try:
        data = resp.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
