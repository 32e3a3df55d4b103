"""The answer cache: LRU within a byte bound, entries expire after the TTL."""

from __future__ import annotations

from engine.cache import AnswerCache, CachedAnswer, cache_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answer(text: str) -> CachedAnswer:
    return CachedAnswer(text, 10, len(text))


def test_key_depends_on_everything() -> None:
    base = cache_key(b"img", "prompt", 8, "m")
    assert base == cache_key(b"img", "prompt", 8, "m")
    others = {
        cache_key(b"img2", "prompt", 8, "m"),
        cache_key(b"img", "prompt2", 8, "m"),
        cache_key(b"img", "prompt", 9, "m"),
        cache_key(b"img", "prompt", 8, "m2"),
        cache_key(b"img", "prompt8", 8, "m"),
    }
    assert base not in others and len(others) == 5


def test_ttl_expiry() -> None:
    clock = Clock()
    cache = AnswerCache(ttl_s=10, max_bytes=10_000, clock=clock)
    cache.put("k", answer("hello"))
    clock.now = 9.9
    assert cache.get("k") == answer("hello")
    clock.now = 10.1
    assert cache.get("k") is None
    assert len(cache) == 0 and cache.size_bytes == 0


def test_lru_eviction_by_bytes() -> None:
    cache = AnswerCache(ttl_s=100, max_bytes=1200)  # three 362-byte entries fit, four do not
    for i in range(3):
        cache.put(f"k{i}", answer("x" * 200))
    assert cache.get("k0") is not None  # k0 becomes most recently used
    cache.put("k3", answer("x" * 200))
    assert cache.size_bytes <= 1200
    assert cache.get("k1") is None and cache.get("k0") is not None
    cache.put("huge", answer("x" * 5000))  # larger than the bound: never stored
    assert cache.get("huge") is None and cache.size_bytes <= 1200


def test_disabled() -> None:
    cache = AnswerCache(ttl_s=0, max_bytes=1000)
    cache.put("k", answer("a"))
    assert not cache.enabled and cache.get("k") is None
