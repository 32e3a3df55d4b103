"""Building ``redis.asyncio`` clients from our URLs; telling "Redis is down" from real errors."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

DEFAULT_PREFIX = "bridge:"


def split_redis_url(url: str, default_prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """Take our own ``prefix`` option out of a Redis URL; return (URL for redis-py, key prefix).

    Raises:
        ValueError: not a ``redis://``, ``rediss://`` or ``unix://`` URL, or an empty prefix.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL: {parts.scheme!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = default_prefix
    rest = []
    for name, value in query:
        if name == "prefix":
            prefix = value
        else:
            rest.append((name, value))
    if not prefix:
        raise ValueError("Redis key prefix must not be empty")
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


def make_client(
    url: str,
    connect_timeout_s: float = 1.0,
    op_timeout_s: float = 5.0,
    max_connections: int = 64,
) -> aioredis.Redis:
    """A client that reconnects by itself and retries a command once on a stale pooled socket.

    ``op_timeout_s`` bounds each read; blocking commands (XREADGROUP BLOCK) must stay below it.
    The pool is bounded and blocking: a burst of callers queues for a connection (up to
    ``op_timeout_s``) instead of opening thousands of sockets or failing at once.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=op_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=op_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
        health_check_interval=15,
        decode_responses=False,
    )
    return aioredis.Redis.from_pool(pool)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means Redis cannot serve us now (down, loading, failover, disk full)."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | BusyLoadingError | ReadOnlyError):
        return True
    if isinstance(exc, ResponseError):
        text = str(exc)
        return text.startswith(("MISCONF", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN"))
    return isinstance(exc, OSError | ConnectionError)
