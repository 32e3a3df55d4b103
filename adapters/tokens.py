"""One cache for platform access tokens (Feishu tenant token, DingTalk and WeCom access tokens).

Every platform hands out a token that lives for a stated time; a client must refresh it a margin
before it runs out, must not send one fetch per concurrent caller when it is missing, and must
drop it when the platform says it is invalid. :class:`TokenCache` does those three things once,
with an injectable clock so tests can move time instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

#: Fetches a fresh token: returns ``(token, lifetime in seconds)`` or raises the platform's error.
TokenFetch = Callable[[], Awaitable[tuple[str, float]]]


class TokenCache:
    """A token fetched on demand and kept until ``refresh_margin_s`` before it expires.

    Args:
        fetch: gets a new token and its stated lifetime (seconds).
        refresh_margin_s: a token is refreshed this long before its stated expiry, so a call
            never goes out with one about to lapse on the way.
        clock: monotonic seconds (injected by tests).
        name: the platform, for the ``token_refreshed`` log event (never the token itself).

    Concurrent :meth:`get` calls while no valid token is cached share one fetch (single-flight):
    they all get its token or all see its error; a caller cancelled while waiting does not
    cancel the fetch for the others.
    """

    def __init__(
        self,
        fetch: TokenFetch,
        *,
        refresh_margin_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "platform",
    ) -> None:
        self._fetch = fetch
        self._margin = max(0.0, refresh_margin_s)
        self._clock = clock
        self._name = name
        self._token: str | None = None
        self._fresh_until = 0.0
        self._inflight: asyncio.Future[str] | None = None
        self.fetches = 0

    def __repr__(self) -> str:
        return f"TokenCache(name={self._name!r}, cached={self._token is not None})"

    def cached(self) -> str | None:
        """The token now cached and still fresh, or None (never fetches)."""
        if self._token is not None and self._clock() < self._fresh_until:
            return self._token
        return None

    async def get(self) -> str:
        """A fresh token: the cached one, or the result of the one fetch now under way."""
        token = self.cached()
        if token is not None:
            return token
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
            self._inflight.add_done_callback(self._settled)
        return await asyncio.shield(self._inflight)

    def invalidate(self, token: str | None = None) -> None:
        """Drop the cached token (the platform called it invalid or expired).

        With ``token``, only if it is still the cached one: concurrent calls refused with the old
        token must not throw away the new one another call has just fetched.
        """
        if token is None or token == self._token:
            self._token = None
            self._fresh_until = 0.0

    async def _refresh(self) -> str:
        self.fetches += 1
        token, lifetime_s = await self._fetch()
        self._token = token
        self._fresh_until = self._clock() + max(0.0, float(lifetime_s) - self._margin)
        log.info(f"{self._name}.token_refreshed", expires_in_s=int(lifetime_s))
        return token

    def _settled(self, future: asyncio.Future[str]) -> None:
        """Clear the in-flight fetch and mark its error seen (every waiter may have gone)."""
        if self._inflight is future:
            self._inflight = None
        if not future.cancelled():
            with contextlib.suppress(BaseException):
                future.exception()
