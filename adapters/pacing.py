"""Pacing and coalescing of reply edits, for any platform with a per-chat edit rate rule.

:class:`Pacer` spaces actions on one key (a chat) at least ``interval_s`` apart, reserving slots
in call order so concurrent replies in one chat share the budget. :class:`Coalescer` turns a fast
stream of "text so far" into few sends: one send in flight, the newest text wins, the final text
is always sent last.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

_PRUNE_AT = 4096


class Pacer:
    """At most one action per ``interval_s`` per key; also honours a platform's "wait N s"."""

    def __init__(
        self,
        interval_s: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._interval = interval_s
        self._monotonic = monotonic
        self._sleep = sleep
        self._next: dict[str, float] = {}

    async def wait(self, key: str) -> None:
        """Wait for the next free slot of ``key`` and take it."""
        now = self._monotonic()
        slot = max(now, self._next.get(key, now))
        self._next[key] = slot + self._interval
        if len(self._next) > _PRUNE_AT:
            self._next = {k: v for k, v in self._next.items() if v > now}
        if slot > now:
            await self._sleep(slot - now)

    def hold(self, key: str, seconds: float) -> None:
        """Let no action on ``key`` start in the next ``seconds`` (a 429's ``retry_after``)."""
        until = self._monotonic() + seconds
        self._next[key] = max(self._next.get(key, until), until)


class Coalescer:
    """Sends the newest offered text through ``send``; intermediate texts are skipped.

    ``send`` errors while streaming are logged and the text counted as sent (a failing message
    is not hammered); :meth:`close` sends the final text and lets its error through.
    """

    def __init__(
        self, send: Callable[[str], Awaitable[None]], pace: Callable[[], Awaitable[None]], name: str
    ) -> None:
        self._send = send
        self._pace = pace
        self._name = name
        self._latest: str | None = None
        self._sent: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self.sends = 0
        self.errors = 0

    def offer(self, text: str) -> None:
        """Make ``text`` the next one to send and make sure a flush is scheduled."""
        if self.closed:
            return
        self._latest = text
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush(), name=f"coalesce-{self._name}")

    async def close(self, final: str) -> None:
        """Wait for the send in flight, then send ``final`` (unless it is already shown)."""
        if self.closed:
            return
        self.closed = True
        self._latest = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if final == self._sent:
            return
        await self._pace()
        await self._send(final)
        self._sent = final
        self.sends += 1

    async def aclose(self) -> None:
        """Stop without a final send (shutdown)."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(self._task, return_exceptions=True)

    async def _flush(self) -> None:
        while not self.closed and self._latest is not None and self._latest != self._sent:
            await self._pace()
            text = self._latest
            if self.closed or text is None:
                return
            try:
                await self._send(text)
                self.sends += 1
            except Exception as exc:
                self.errors += 1
                log.warning("reply.update_failed", stream=self._name, error=str(exc)[:200])
            self._sent = text
