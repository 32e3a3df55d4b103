"""What every adapter keeps the same way: its HTTP seam, status, delivery counts, open streams.

Why: each platform's adapter would otherwise repeat the same ownership rules (close the HTTP
client only if it made it, close open reply streams on stop, count outcomes for the status and
the metrics observer without letting an observer failure break intake).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Protocol

import structlog

from adapters.base import AdapterObserver, EventOutcome
from adapters.http import AiohttpClient, HttpClient
from adapters.status import StatusTracker

log = structlog.get_logger(__name__)


class ClosableStream(Protocol):
    """A reply stream that can stop its background edits at shutdown."""

    async def aclose(self) -> None:
        """Stop background edits without a final one."""
        ...


class AdapterCore:
    """The shared parts of one adapter (composition, not inheritance: adapters stay flat).

    Args:
        platform / mode: for the status (``slack``/``socket``, ``feishu``/``webhook`` ...).
        http: the HTTP seam; an :class:`AiohttpClient` owned (and closed) here if None.
        clock: wall-clock seconds for the status.
        observer: told the outcome of every delivery.
    """

    def __init__(
        self,
        platform: str,
        mode: str,
        http: HttpClient | None,
        clock: Callable[[], float],
        observer: AdapterObserver | None,
    ) -> None:
        self.platform = platform
        self.owns_http = http is None
        self.http: HttpClient = http if http is not None else AiohttpClient()
        self.status = StatusTracker(mode, clock, platform=platform)
        self._observer = observer
        self._streams: weakref.WeakSet[ClosableStream] = weakref.WeakSet()  # type: ignore[type-var]

    def track(self, stream: ClosableStream) -> None:
        """Remember an open reply stream so that :meth:`close` can stop it."""
        self._streams.add(stream)

    def count(self, outcome: EventOutcome) -> None:
        """Count one delivery in the status and tell the observer (its failures are logged)."""
        self.status.count(outcome)
        if self._observer is not None:
            try:
                self._observer.on_event(outcome)
            except Exception:
                log.exception("adapter.observer_failed", platform=self.platform)

    async def close(self) -> None:
        """Stop open streams, show ``stopped`` and close the HTTP client if it is ours."""
        streams = list(self._streams)
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        self.status.set_state("stopped")
        if self.owns_http:
            await self.http.close()
