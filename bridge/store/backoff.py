"""A capped, jittered exponential backoff, shared by every reconnect loop and circuit breaker."""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    """Delays doubling from ``initial`` up to ``cap`` with +/- ``jitter`` spread; reset on success.

    Args:
        initial: first delay in seconds.
        cap: largest delay in seconds.
        jitter: relative spread, so that many nodes do not retry in lock-step.
        rng: random source in [0, 1) (injected by tests).
    """

    def __init__(
        self,
        initial: float = 0.05,
        cap: float = 2.0,
        jitter: float = 0.2,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError("need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.jitter = jitter
        self._rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next try."""
        base = min(self.cap, self.initial * (2 ** min(self.failures, 30)))
        self.failures += 1
        spread = base * self.jitter * (2 * self._rng() - 1)
        return float(max(0.0, min(self.cap, base + spread)))

    def reset(self) -> None:
        """Forget past failures (call after a success)."""
        self.failures = 0


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
