"""Coalesced, paced delivery of a growing text: the newest text wins, at most one send per interval.

A streamed answer changes many times a second while platforms allow a few edits per message per
second. :class:`Coalescer` keeps only the newest text and one background task that sends it no
sooner than ``interval_s`` after the previous send started; :meth:`Coalescer.drain` waits for
that task so a final send never overtakes an earlier one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

Sender = Callable[[str], Awaitable[None]]


class Coalescer:
    """Sends the newest of a stream of texts, paced to ``interval_s`` between sends."""

    def __init__(
        self,
        send: Sender,
        *,
        interval_s: float,
        name: str,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._send = send
        self._interval = interval_s
        self._name = name
        self._monotonic = monotonic
        self._sleep = sleep
        self._latest: str | None = None
        self._sent: str | None = None
        self._last_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.sends = 0
        self.errors = 0

    def offer(self, text: str) -> None:
        """Record ``text`` as the newest and make sure a send is scheduled; never waits."""
        if self._closed:
            return
        self._latest = text
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def drain(self) -> None:
        """Stop taking texts, let the send in progress finish, and wait out the interval."""
        self._closed = True
        self._latest = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self.pace()

    async def cancel(self) -> None:
        """Stop at once (shutdown): no further sends."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def pace(self) -> None:
        """Sleep until a send is allowed, and count the next send from now."""
        wait = self._last_at + self._interval - self._monotonic()
        if wait > 0:
            await self._sleep(wait)
        self._last_at = self._monotonic()

    async def _loop(self) -> None:
        while not self._closed and self._latest is not None and self._latest != self._sent:
            await self.pace()
            text = self._latest
            if self._closed or text is None:
                return
            try:
                await self._send(text)
                self.sends += 1
            except Exception as exc:  # an intermediate update may fail; the final one reports
                self.errors += 1
                log.warning("pacing.send_failed", name=self._name, error=str(exc)[:200])
            self._sent = text
