"""The circuit breaker of the bridge's stores, and the project's one :class:`Backoff` re-exported.

The backoff itself lives in :mod:`adapters.retry` (adapters may not import the bridge, so the
shared policy sits on their side); bridge modules keep importing it from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from adapters.retry import Backoff

__all__ = ["Backoff", "CircuitBreaker"]


class CircuitBreaker:
    """Fails fast while a backend is known to be down, letting one probe through per backoff delay.

    Why: with Redis gone, every caller paying a connect timeout would stall request handlers; with
    the breaker open they get :class:`~bridge.store.base.StoreUnavailable` at once, and the first
    call after the delay tries the backend again (which is how the store reconnects by itself).
    """

    def __init__(self, backoff: Backoff, clock: Callable[[], float] = time.monotonic) -> None:
        self._backoff = backoff
        self._clock = clock
        self._open_until = 0.0
        self.last_error: str | None = None

    def is_open(self) -> bool:
        """True while calls should fail without trying the backend."""
        return self._clock() < self._open_until

    def retry_in(self) -> float:
        """Seconds until the next probe is let through (0 when closed)."""
        return max(0.0, self._open_until - self._clock())

    def failure(self, error: str) -> None:
        """Record a failed call and open the breaker for the next backoff delay."""
        self.last_error = error
        self._open_until = self._clock() + self._backoff.next_delay()

    def success(self) -> None:
        """Record a successful call and close the breaker."""
        self._backoff.reset()
        self._open_until = 0.0
        self.last_error = None
