"""Slack Web API calls the adapter makes: apps.connections.open, chat.postMessage/update, files.

Every call goes through the :class:`~adapters.http.HttpClient` seam with one retry loop: HTTP 429
and ``{"ok": false, "error": "ratelimited"}`` wait ``Retry-After`` seconds (in full; a longer wait
than allowed fails the call); 5xx and I/O errors back off exponentially with jitter
(:mod:`adapters.retry`); any other ``ok: false`` is permanent. Tokens travel
only in the ``Authorization`` header and never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import structlog

from adapters.base import AdapterError
from adapters.http import BodyTooLarge, HttpClient, HttpError, HttpRequest, HttpResponse
from adapters.retry import Retryable, TooLongWait, call_with_retries
from adapters.slack.config import SlackConfig

log = structlog.get_logger(__name__)

#: ``apps.connections.open`` errors that no retry can mend: the app or its token is refused.
REFUSALS = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "not_allowed_token_type"}
)
#: Backoff waits run from the doubling base to 20 % above it (never below: Slack's own hint).
JITTER = 0.2
#: Metadata ``event_type`` of the bridge's replies (found again by their tag after a crash).
REPLY_EVENT_TYPE = "bridge_reply"


class SlackApiError(AdapterError):
    """A call failed for good; ``error`` is Slack's error string (or ``http_<status>``)."""

    def __init__(self, message: str, *, error: str = "", http_status: int = 0) -> None:
        super().__init__(message)
        self.error = error
        self.http_status = http_status


