"""One timer wheel for every connection's deadlines (pings, pong deadlines, hello deadlines).

The wheel is pure (keys and times in, due keys out) so tests drive it with a fake clock;
:class:`WheelTimer` binds it to the event loop with a single ``loop.call_at`` handle, instead of a
sleeping task or a timer handle per connection.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
LATENESS_SAMPLES = 100_000


class TimerWheel(Generic[K]):
    """Keys scheduled into slots of ``resolution`` seconds; each key is in at most one slot.

    A key fires in the first :meth:`pop_due` whose ``now`` is at or past the end of its slot, so
    it fires at most ``resolution`` late and never early. A heap of slot numbers finds the due
    slots without scanning every occupied one, so a fine resolution costs no more per firing.
    """

    def __init__(self, resolution: float) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self.resolution = resolution
        self._slots: dict[int, set[K]] = {}
        self._slot_of: dict[K, int] = {}
        # Slot numbers that may hold keys; emptied slots leave stale entries, skipped lazily.
        self._heap: list[int] = []

    def __len__(self) -> int:
        return len(self._slot_of)

    def schedule(self, key: K, when: float) -> None:
        """Fire ``key`` at ``when`` (replacing its earlier schedule, if any)."""
        slot = math.ceil(when / self.resolution)
        old = self._slot_of.get(key)
        if old == slot:
            return
        if old is not None:
            self._remove(key, old)
        self._slot_of[key] = slot
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = bucket = set()
            heapq.heappush(self._heap, slot)
        bucket.add(key)

    def cancel(self, key: K) -> None:
        """Forget ``key``; a no-op if it is not scheduled."""
        old = self._slot_of.pop(key, None)
        if old is not None:
            self._discard(key, old)

    def _remove(self, key: K, slot: int) -> None:
        del self._slot_of[key]
        self._discard(key, slot)

    def _discard(self, key: K, slot: int) -> None:
        bucket = self._slots.get(slot)
        if bucket is not None:
            bucket.discard(key)
            if not bucket:
                del self._slots[slot]

    def _top(self) -> int | None:
        """The earliest occupied slot, dropping stale heap entries on the way."""
        heap = self._heap
        while heap and heap[0] not in self._slots:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def next_due(self) -> float | None:
        """The time the earliest key fires, or None when the wheel is empty."""
        top = self._top()
        return None if top is None else top * self.resolution

    def pop_due(self, now: float) -> list[K]:
        """Unschedule and return every key whose time has come by ``now``."""
        limit = math.floor(now / self.resolution + 1e-9)
        due: list[K] = []
        while (top := self._top()) is not None and top <= limit:
            heapq.heappop(self._heap)
            for key in self._slots.pop(top):
                del self._slot_of[key]
                due.append(key)
        return due


class WheelTimer(Generic[K]):
    """Runs a :class:`TimerWheel` on the loop: one ``call_at`` for the earliest slot, ever."""

    def __init__(
        self,
        resolution: float,
        on_due: Callable[[list[K], float], None],
        clock: Callable[[], float],
    ) -> None:
        self.wheel: TimerWheel[K] = TimerWheel(resolution)
        self._on_due = on_due
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._handle_when: float | None = None
        self._closed = False
        self.fired = 0
        self.lateness_max = 0.0
        #: Recent firing lateness in seconds (bounded), the distribution benchmarks report.
        self.lateness: deque[float] = deque(maxlen=LATENESS_SAMPLES)

    def schedule(self, key: K, when: float) -> None:
        """Fire ``key`` at ``when`` on the hub clock (seconds, same base as ``clock``)."""
        self.wheel.schedule(key, when)
        self._arm()

    def cancel(self, key: K) -> None:
        """Forget ``key``."""
        self.wheel.cancel(key)

    def close(self) -> None:
        """Stop firing."""
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        if self._closed:
            return
        due = self.wheel.next_due()
        if due is None:
            return
        if self._handle is not None and self._handle_when is not None:
            if self._handle_when <= due:
                return
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        # Translate hub-clock time to loop time; both are monotonic seconds.
        delay = max(0.0, due - self._clock())
        self._handle_when = due
        self._handle = loop.call_at(loop.time() + delay, self._fire)

    def _fire(self) -> None:
        planned = self._handle_when
        self._handle = None
        self._handle_when = None
        now = self._clock()
        if planned is not None:
            # How late the loop ran us: the heartbeat's own jitter under load (for benchmarks).
            late = now - planned
            self.lateness.append(late)
            self.lateness_max = max(self.lateness_max, late)
        due = self.wheel.pop_due(now)
        if due:
            self.fired += len(due)
            self._on_due(due, now)
        self._arm()
