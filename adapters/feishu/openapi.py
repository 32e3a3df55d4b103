"""Feishu OpenAPI client: cached tenant token, image download, reply, card update, WS endpoint.

Every call goes through the :class:`~adapters.http.HttpClient` seam and one retry policy
(tenacity): 429 / code 99991400 wait for ``x-ogw-ratelimit-reset``; 5xx and I/O errors back off
exponentially with jitter; code 99991663 (token invalid) refreshes the token once and retries.
Other errors are permanent: logged, counted, raised as :class:`FeishuApiError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog

from adapters.base import AdapterError
from adapters.feishu.config import FeishuConfig
from adapters.http import BodyTooLarge, HttpClient, HttpError, HttpRequest, HttpResponse
from adapters.retry import Retryable, call_with_retries
from adapters.tokens import TokenCache

log = structlog.get_logger(__name__)

CODE_RATE_LIMITED = 99991400
CODE_TOKEN_INVALID = 99991663
TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
ENDPOINT_PATH = "/callback/ws/endpoint"


class FeishuApiError(AdapterError):
    """A call failed for good; ``code`` is Feishu's error code (or -1), never a secret."""

    def __init__(self, message: str, *, code: int = -1, http_status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class WsEndpoint:
    """The long-connection gateway URL and the ClientConfig Feishu sent with it."""

    url: str
    client_config: Mapping[str, Any]


def idempotency_uuid(message_id: str, purpose: str) -> str:
    """The reply ``uuid`` for ``message_id``: deterministic, so a retried reply never posts twice.

    Feishu keeps a uuid for an hour; the bridge's store covers longer gaps.
    """
    digest = hashlib.sha256(f"{purpose}:{message_id}".encode()).hexdigest()[:40]
    return f"bridge-{digest}"  # 47 characters; Feishu allows 50


class OpenApiClient:
    """Calls Feishu's OpenAPI for one app; safe for concurrent use on one event loop."""

    def __init__(
        self,
        config: FeishuConfig,
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
            name="feishu",
        )
        self.permanent_errors = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"OpenApiClient(base_url={self._cfg.api_root!r})"

    # --- token -------------------------------------------------------------------------------
    async def tenant_token(self) -> str:
        """The cached tenant access token, fetched when absent or within the refresh margin."""
        return await self.tokens.get()

    async def _fetch_token(self) -> tuple[str, float]:
        data = await self._call(
            "POST",
            TOKEN_PATH,
            json_body={"app_id": self._cfg.app_id, "app_secret": self._cfg.app_secret},
            auth=False,
        )
        token = data.get("tenant_access_token")
        expire = data.get("expire")
        if not isinstance(token, str) or not isinstance(expire, int | float):
            raise self._permanent("token answer lacks tenant_access_token", code=-1)
        return token, float(expire)

    def invalidate_token(self, token: str | None = None) -> None:
        """Forget the cached token (Feishu said it, or ``token`` if given, is no longer valid)."""
        self.tokens.invalidate(token)

    # --- calls -------------------------------------------------------------------------------
    async def download_image(
        self, message_id: str, file_key: str, resource_type: str = "image"
    ) -> bytes:
        """Download a message's image resource, at most ``max_image_bytes``.

        Raises:
            FeishuApiError: missing, too large, refused, or retries exhausted.
        """
        path = (
            f"/open-apis/im/v1/messages/{quote(message_id, safe='')}"
            f"/resources/{quote(file_key, safe='')}"
        )
        resp = await self._call_raw("GET", path, params={"type": resource_type})
        if not resp.body:
            raise self._permanent("image resource is empty", code=-1, http_status=resp.status)
        return resp.body

    async def reply(self, message_id: str, msg_type: str, content: str, uuid: str) -> str:
        """Reply to ``message_id``; returns the new message's id (the same one on a uuid replay)."""
        data = await self._call(
            "POST",
            f"/open-apis/im/v1/messages/{quote(message_id, safe='')}/reply",
            json_body={"msg_type": msg_type, "content": content, "uuid": uuid},
        )
        reply_id = _get(data, "data", "message_id")
        if not isinstance(reply_id, str):
            raise self._permanent("reply answer lacks data.message_id", code=-1)
        return reply_id

    async def patch(self, message_id: str, content: str) -> None:
        """Replace the card content of a message the bot sent."""
        await self._call(
            "PATCH",
            f"/open-apis/im/v1/messages/{quote(message_id, safe='')}",
            json_body={"content": content},
        )

    async def ws_endpoint(self) -> WsEndpoint:
        """Ask for a long-connection gateway URL with the app's credentials."""
        data = await self._call(
            "POST",
            ENDPOINT_PATH,
            json_body={"AppID": self._cfg.app_id, "AppSecret": self._cfg.app_secret},
            auth=False,
            headers={"locale": "zh"},
        )
        url = _get(data, "data", "URL")
        client_config = _get(data, "data", "ClientConfig")
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise self._permanent("endpoint answer lacks a ws URL", code=-1)
        return WsEndpoint(
            url=url, client_config=client_config if isinstance(client_config, dict) else {}
        )

    # --- machinery ---------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        auth: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        resp = await self._call_raw(
            method, path, json_body=json_body, params=params, auth=auth, headers=headers
        )
        data = _json(resp)
        if data is None:
            raise self._permanent(f"{method} {path}: answer is not JSON", http_status=resp.status)
        return data

    async def _call_raw(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        auth: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        try:
            return await call_with_retries(
                lambda: self._once(method, path, json_body, params, auth, headers),
                attempts=self._cfg.api_max_attempts,
                base_s=self._cfg.api_backoff_base_s,
                cap_s=self._cfg.api_backoff_max_s,
                rng=self._rng,
                sleep=self._sleep,
                event="feishu.api_retry",
                max_wait_s=self._cfg.rate_limit_max_wait_s,
            )
        except Retryable as exc:
            raise self._permanent(f"{method} {_trim(path)}: gave up: {exc}") from None

    async def _once(
        self,
        method: str,
        path: str,
        json_body: Any,
        params: Mapping[str, str] | None,
        auth: bool,
        headers: Mapping[str, str] | None,
    ) -> HttpResponse:
        hdrs = dict(headers or {})
        token = ""
        if auth:
            token = await self.tenant_token()
            hdrs["Authorization"] = f"Bearer {token}"
        request = HttpRequest.build(
            method,
            self._cfg.api_root + path,
            params=params,
            json_body=json_body,
            headers=hdrs,
            timeout_s=self._cfg.api_timeout_s,
        )
        limit = self._cfg.max_image_bytes if method == "GET" else 1_000_000
        try:
            resp = await self._http.send(request, max_body_bytes=limit)
        except BodyTooLarge:
            raise self._permanent(f"{method} {_trim(path)}: answer too large") from None
        except HttpError as exc:
            raise Retryable(f"transport: {exc}") from None
        data = _json(resp)
        code = data.get("code") if data is not None else None
        if resp.status == 429 or code == CODE_RATE_LIMITED:
            raise Retryable("rate limited", wait_s=self._reset_after(resp))
        if resp.status >= 500:
            raise Retryable(f"http {resp.status}")
        if code == CODE_TOKEN_INVALID and auth:
            self.invalidate_token(token)
            raise Retryable("token invalid", wait_s=0.0)
        if isinstance(code, int) and code != 0:
            msg = data.get("msg") if data is not None else None
            raise self._permanent(
                f"{method} {_trim(path)}: code {code}: {str(msg)[:120]}",
                code=code,
                http_status=resp.status,
            )
        if resp.status >= 400:
            raise self._permanent(
                f"{method} {_trim(path)}: http {resp.status}", http_status=resp.status
            )
        return resp

    def _reset_after(self, resp: HttpResponse) -> float:
        raw = resp.header("x-ogw-ratelimit-reset")
        try:
            wait = float(raw) if raw is not None else self._cfg.api_backoff_base_s
        except ValueError:
            wait = self._cfg.api_backoff_base_s
        return max(wait, 0.0)  # never shortened: a longer wait than allowed fails the call

    def _permanent(self, message: str, *, code: int = -1, http_status: int = 0) -> FeishuApiError:
        self.permanent_errors += 1
        self.last_error = message
        log.warning("feishu.api_error", error=message, code=code, http_status=http_status)
        return FeishuApiError(message, code=code, http_status=http_status)


def _json(resp: HttpResponse) -> dict[str, Any] | None:
    ctype = resp.header("content-type") or ""
    if "json" not in ctype and not resp.body.startswith(b"{"):
        return None
    try:
        data = resp.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _trim(path: str) -> str:
    return path if len(path) <= 120 else path[:117] + "..."
