"""Running figures for the status snapshot: batch-size counts and generated tokens per second."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable


class EngineStats:
    """Thread-safe counters updated by workers and read by ``Engine.status()``."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._batches: Counter[int] = Counter()
        self._tokens: deque[tuple[float, int]] = deque()
        self.tokens_total = 0
        self._slot_total = 0
        self._slot_used = 0
        self._steps = 0
        self.jobs_total = 0

    def batch(self, size: int) -> None:
        """Count one generate call of ``size`` jobs."""
        with self._lock:
            self._batches[size] += 1

    def tokens(self, count: int) -> None:
        """Count ``count`` generated tokens now."""
        now = self._clock()
        with self._lock:
            self._tokens.append((now, count))
            self.tokens_total += count
            self.jobs_total += 1
            self._trim(now)

    def slots(self, steps: int, rows: int, used: int) -> None:
        """Count a generate call: ``steps`` decode steps over ``rows`` rows, ``used`` live."""
        with self._lock:
            self._steps += steps
            self._slot_total += steps * rows
            self._slot_used += used

    def live_rows_per_step(self) -> float:
        """Mean number of rows producing a token per decode step (0.0 before any batch)."""
        with self._lock:
            return self._slot_used / self._steps if self._steps else 0.0

    def slot_occupancy(self) -> float:
        """Used over computed row-steps so far (1.0 before any batch)."""
        with self._lock:
            return self._slot_used / self._slot_total if self._slot_total else 1.0

    def batch_sizes(self) -> dict[int, int]:
        """How many generate calls ran at each batch size."""
        with self._lock:
            return dict(sorted(self._batches.items()))

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the recent window."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            total = sum(n for _, n in self._tokens)
        return total / self._window

    def _trim(self, now: float) -> None:
        while self._tokens and now - self._tokens[0][0] > self._window:
            self._tokens.popleft()
