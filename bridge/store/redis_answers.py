"""The cluster-wide answer cache on the Redis store's client: every node on one Redis answers a
question any of them has answered before (an :class:`engine.shared_cache.SharedAnswerCache`).

Layout under the store prefix: ``ans:v:<key>`` holds one answer (JSON, ``PX`` = the TTL);
``ans:lru`` is a sorted set of keys scored by last use (Redis server time, ms), ``ans:size`` a hash
of each entry's accounted bytes, ``ans:bytes`` their sum. Both scripts are atomic, so the sum is
exact across nodes. The bound is ours, not Redis ``maxmemory``: a write that takes the sum past
``max_bytes`` evicts least recently used entries until it fits, and an entry larger than
``max_entry_bytes`` is never stored. Entries whose value expired by TTL still count until a
lookup or a later write settles them (a write sweeps up to 64 entries unused for a whole TTL), so
the sum over-counts and memory stays below the bound. Scripts compute value keys from the
prefix: like the rest of the store this targets a standalone Redis, not Redis Cluster.

Fail open: Redis down (the store's circuit breaker), a script error or a malformed value is a
miss or a dropped write, logged, never an error for the job.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from redis.exceptions import RedisError

from bridge.store.base import StoreUnavailable
from bridge.store.redis import RedisStore
from engine.cache import CachedAnswer

log = structlog.get_logger(__name__)

DEFAULT_TTL_S = 3600.0
DEFAULT_MAX_BYTES = 256 * 2**20
DEFAULT_MAX_ENTRY_BYTES = 64 * 2**10
_ENTRY_OVERHEAD = 200  # rough bytes Redis spends per entry across the value, zset and hash
_SWEEP = 64  # expired entries a write settles at most (bounds the script's run time)

# KEYS: lru zset, size hash, bytes counter, value key. ARGV: member.
_GET = """
local v = redis.call('GET', KEYS[4])
if not v then
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    local s = redis.call('HGET', KEYS[2], ARGV[1])
    if s then redis.call('DECRBY', KEYS[3], s) end
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('ZREM', KEYS[1], ARGV[1])
  end
  return false
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], 'XX', t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
return v
"""

# KEYS: lru zset, size hash, bytes counter, value key.
# ARGV: member, value, size, ttl_ms, max_bytes, value key prefix, sweep limit.
_PUT = """
local lru, sizes, total, pfx = KEYS[1], KEYS[2], KEYS[3], ARGV[6]
local function drop(m)
  local s = redis.call('HGET', sizes, m)
  if s then redis.call('DECRBY', total, s) end
  redis.call('HDEL', sizes, m)
  redis.call('ZREM', lru, m)
  redis.call('DEL', pfx .. m)
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[4])
local stale = redis.call('ZRANGEBYSCORE', lru, '-inf', now - ttl, 'LIMIT', 0, tonumber(ARGV[7]))
for _, m in ipairs(stale) do drop(m) end
drop(ARGV[1])
redis.call('SET', KEYS[4], ARGV[2], 'PX', ttl)
redis.call('ZADD', lru, now, ARGV[1])
redis.call('HSET', sizes, ARGV[1], ARGV[3])
local sum = redis.call('INCRBY', total, ARGV[3])
local evicted = 0
while sum > tonumber(ARGV[5]) do
  local first = redis.call('ZRANGE', lru, 0, 0)
  if #first == 0 then
    redis.call('SET', total, 0)
    break
  end
  drop(first[1])
  evicted = evicted + 1
  sum = tonumber(redis.call('GET', total) or '0')
end
redis.call('PEXPIRE', lru, ttl)
redis.call('PEXPIRE', sizes, ttl)
redis.call('PEXPIRE', total, ttl)
return evicted
"""


def encode_answer(answer: CachedAnswer) -> bytes:
    """The stored form of an answer."""
    return json.dumps(
        {"t": answer.text, "p": answer.prompt_tokens, "c": answer.completion_tokens},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8", "surrogatepass")


def decode_answer(raw: object) -> CachedAnswer | None:
    """Parse a stored answer; anything else (another writer, corruption) is None, never raises."""
    if not isinstance(raw, bytes | str):
        return None
    try:
        value: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    text, prompt, completion = value.get("t"), value.get("p"), value.get("c")
    if not isinstance(text, str):
        return None
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    if not (_count(prompt) and _count(completion)):
        return None
    return CachedAnswer(text, prompt, completion)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= 128 and all(c in "0123456789abcdef" for c in key)


class RedisAnswerCache:
    """Answers shared by every node on the store's Redis, bounded in bytes, LRU, with a TTL.

    Args:
        store: the (opened) Redis store; its client, breaker and prefix are reused.
        ttl_s: how long an answer may be served after it was written.
        max_bytes: bound on the accounted bytes of all entries.
        max_entry_bytes: answers larger than this (encoded) are not shared.
    """

    def __init__(
        self,
        store: RedisStore,
        ttl_s: float = DEFAULT_TTL_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    ) -> None:
        if ttl_s <= 0 or max_bytes <= 0 or max_entry_bytes <= 0:
            raise ValueError("ttl_s, max_bytes and max_entry_bytes must be positive")
        self.store = store
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        base = store.prefix + "ans:"
        self._value_prefix = base + "v:"
        self._meta = [base + "lru", base + "size", base + "bytes"]
        self.evictions = 0
        self._scripts: dict[str, Any] = {}

    async def _script(self, name: str, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script by SHA (EVALSHA, loading it on NOSCRIPT) on the store's client."""

        def run(client: Any) -> Any:
            script = self._scripts.get(name)
            if script is None:
                script = self._scripts[name] = client.register_script(source)
            return script(keys=keys, args=args, client=client)

        return await self.store.execute(name, run)

    def _keys(self, key: str) -> list[str]:
        return [*self._meta, self._value_prefix + key]

    async def get(self, key: str) -> CachedAnswer | None:
        """The shared answer for ``key``; a miss when Redis cannot answer."""
        if not _valid_key(key):
            return None
        keys = self._keys(key)
        try:
            raw = await self._script("answer_get", _GET, keys, [key])
        except (StoreUnavailable, RedisError) as exc:
            log.debug("shared_cache_get_failed", key=key[:16], error=str(exc))
            return None
        if raw is None:
            return None
        answer = decode_answer(raw)
        if answer is None:
            log.warning("shared_cache_bad_value", key=key[:16])
        return answer

    async def put(self, key: str, answer: CachedAnswer) -> None:
        """Share ``answer`` (dropped when too large or when Redis cannot take it)."""
        if not _valid_key(key):
            return
        value = encode_answer(answer)
        size = len(value) + len(key) + _ENTRY_OVERHEAD
        if size > self.max_entry_bytes or size > self.max_bytes:
            return
        keys = self._keys(key)
        args = [key, value, size, self.ttl_ms, self.max_bytes, self._value_prefix, _SWEEP]
        try:
            evicted = await self._script("answer_put", _PUT, keys, args)
        except (StoreUnavailable, RedisError) as exc:
            log.debug("shared_cache_put_failed", key=key[:16], error=str(exc))
            return
        self.evictions += int(evicted or 0)

    async def accounted_bytes(self) -> int:
        """The bytes the cache counts against ``max_bytes`` now (tests, dashboard)."""
        raw = await self.store.execute("answer_bytes", lambda c: c.get(self._meta[2]))
        return int(raw or 0)
