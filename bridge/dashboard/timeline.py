"""A ring buffer of the last minutes (connections, events/s, p95 latency) for the dashboard charts.

The composition root feeds it: :meth:`Timeline.record_event` per event frame or job event,
:meth:`Timeline.record_latency` per finished job, and :meth:`Timeline.sample` every ``interval_s``
(or :meth:`Timeline.start` runs that loop). Recording is thread-safe because engine observers call
from worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Latencies kept per interval; beyond this the p95 comes from the first ones (bounded memory).
_MAX_LATENCIES_PER_INTERVAL = 20_000


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the charts.

    Attributes:
        ts: wall-clock time of the sample (Unix seconds).
        connections: open connections at that time.
        events_per_s: events recorded since the previous sample, per second.
        p95_ms: 95th percentile of latencies recorded in the interval (``None``: none recorded).
    """

    ts: float
    connections: int
    events_per_s: float
    p95_ms: float | None

    def to_json(self) -> dict[str, Any]:
        """The JSON object the API and the charts use."""
        return {
            "ts": self.ts,
            "connections": self.connections,
            "events_per_s": self.events_per_s,
            "p95_ms": self.p95_ms,
        }


class Timeline:
    """Keeps ``capacity`` samples taken every ``interval_s`` seconds (default: 10 min at 5 s)."""

    def __init__(
        self,
        interval_s: float = 5.0,
        capacity: int = 120,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0 or not math.isfinite(interval_s):
            raise ValueError("interval_s must be a positive number")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._events = 0
        self._latencies: list[float] = []
        self._last_ts = clock()
        self._task: asyncio.Task[None] | None = None

    def record_event(self, count: int = 1) -> None:
        """Count ``count`` events (frames sent, job events) towards the current interval."""
        if count > 0:
            with self._lock:
                self._events += count

    def record_latency(self, seconds: float) -> None:
        """Add one job latency (submission to last event) to the current interval."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        with self._lock:
            if len(self._latencies) < _MAX_LATENCIES_PER_INTERVAL:
                self._latencies.append(seconds)

    def sample(self, connections: int) -> Sample:
        """Close the current interval: append a sample and start counting afresh.

        Args:
            connections: open connections now.

        Returns:
            The sample appended.
        """
        now = self._clock()
        with self._lock:
            elapsed = now - self._last_ts
            events, latencies = self._events, self._latencies
            self._events, self._latencies, self._last_ts = 0, [], now
            rate = events / elapsed if elapsed > 0 else 0.0
            p95: float | None = None
            if latencies:
                latencies.sort()
                index = min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)
                p95 = round(latencies[index] * 1000.0, 3)
            point = Sample(
                ts=now, connections=max(0, connections), events_per_s=round(rate, 3), p95_ms=p95
            )
            self._samples.append(point)
        return point

    def samples(self) -> list[dict[str, Any]]:
        """Every kept sample, oldest first, as JSON objects."""
        with self._lock:
            return [s.to_json() for s in self._samples]

    def start(self, connections: Callable[[], int]) -> None:
        """Sample every ``interval_s`` in a background task until :meth:`stop`.

        Args:
            connections: returns the number of open connections (called on the event loop).
        """
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(connections), name="dashboard-timeline"
        )

    async def stop(self) -> None:
        """Cancel the sampling task and wait for it to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self, connections: Callable[[], int]) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample(connections())
            except Exception:
                # A failing counter must not end the charts; the next tick tries again.
                log.exception("timeline_sample_failed")
