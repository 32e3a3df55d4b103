"""The bounded job queue and dynamic batch formation shared by all workers.

Batches follow Triton's dynamic batcher: a worker takes up to ``max_batch`` ready jobs as soon
as that many wait, or when the oldest has waited ``wait_s``, whichever comes first. Idle workers
pull, so work always goes to the least-loaded replica.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from engine.job import Job
from engine.types import BusyError


class Batcher:
    """Thread-safe queue of jobs: ``decoding`` (image not ready yet) plus ``ready`` ones.

    Depth, the figure ``busy`` is judged on, counts both, so a flood of large images cannot
    bypass the bound while they decode.
    """

    def __init__(
        self,
        capacity: int,
        max_batch: int,
        wait_s: float,
        retry_after_s: float = 1.0,
        on_depth: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._retry_after = retry_after_s
        self._on_depth = on_depth
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: deque[tuple[float, Job]] = deque()
        self._decoding = 0
        self._closed = False

    @property
    def depth(self) -> int:
        """Jobs waiting (decoding or ready)."""
        with self._cond:
            return self._decoding + len(self._ready)

    @property
    def ready(self) -> int:
        """Jobs whose image is decoded, waiting to join a batch."""
        with self._cond:
            return len(self._ready)

    def reserve(self) -> int:
        """Take a slot for a new job; return its position (0 = next).

        Raises:
            BusyError: the queue is full.
        """
        with self._cond:
            depth = self._decoding + len(self._ready)
            if depth >= self.capacity:
                raise BusyError(
                    f"engine queue is full ({self.capacity} jobs waiting)", self._retry_after
                )
            self._decoding += 1
            depth += 1
        self._notify_depth(depth)
        return depth - 1

    def release(self) -> None:
        """Give back a reserved slot whose job ended before it became ready."""
        with self._cond:
            self._decoding -= 1
            depth = self._decoding + len(self._ready)
        self._notify_depth(depth)

    def push(self, job: Job) -> None:
        """A reserved job's image is ready: it may now join a batch."""
        with self._cond:
            self._decoding -= 1
            if not job.finished:
                self._ready.append((self._clock(), job))
                self._cond.notify()
            depth = self._decoding + len(self._ready)
        self._notify_depth(depth)

    def requeue(self, jobs: Iterable[Job]) -> None:
        """Put jobs back at the front (retries after a worker fault), oldest first."""
        now = self._clock()
        with self._cond:
            for job in reversed(list(jobs)):
                if not job.finished:
                    self._ready.appendleft((now - self.wait_s, job))
            self._cond.notify_all()
            depth = self._decoding + len(self._ready)
        self._notify_depth(depth)

    def discard(self, job: Job) -> None:
        """Drop a ready job that ended while waiting (cancelled or timed out)."""
        with self._cond:
            for item in self._ready:
                if item[1] is job:
                    self._ready.remove(item)
                    break
            else:
                return
            depth = self._decoding + len(self._ready)
        self._notify_depth(depth)

    def take(self, should_stop: Callable[[], bool], poll_s: float = 0.5) -> list[Job]:
        """Block until a batch forms and return it; ``[]`` when ``should_stop()`` turns true.

        Args:
            should_stop: checked on every wake-up; ``wake()`` forces one.
            poll_s: longest sleep between checks, a safety net for missed wake-ups.
        """
        with self._cond:
            while True:
                if should_stop() or self._closed:
                    return []
                if not self._ready:
                    self._cond.wait(poll_s)
                    continue
                oldest = self._ready[0][0]
                remaining = oldest + self.wait_s - self._clock()
                if len(self._ready) < self.max_batch and remaining > 0:
                    self._cond.wait(min(remaining, poll_s))
                    continue
                batch: list[Job] = []
                while self._ready and len(batch) < self.max_batch:
                    _, job = self._ready.popleft()
                    if not job.finished:
                        batch.append(job)
                depth = self._decoding + len(self._ready)
                if batch:
                    break
        self._notify_depth(depth)
        return batch

    def take_ready(self, limit: int) -> list[Job]:
        """Without waiting, take up to ``limit`` ready jobs, oldest first (continuous batching
        admits them between decode steps, so ``wait_s`` does not apply)."""
        if limit < 1:
            return []
        with self._cond:
            if self._closed or not self._ready:
                return []
            batch: list[Job] = []
            while self._ready and len(batch) < limit:
                _, job = self._ready.popleft()
                if not job.finished:
                    batch.append(job)
            depth = self._decoding + len(self._ready)
        self._notify_depth(depth)
        return batch

    def wake(self) -> None:
        """Wake every waiting worker so it re-checks ``should_stop``."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop handing out batches."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[Job]:
        """Remove and return every ready job (shutdown)."""
        with self._cond:
            jobs = [job for _, job in self._ready]
            self._ready.clear()
            depth = self._decoding
        self._notify_depth(depth)
        return jobs

    def _notify_depth(self, depth: int) -> None:
        if self._on_depth is not None:
            self._on_depth(depth)
