"""Durable state: the store interface and its backends (memory, SQLite, Redis)."""

from __future__ import annotations

from bridge.store.base import (
    InboxEntry,
    SessionRecord,
    Store,
    StoredEvent,
    StoreInUse,
    StoreUnavailable,
)

__all__ = [
    "InboxEntry",
    "SessionRecord",
    "Store",
    "StoreInUse",
    "StoreUnavailable",
    "StoredEvent",
    "open_store",
]


def open_store(url: str) -> Store:
    """Build (not yet open) the store named by ``url``: ``memory://``, ``sqlite:///PATH``, ``redis://``.

    Raises:
        ValueError: the URL names no known backend.
    """
    if url.startswith("memory://"):
        from bridge.store.memory import MemoryStore

        return MemoryStore(url)
    if url.startswith("sqlite://"):
        from bridge.store.sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from bridge.store.redis import RedisStore

        return RedisStore(url)
    raise ValueError(f"unknown store URL scheme: {url.split(':', 1)[0]!r}")
