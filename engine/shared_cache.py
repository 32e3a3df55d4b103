"""The answer cache in two tiers: this process's LRU in front of an optional cache shared by all
nodes (the bridge plugs in one on Redis), looked up from the engine's decode threads.

The shared tier is async (it lives on the event loop, next to the client it uses); decode threads
reach it with ``run_coroutine_threadsafe`` and wait a bounded time, so the loop never blocks on it
and a slow, failing or absent shared cache is a miss, never an error for the job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Literal, Protocol

import structlog

from engine.cache import AnswerCache, CachedAnswer

log = structlog.get_logger(__name__)

Tier = Literal["local", "shared"]
#: Reports one lookup: the tier asked and whether it had the answer.
LookupHook = Callable[[Tier, bool], None]


class SharedAnswerCache(Protocol):
    """A cache of finished answers shared by every node; implementations must fail open.

    Both methods run on the event loop. ``get`` returns None for a miss *and* when the backend
    cannot answer; ``put`` may drop the answer (too large, backend down) without raising.
    """

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer stored under ``key``, or None."""
        ...

    async def put(self, key: str, answer: CachedAnswer) -> None:
        """Store ``answer`` under ``key`` (best effort)."""
        ...


class TieredAnswers:
    """Local LRU first, then the shared cache; answers found in the shared tier warm the local one.

    Args:
        local: this process's :class:`~engine.cache.AnswerCache`.
        shared: the cluster-wide cache, or None (single node).
        timeout_s: how long a decode thread waits for the shared tier before calling it a miss.
        on_lookup: metrics hook, called once per tier asked.
    """

    def __init__(
        self,
        local: AnswerCache,
        shared: SharedAnswerCache | None = None,
        timeout_s: float = 0.5,
        on_lookup: LookupHook | None = None,
    ) -> None:
        self.local = local
        self.shared = shared
        self.timeout_s = timeout_s
        self._on_lookup = on_lookup
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[None]] = set()
        self.counts: dict[tuple[Tier, bool], int] = {}

    @property
    def enabled(self) -> bool:
        """Whether any tier keeps answers (the local tier's TTL and bound switch both off)."""
        return self.local.enabled

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Name the loop the shared tier's coroutines run on (the engine's)."""
        self._loop = loop

    def _count(self, tier: Tier, hit: bool) -> None:
        with self._lock:
            self.counts[(tier, hit)] = self.counts.get((tier, hit), 0) + 1
        if self._on_lookup is not None:
            self._on_lookup(tier, hit)

    def get(self, key: str) -> tuple[CachedAnswer | None, Tier | None]:
        """Thread (never the loop): the answer and the tier that had it, or ``(None, None)``."""
        if not self.enabled:
            return None, None
        answer = self.local.get(key)
        self._count("local", answer is not None)
        if answer is not None:
            return answer, "local"
        answer = self._shared_get(key)
        if answer is None:
            return None, None
        self.local.put(key, answer)
        return answer, "shared"

    def _shared_get(self, key: str) -> CachedAnswer | None:
        loop, shared = self._loop, self.shared
        if loop is None or shared is None or loop.is_closed():
            return None
        try:
            future = asyncio.run_coroutine_threadsafe(shared.get(key), loop)
        except RuntimeError:  # the loop is shutting down
            return None
        try:
            answer = future.result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.info("engine.shared_cache_slow", timeout_s=self.timeout_s, key=key[:16])
            answer = None
        except Exception as exc:  # fail open: the shared tier is an optimisation
            log.info("engine.shared_cache_failed", error=f"{type(exc).__name__}: {exc}")
            answer = None
        if answer is not None and not isinstance(answer, CachedAnswer):
            answer = None
        self._count("shared", answer is not None)
        return answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Any thread: keep ``answer`` locally and hand it to the shared tier without waiting."""
        if not self.enabled:
            return
        self.local.put(key, answer)
        loop, shared = self._loop, self.shared
        if loop is None or shared is None or loop.is_closed():
            return
        try:
            future = asyncio.run_coroutine_threadsafe(shared.put(key, answer), loop)
        except RuntimeError:
            return
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._put_done)

    def _put_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.info("engine.shared_cache_put_failed", error=repr(future.exception()))

    def cancel_pending(self) -> None:
        """Drop shared-tier writes still in flight (engine stop)."""
        with self._lock:
            pending, self._pending = list(self._pending), set()
        for future in pending:
            future.cancel()

    def clear(self) -> None:
        """Forget local answers (model swap); shared keys include the model name already."""
        self.local.clear()
