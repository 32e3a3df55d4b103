"""An LRU cache of finished answers, bounded in bytes and by age, so an identical request
(same image bytes, prompt and limits) is answered without running the model."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")
_ENTRY_OVERHEAD = 160  # rough bytes of bookkeeping per entry, so tiny answers still count


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A finished job's text and token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int


def cache_key(image: bytes, prompt: str, max_tokens: int, model: str) -> str:
    """The identity of a request: SHA-256 over image, prompt, limits and model."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(image).digest())
    for part in (prompt, str(max_tokens), model):
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.hexdigest()


class TtlLru(Generic[V]):
    """Thread-safe LRU of sized values with a TTL and a byte bound; a zero TTL or bound disables
    it. The one eviction mechanism behind the answer and vision-feature caches."""

    def __init__(
        self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, int, V]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """Whether values are kept at all."""
        return self.ttl_s > 0 and self.max_bytes > 0

    @property
    def size_bytes(self) -> int:
        """Bytes currently accounted for."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        """The fresh value for ``key``, or None (expired entries are dropped)."""
        if not self.enabled:
            return None
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            stored_at, size, value = item
            if self._clock() - stored_at > self.ttl_s:
                del self._items[key]
                self._bytes -= size
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def store(self, key: str, value: V, size: int) -> None:
        """Store ``value`` of ``size`` bytes, evicting least recently used ones beyond the bound
        (a value larger than the whole bound is not kept)."""
        if not self.enabled or size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (self._clock(), size, value)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted, _) = self._items.popitem(last=False)
                self._bytes -= evicted

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
            self._bytes = 0


class AnswerCache(TtlLru[CachedAnswer]):
    """The LRU of finished answers by request identity (cleared after a model swap: answers
    change); a zero TTL or bound disables it."""

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Store ``answer``, evicting least recently used entries beyond the byte bound."""
        size = len(key) + len(answer.text.encode("utf-8", "surrogatepass")) + _ENTRY_OVERHEAD
        self.store(key, answer, size)
