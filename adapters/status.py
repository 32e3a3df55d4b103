"""An IM adapter's live status (every platform): state, attempts, last event, counts."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from adapters.base import AdapterObserver, AdapterStatus, EventOutcome

log = structlog.get_logger(__name__)

_HEALTHY = frozenset({"listening", "connected"})


class StatusTracker:
    """Mutable status owned by one adapter; :meth:`snapshot` gives the immutable view."""

    def __init__(
        self,
        mode: str,
        clock: Callable[[], float],
        platform: str = "feishu",
        observer: AdapterObserver | None = None,
    ) -> None:
        self._clock = clock
        self._observer = observer
        self.platform = platform
        self.mode = mode
        self.state = "off"
        self.since = clock()
        self.attempts = 0
        self.last_event_at: float | None = None
        self.last_error: str | None = None
        self.events: dict[str, int] = {"accepted": 0, "duplicate": 0, "rejected": 0}

    def set_state(self, state: str, *, attempts: int | None = None) -> None:
        """Enter ``state`` (``since`` only moves when the state changes)."""
        if state != self.state:
            self.state = state
            self.since = self._clock()
        if attempts is not None:
            self.attempts = attempts

    def record_error(self, error: str) -> None:
        """Remember a short, secret-free failure description."""
        self.last_error = error[:200]

    def count(self, outcome: EventOutcome) -> None:
        """Count one delivery outcome (and tell the observer, if any); accepted and duplicate
        ones are proof of a live intake."""
        self.events[outcome] += 1
        if outcome != "rejected":
            self.last_event_at = self._clock()
        if self._observer is not None:
            try:
                self._observer.on_event(outcome)
            except Exception:
                log.exception("adapter.observer_failed", platform=self.platform)

    def snapshot(self, api_errors: int = 0) -> AdapterStatus:
        """The current status."""
        return AdapterStatus(
            platform=self.platform,
            mode=self.mode,
            state=self.state,
            healthy=self.state in _HEALTHY,
            since=self.since,
            attempts=self.attempts,
            last_event_at=self.last_event_at,
            last_error=self.last_error,
            events=dict(self.events),
            api_errors=api_errors,
        )
