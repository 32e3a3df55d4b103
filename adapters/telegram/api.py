"""Bot API client: ``POST {base}/bot<token>/<method>`` with JSON, the file download, retries.

The token is part of every URL, so no URL ever leaves this module: errors and log lines name the
method only, and any text that could carry the token (a transport error) is redacted. 429 waits
``parameters.retry_after``; 5xx and I/O errors back off with the injected :class:`Backoff`; other
errors are permanent and raised as :class:`TelegramApiError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import structlog

from adapters.base import AdapterError
from adapters.http import BodyTooLarge, HttpClient, HttpError, HttpRequest, HttpResponse
from adapters.retry import Backoff, Retryable, call_with_retries
from adapters.telegram.config import TelegramConfig

log = structlog.get_logger(__name__)

NOT_MODIFIED = "message is not modified"
MAX_API_BODY = 4 * 1024 * 1024


#: Makes the jittered, capped backoff (one :class:`~adapters.retry.Backoff` per loop).
DelaysFactory = Callable[[], Backoff]


class TelegramApiError(AdapterError):
    """A call failed for good; the message names the method and Telegram's description only."""

    def __init__(self, message: str, *, error_code: int = -1, description: str = "") -> None:
        super().__init__(message)
        self.error_code = error_code
        self.description = description


class BotApi:
    """Calls the Bot API for one bot; safe for concurrent use on one event loop."""

    def __init__(
        self,
        config: TelegramConfig,
        http: HttpClient,
        delays: DelaysFactory,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._cfg = config
        self._http = http
        self._delays = delays
        self._sleep = sleep
        self.permanent_errors = 0
        self.last_error: str | None = None
        #: Told ``(params, seconds)`` when Telegram asks a call to wait (per-chat pacing uses it).
        self.on_rate_limited: Callable[[dict[str, Any], float], None] | None = None

    def __repr__(self) -> str:
        return f"BotApi(base_url={self._cfg.api_root!r}, token='***')"

    def redact(self, text: str) -> str:
        """``text`` with the token (and its URL-quoted form) replaced by ``***``."""
        token = self._cfg.token
        for form in {token, quote(token, safe="")}:
            if form:
                text = text.replace(form, "***")
        return text

    async def call(self, method: str, params: dict[str, Any], *, timeout_s: float = 0.0) -> Any:
        """Call ``method`` and return its ``result``.

        Raises:
            TelegramApiError: the call failed for good (after retries).
        """
        url = f"{self._cfg.api_root}/bot{self._cfg.token}/{method}"
        request = HttpRequest.build(
            "POST", url, json_body=params, timeout_s=timeout_s or self._cfg.api_timeout_s
        )
        resp = await self._send(method, request, MAX_API_BODY, params)
        data = _json(resp)
        if data is None:
            raise self._permanent(method, f"http {resp.status}, answer is not JSON")
        return data.get("result")

    async def download(self, file_path: str) -> bytes:
        """``GET {base}/file/bot<token>/<file_path>`` of at most ``max_image_bytes``.

        Raises:
            TelegramApiError: the file could not be had (missing, too large, refused).
        """
        url = f"{self._cfg.api_root}/file/bot{self._cfg.token}/{quote(file_path, safe='/')}"
        request = HttpRequest.build("GET", url, timeout_s=self._cfg.api_timeout_s)
        resp = await self._send("file", request, self._cfg.max_image_bytes)
        if not resp.body:
            raise self._permanent("file", "the file is empty")
        return resp.body

    async def _send(
        self, what: str, request: HttpRequest, limit: int, params: dict[str, Any] | None = None
    ) -> HttpResponse:
        """Send under :func:`~adapters.retry.call_with_retries` with a fresh injected backoff."""
        try:
            return await call_with_retries(
                lambda: self._once(what, request, limit, params),
                attempts=self._cfg.api_max_attempts,
                sleep=self._sleep,
                event="telegram.api_retry",
                backoff=self._delays(),
            )
        except Retryable as exc:
            raise self._permanent(what, f"gave up: {exc}") from None

    async def _once(
        self, what: str, request: HttpRequest, limit: int, params: dict[str, Any] | None
    ) -> HttpResponse:
        """One try; a rate limit tells ``on_rate_limited`` (per-chat pacing) before it retries."""
        try:
            resp = await self._http.send(request, max_body_bytes=limit)
        except BodyTooLarge:
            raise self._permanent(what, f"answer larger than {limit} bytes") from None
        except HttpError as exc:
            raise Retryable(f"transport: {self.redact(str(exc))[:160]}") from None
        data = _json(resp)
        if resp.status == 429 or (data is not None and data.get("error_code") == 429):
            limited = self._rate_limited(what, data)
            if isinstance(limited, Retryable) and params is not None and self.on_rate_limited:
                self.on_rate_limited(params, limited.wait_s or 0.0)
            raise limited
        if resp.status >= 500:
            raise Retryable(f"http {resp.status}")
        if data is not None and data.get("ok") is False:
            code = data.get("error_code")
            desc = self.redact(str(data.get("description", "")))[:200]
            raise self._permanent(
                what,
                f"error {code}: {desc}",
                error_code=code if isinstance(code, int) else -1,
                description=desc,
            )
        if resp.status >= 400:
            raise self._permanent(what, f"http {resp.status}", error_code=resp.status)
        return resp

    def _rate_limited(self, what: str, data: dict[str, Any] | None) -> Exception:
        params = data.get("parameters") if data is not None else None
        raw = params.get("retry_after") if isinstance(params, dict) else None
        wait = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else 1.0
        wait = max(wait, 0.0)
        if wait > self._cfg.rate_limit_max_wait_s:
            return self._permanent(what, f"rate limited for {wait:.0f}s", error_code=429)
        return Retryable(f"rate limited, retry after {wait:g}s", wait_s=wait)

    def _permanent(
        self, what: str, message: str, *, error_code: int = -1, description: str = ""
    ) -> TelegramApiError:
        text = f"{what}: {message}"
        if NOT_MODIFIED not in description:
            self.permanent_errors += 1
            self.last_error = text
            log.warning("telegram.api_error", method=what, error=message, error_code=error_code)
        return TelegramApiError(text, error_code=error_code, description=description)


def _json(resp: HttpResponse) -> dict[str, Any] | None:
    try:
        data = resp.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
