"""The adapters' one HTTP seam: a small client protocol, an aiohttp client, a test transport.

Adapters build :class:`HttpRequest` values and get :class:`HttpResponse` values back, so a test can
answer them with a plain function (:class:`MockTransport`, like httpx's) or a loopback server
(:class:`AiohttpClient`), and no adapter touches a web framework directly.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp

DEFAULT_TIMEOUT_S = 10.0


class HttpError(Exception):
    """The request did not produce a response (connection refused, reset, timeout)."""


class BodyTooLarge(HttpError):
    """The response body exceeded the caller's ``max_body_bytes``."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An outgoing request; ``headers`` may hold credentials, so it is never logged whole."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def build(
        cls,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> HttpRequest:
        """Build a request with an optional query string and JSON body."""
        hdrs = dict(headers or {})
        body: bytes | None = None
        if json_body is not None:
            body = json.dumps(json_body, ensure_ascii=False, separators=(",", ":")).encode()
            hdrs.setdefault("Content-Type", "application/json; charset=utf-8")
        if params:
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
        return cls(method=method.upper(), url=url, headers=hdrs, body=body, timeout_s=timeout_s)

    def json(self) -> Any:
        """The body decoded as JSON (for fakes and tests)."""
        return json.loads(self.body or b"null")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A response with lower-cased header names and the whole body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """A header value by case-insensitive name."""
        return self.headers.get(name.lower())

    def json(self) -> Any:
        """The body decoded as JSON.

        Raises:
            ValueError: the body is not JSON.
        """
        return json.loads(self.body)

    @classmethod
    def of_json(
        cls, data: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> HttpResponse:
        """A JSON response (for fakes and tests)."""
        hdrs = {k.lower(): v for k, v in (headers or {}).items()}
        hdrs.setdefault("content-type", "application/json; charset=utf-8")
        return cls(status=status, headers=hdrs, body=json.dumps(data).encode())


class HttpClient(Protocol):
    """Sends one request and returns its response; the only way adapters speak HTTP."""

    async def send(
        self, request: HttpRequest, *, max_body_bytes: int | None = None
    ) -> HttpResponse:
        """Send ``request``.

        Raises:
            HttpError: no response (the caller may retry).
            BodyTooLarge: the body is larger than ``max_body_bytes``.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class AiohttpClient:
    """:class:`HttpClient` over one lazily created :class:`aiohttp.ClientSession`."""

    def __init__(self, *, limit: int = 100, user_agent: str = "the-bridge/0.1") -> None:
        self._limit = limit
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    def _ensure(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                headers={"User-Agent": self._user_agent},
                auto_decompress=True,
            )
        return self._session

    async def send(
        self, request: HttpRequest, *, max_body_bytes: int | None = None
    ) -> HttpResponse:
        """Send ``request``, reading at most ``max_body_bytes`` of the body."""
        session = self._ensure()
        timeout = aiohttp.ClientTimeout(total=request.timeout_s)
        try:
            async with session.request(
                request.method,
                request.url,
                headers=dict(request.headers),
                data=request.body,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                if (
                    max_body_bytes is not None
                    and resp.content_length is not None
                    and resp.content_length > max_body_bytes
                ):
                    raise BodyTooLarge(f"body of {resp.content_length} bytes exceeds the cap")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if max_body_bytes is not None and size > max_body_bytes:
                        raise BodyTooLarge(f"body exceeds the cap of {max_body_bytes} bytes")
                    chunks.append(chunk)
                headers = {k.lower(): v for k, v in resp.headers.items()}
                return HttpResponse(status=resp.status, headers=headers, body=b"".join(chunks))
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The URL is safe to name (no credentials in query strings); headers are not.
            raise HttpError(
                f"{request.method} {_path(request.url)}: {type(exc).__name__}"
            ) from None

    async def close(self) -> None:
        """Close the session (idempotent)."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


Handler = Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]


class MockTransport:
    """:class:`HttpClient` that answers every request with ``handler(request)`` (sync or async).

    The handler may raise :class:`HttpError` to simulate a transport failure.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.requests: list[HttpRequest] = []

    async def send(
        self, request: HttpRequest, *, max_body_bytes: int | None = None
    ) -> HttpResponse:
        """Record ``request`` and answer it from the handler."""
        self.requests.append(request)
        result = self._handler(request)
        response = await result if inspect.isawaitable(result) else result
        assert isinstance(response, HttpResponse)
        if max_body_bytes is not None and len(response.body) > max_body_bytes:
            raise BodyTooLarge(f"body exceeds the cap of {max_body_bytes} bytes")
        await asyncio.sleep(0)
        return response

    async def close(self) -> None:
        """Nothing to release."""


def _path(url: str) -> str:
    """The URL without its query string (for error messages)."""
    return url.split("?", 1)[0]