class SlackWebApi:
    """Calls Slack's Web API for one app; safe for concurrent use on one event loop."""

    def __init__(
        self,
        config: SlackConfig,
        http: HttpClient,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = config
        self._http = http
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.permanent_errors = 0
        self.rate_limited = 0

    def __repr__(self) -> str:
        return f"SlackWebApi(base_url={self._cfg.api_root!r})"

    async def connections_open(self) -> str:
        """A fresh Socket Mode WebSocket URL, asked for with the app-level token."""
        data = await self.call("apps.connections.open", None, token=self._cfg.app_token)
        url = data.get("url")
        if not isinstance(url, str) or not url.startswith(("wss://", "ws://")):
            raise self._permanent("apps.connections.open answer lacks a wss URL")
        return url

    async def post_message(
        self, channel: str, text: str, thread_ts: str | None, *, tag: str | None = None
    ) -> str:
        """Post ``text`` (in the thread of ``thread_ts``); returns the new message's ``ts``.

        ``tag`` goes into the message's metadata (``event_type`` :data:`REPLY_EVENT_TYPE`), so
        that :meth:`find_tagged_reply` can find the message again after a crash.
        """
        body: dict[str, Any] = {"channel": channel, "text": text}
        if thread_ts:
            body["thread_ts"] = thread_ts
        if tag is not None:
            body["metadata"] = {"event_type": REPLY_EVENT_TYPE, "event_payload": {"tag": tag}}
        data = await self.call("chat.postMessage", body, token=self._cfg.bot_token)
        ts = data.get("ts")
        if not isinstance(ts, str) or not ts:
            raise self._permanent("chat.postMessage answer lacks ts")
        return ts

    async def find_tagged_reply(self, channel: str, thread_ts: str, tag: str) -> str | None:
        """The ``ts`` of the bot's reply tagged ``tag`` in the thread, if one was posted.

        Why: chat.postMessage has no idempotency key; a process that died after posting but
        before the bridge stored the reply's ts would otherwise post a second reply. One try
        only (``conversations.replies`` is rate-limited harder): on any failure None.
        """
        params = {"channel": channel, "ts": thread_ts, "include_all_metadata": "true",
                  "limit": "200"}  # fmt: skip
        try:
            data = await self.call("conversations.replies", None, token=self._cfg.bot_token,
                                   params=params, attempts=1)  # fmt: skip
        except SlackApiError as exc:
            log.info("slack.reply_lookup_failed", thread_ts=thread_ts, error=exc.error)
            return None
        messages = data.get("messages")
        for item in messages if isinstance(messages, list) else []:
            meta = item.get("metadata") if isinstance(item, dict) else None
            if not isinstance(meta, dict) or meta.get("event_type") != REPLY_EVENT_TYPE:
                continue
            payload = meta.get("event_payload")
            ts = item.get("ts")
            if isinstance(payload, dict) and payload.get("tag") == tag and isinstance(ts, str):
                return ts
        return None

    async def update_message(self, channel: str, ts: str, text: str) -> None:
        """Replace the text of a message the bot posted."""
        await self.call(
            "chat.update", {"channel": channel, "ts": ts, "text": text}, token=self._cfg.bot_token
        )

    async def download_file(self, url: str) -> bytes:
        """Download a private file with the bot token, at most ``max_image_bytes``.

        The token is only sent to the allowed file hosts (``files.slack.com``), so a hostile
        event cannot point the bridge at another server to collect it.
        """
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("https", "http") or host not in self._cfg.allowed_file_hosts:
            raise self._permanent(f"file URL host {host[:80]!r} is not a Slack file host")
        resp = await self._send(
            HttpRequest.build(
                "GET",
                url,
                headers=self._auth(self._cfg.bot_token),
                timeout_s=self._cfg.api_timeout_s,
            ),
            "files",
            max_body_bytes=self._cfg.max_image_bytes,
        )
        ctype = (resp.header("content-type") or "").lower()
        if resp.status != 200:
            raise self._permanent(f"file download: http {resp.status}", http_status=resp.status)
        if ctype.startswith("text/html"):
            # Slack answers a login page when the token lacks files:read or the file is gone.
            raise self._permanent("file download got an HTML page (missing files:read scope?)")
        if not resp.body:
            raise self._permanent("file download is empty")
        return resp.body

    async def call(
        self,
        method: str,
        body: dict[str, Any] | None,
        *,
        token: str,
        params: dict[str, str] | None = None,
        attempts: int | None = None,
    ) -> dict[str, Any]:
        """Call a Web API method; returns Slack's answer when ``ok`` is true.

        Write methods get a JSON body (POST); read methods (``params``) a query string (GET),
        as Slack takes JSON bodies only for write methods.

        Raises:
            SlackApiError: ``ok`` false, a bad answer, or retries exhausted.
        """
        request = HttpRequest.build(
            "GET" if params is not None else "POST",
            f"{self._cfg.api_root}/{method}",
            params=params,
            json_body=None if params is not None else (body if body is not None else {}),
            headers=self._auth(token),
            timeout_s=self._cfg.api_timeout_s,
        )
        resp = await self._send(request, method, attempts=attempts)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._permanent(
                f"{method}: http {resp.status}, answer is not JSON", http_status=resp.status
            )
        if data.get("ok") is not True:
            error = data.get("error")
            error = error[:80] if isinstance(error, str) else "unknown"
            raise self._permanent(f"{method}: {error}", error=error, http_status=resp.status)
        return data

    async def _send(
        self,
        request: HttpRequest,
        what: str,
        *,
        max_body_bytes: int = 2**20,
        attempts: int | None = None,
    ) -> HttpResponse:
        """Send with retries; returns the first answer that is neither rate-limited nor 5xx.

        The loop is :func:`~adapters.retry.call_with_retries`; a ``Retry-After`` is waited in
        full, and one longer than ``rate_limit_max_wait_s`` fails the call instead.
        """
        attempts = attempts or self._cfg.api_max_attempts
        try:
            return await call_with_retries(
                lambda: self._send_once(request, what, max_body_bytes),
                attempts=attempts,
                base_s=self._cfg.api_backoff_base_s,
                cap_s=self._cfg.api_backoff_max_s,
                rng=self._rng,
                sleep=self._sleep,
                event="slack.api_retry",
                max_wait_s=self._cfg.rate_limit_max_wait_s,
                jitter=JITTER,
                spread="above",
            )
        except TooLongWait as exc:
            raise self._permanent(f"{what}: {exc}") from None
        except Retryable as exc:
            raise self._permanent(f"{what}: {exc} after {attempts} tries") from None

    async def _send_once(
        self, request: HttpRequest, what: str, max_body_bytes: int
    ) -> HttpResponse:
        """One try: the answer, or :class:`Retryable` for a rate limit, a 5xx or an I/O error."""
        try:
            resp = await self._http.send(request, max_body_bytes=max_body_bytes)
        except BodyTooLarge:
            raise self._permanent(f"{what}: answer exceeds {max_body_bytes} bytes") from None
        except HttpError as exc:
            raise Retryable(str(exc)[:200]) from None
        if resp.status == 429 or _is_ratelimited(resp):
            self.rate_limited += 1
            raise Retryable("rate limited", wait_s=_retry_after(resp))
        if resp.status >= 500:
            raise Retryable(f"http {resp.status}")
        return resp

    def _auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def _permanent(self, message: str, *, error: str = "", http_status: int = 0) -> SlackApiError:
        self.permanent_errors += 1
        log.warning("slack.api_error", error=message)
        return SlackApiError(message, error=error, http_status=http_status)


def _is_ratelimited(resp: HttpResponse) -> bool:
    if b"ratelimited" not in resp.body[:512]:
        return False
    try:
        data = resp.json()
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("error") == "ratelimited"


def _retry_after(resp: HttpResponse) -> float:
    """Slack's ``Retry-After`` seconds (1 when absent or unreadable), never shortened."""
    raw = resp.header("retry-after")
    try:
        value = float(raw) if raw is not None else 1.0
    except ValueError:
        value = 1.0
    if value != value or value < 0:  # NaN or negative
        value = 1.0
    return value
