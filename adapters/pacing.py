"""Coalesced, paced edits of one posted message: the newest text wins, at most one per interval.

Platforms limit how often one message may be edited (Slack: about once a second per message;
Telegram: about once a second per chat). A streamed answer changes far more often, so
:class:`Coalescer` keeps only the newest text and a single background task sends it no sooner
than ``interval_s`` after the previous send started (or when a shared :class:`Pacer` gives the
chat its next slot); the final text goes out after that task, so edits never arrive out of order.
"""

from __future__ import annotations

import asyncio
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
            # A late wake-up (a busy loop) starts the action late: the next slot counts from
            # the real start, so two starts are never closer than the interval.
            self._next[key] = max(self._next[key], self._monotonic() + self._interval)

    def hold(self, key: str, seconds: float) -> None:
        """Let no action on ``key`` start in the next ``seconds`` (a 429's ``retry_after``)."""
        until = self._monotonic() + seconds
        self._next[key] = max(self._next.get(key, until), until)


Send = Callable[[str], Awaitable[None]]


class Coalescer:
    """Paces ``send`` calls for one message.

    Args:
        send: delivers one text (raises on failure; a failed intermediate edit is logged and
            skipped, a failed final edit propagates).
        interval_s: least time between the starts of two sends.
        name: for task names and log lines (a message id, never a secret).
        pace: waits for the next send slot instead of ``interval_s`` (a :class:`Pacer` shared by
            every reply in one chat, where the platform's rule is per chat).
        monotonic / sleep: the clock (tests inject fakes).
    """

    def __init__(
        self,
        send: Send,
        *,
        interval_s: float = 0.0,
        name: str,
        pace: Callable[[], Awaitable[None]] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._send = send
        self._interval = interval_s
        self._name = name
        self._monotonic = monotonic
        self._sleep = sleep
        self._pace_fn = pace
        self._latest: str | None = None
        self._sent: str | None = None
        self._last_send_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self.sends = 0
        self.errors = 0

    def offer(self, text: str) -> None:
        """Record the newest text and make sure a send is scheduled; never waits."""
        if self.closed:
            return
        self._latest = text
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=f"edit-{self._name}")

    async def close(self, final_text: str) -> None:
        """Wait for the pending edit, then send ``final_text`` (paced); raises if it fails."""
        if self.closed:
            return
        await self.drain()
        await self._deliver(final_text)

    async def drain(self) -> None:
        """Stop taking texts, let the edit in progress finish and wait out the interval.

        For a platform whose final step is not a plain edit (a DingTalk card's finish): the
        caller sends it after this returns, so it never overtakes an earlier edit.
        """
        self.closed = True
        self._latest = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._pace()
        self._last_send_at = self._monotonic()

    async def cancel(self) -> None:
        """Stop without a final edit (shutdown)."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while not self.closed and self._latest is not None and self._latest != self._sent:
            await self._pace()
            text = self._latest
            if self.closed or text is None:
                return
            try:
                await self._deliver(text)
            except Exception as exc:
                self.errors += 1
                log.warning("pacing.edit_failed", name=self._name, error=str(exc)[:200])
                self._sent = text  # do not hammer a failing message; the final edit retries

    async def _pace(self) -> None:
        if self._pace_fn is not None:
            await self._pace_fn()
            return
        wait = self._last_send_at + self._interval - self._monotonic()
        if wait > 0:
            await self._sleep(wait)

    async def _deliver(self, text: str) -> None:
        self._last_send_at = self._monotonic()
        await self._send(text)
        self._sent = text
        self.sends += 1
