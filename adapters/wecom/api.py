"""WeCom server API client: cached access token, ``media/get`` and ``message/send``.

The access token travels in the query string (``?access_token=``), so no URL of this client is
ever logged or put in an error: messages name the API path only. Rate limits (errcode 45009,
HTTP 429), 5xx and I/O errors back off exponentially with jitter (tenacity); errcode 40014, 42001
or 40001 on a call drops the cached token, fetches a new one and tries once more.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from adapters.base import AdapterError
from adapters.http import BodyTooLarge, HttpClient, HttpError, HttpRequest, HttpResponse
from adapters.retry import Retryable, call_with_retries
from adapters.tokens import TokenCache
from adapters.wecom.config import WeComConfig

log = structlog.get_logger(__name__)

ERR_RATE_LIMITED = 45009
TOKEN_ERRORS = frozenset({40014, 42001, 40001})
TOKEN_PATH = "/cgi-bin/gettoken"
MEDIA_PATH = "/cgi-bin/media/get"
SEND_PATH = "/cgi-bin/message/send"


class WeComApiError(AdapterError):
    """A call failed for good; ``errcode`` is WeCom's code (or -1), never a secret."""

    def __init__(self, message: str, *, errcode: int = -1, http_status: int = 0) -> None:
        super().__init__(message)
        self.errcode = errcode
        self.http_status = http_status


class _TokenRejected(Exception):
    """WeCom refused the access token ``token``: refresh it and try once more."""

    def __init__(self, token: str) -> None:
        super().__init__("access token refused")
        self.token = token


class WeComApi:
    """Calls the WeCom API for one self-built app; safe for concurrent use on one event loop."""

    def __init__(
        self,
        config: WeComConfig,
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
            name="wecom",
        )
        self.permanent_errors = 0

    def __repr__(self) -> str:
        return f"WeComApi(base_url={self._cfg.api_root!r})"

    @property
    def tokens_fetched(self) -> int:
        """How many access tokens this client has fetched."""
        return self.tokens.fetches

    async def access_token(self) -> str:
        """The cached access token, fetched when absent or within the refresh margin."""
        return await self.tokens.get()

    async def _fetch_token(self) -> tuple[str, float]:
        params = {"corpid": self._cfg.corp_id, "corpsecret": self._cfg.secret}
        resp = await self._retrying("GET", TOKEN_PATH, params, None, auth=False)
        data = _json(resp) or {}
        token, expires = data.get("access_token"), data.get("expires_in")
        if not isinstance(token, str) or not token or not isinstance(expires, int | float):
            raise self._permanent("gettoken answer lacks access_token")
        return token, float(expires)

    def invalidate_token(self, token: str | None = None) -> None:
        """Forget the cached token (WeCom said it is invalid or expired).

        With ``token``, only if it is still the cached one: concurrent calls refused with the
        old token must not throw away the new one another call just fetched.
        """
        self.tokens.invalidate(token)

    async def get_media(self, media_id: str) -> bytes:
        """Download a temporary media file (at most ``max_image_bytes``).

        Raises:
            WeComApiError: a JSON error answer (invalid media_id, ...), empty, too large, or
                retries exhausted.
        """
        resp = await self._call("GET", MEDIA_PATH, {"media_id": media_id}, None)
        if not resp.body:
            raise self._permanent("media/get answered an empty body", http_status=resp.status)
        return resp.body

    async def send_text(self, to_user: str, content: str) -> str:
        """Send one text message to ``to_user`` from the app; returns WeCom's ``msgid``.

        Raises:
            WeComApiError: refused (including an invalid user) or retries exhausted.
        """
        body = {
            "touser": to_user,
            "msgtype": "text",
            "agentid": int(self._cfg.agent_id),
            "text": {"content": content},
            "safe": 0,
        }
        resp = await self._call("POST", SEND_PATH, None, body)
        data = _json(resp) or {}
        if data.get("invaliduser"):
            raise self._permanent("message/send: the user is not in the app's visible range")
        msgid = data.get("msgid")
        return msgid if isinstance(msgid, str) and msgid else ""

    # --- machinery ---------------------------------------------------------------------------
    async def _call(
        self, method: str, path: str, params: Mapping[str, str] | None, body: Any
    ) -> HttpResponse:
        try:
            return await self._retrying(method, path, params, body, auth=True)
        except _TokenRejected as exc:
            self.invalidate_token(exc.token)
            log.info("wecom.token_rejected", path=path)
        try:
            return await self._retrying(method, path, params, body, auth=True)
        except _TokenRejected:
            raise self._permanent(f"{method} {path}: access token refused twice") from None

    async def _retrying(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Any,
        *,
        auth: bool,
    ) -> HttpResponse:
        try:
            return await call_with_retries(
                lambda: self._once(method, path, params, body, auth),
                attempts=self._cfg.api_max_attempts,
                base_s=self._cfg.api_backoff_base_s,
                cap_s=self._cfg.api_backoff_max_s,
                rng=self._rng,
                sleep=self._sleep,
                event="wecom.api_retry",
            )
        except Retryable as exc:
            raise self._permanent(f"{method} {path}: gave up: {exc}") from None

    async def _once(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Any,
        auth: bool,
    ) -> HttpResponse:
        query = dict(params or {})
        token = ""
        if auth:
            token = await self.access_token()
            query = {"access_token": token, **query}
        request = HttpRequest.build(
            method,
            self._cfg.api_root + path,
            params=query,
            json_body=body,
            timeout_s=self._cfg.api_timeout_s,
        )
        limit = self._cfg.max_image_bytes if path == MEDIA_PATH else 1_000_000
        try:
            resp = await self._http.send(request, max_body_bytes=limit)
        except BodyTooLarge:
            raise self._permanent(f"{method} {path}: answer larger than {limit} bytes") from None
        except HttpError as exc:
            raise Retryable(f"transport: {_no_query(str(exc))}") from None
        data = _json(resp)
        errcode = data.get("errcode", 0) if data is not None else 0
        if resp.status == 429 or errcode == ERR_RATE_LIMITED:
            raise Retryable("rate limited")
        if resp.status >= 500:
            raise Retryable(f"http {resp.status}")
        if auth and errcode in TOKEN_ERRORS:
            raise _TokenRejected(token)
        if isinstance(errcode, int) and errcode != 0:
            msg = str(data.get("errmsg", "") if data else "")
            raise self._permanent(
                f"{method} {path}: errcode {errcode}: {_no_query(msg)[:120]}",
                errcode=errcode,
                http_status=resp.status,
            )
        if resp.status >= 400:
            raise self._permanent(f"{method} {path}: http {resp.status}", http_status=resp.status)
        return resp

    def _permanent(self, message: str, *, errcode: int = -1, http_status: int = 0) -> WeComApiError:
        self.permanent_errors += 1
        log.warning("wecom.api_error", error=message, errcode=errcode, http_status=http_status)
        return WeComApiError(message, errcode=errcode, http_status=http_status)


def _json(resp: HttpResponse) -> dict[str, Any] | None:
    """The body as a JSON object when it is one (media/get answers errors as JSON, files not)."""
    ctype = resp.header("content-type") or ""
    if "json" not in ctype and "text/plain" not in ctype and not resp.body.startswith(b"{"):
        return None
    try:
        data = resp.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _no_query(text: str) -> str:
    """``text`` cut before any ``access_token=`` (WeCom echoes request details in errmsg)."""
    return text.split("access_token", 1)[0].rstrip(" ,?&:")
