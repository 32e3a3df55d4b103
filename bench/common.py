"""Helpers shared by the benchmark scripts: process limits, CPU time, quiet logs, ports, cleanup."""

from __future__ import annotations

import base64
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

#: The sample photos and hostile images, carried in the repository beside the tests.
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
IMAGES = DATA / "images"


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one (children inherit it); return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quiet_logs() -> None:
    """Only warnings from structlog users in this process: info lines would dominate the CPU."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def ws_upgrade_request() -> bytes:
    """The HTTP request that opens ``/ws`` on loopback, for the raw-protocol bench clients."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def delete_keys(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (a bench's own namespace); return how many."""
    import redis.asyncio as aioredis

    from bridge.store.redis_client import split_redis_url

    client_url, _ = split_redis_url(redis_url)
    client = aioredis.Redis.from_url(client_url)
    removed = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += await client.unlink(*batch)
                batch.clear()
        if batch:
            removed += await client.unlink(*batch)
    finally:
        await client.aclose()
    return removed


async def best_of_alternating(
    engines: dict[str, Any],
    levels: list[int],
    repeat: int,
    run: Callable[[str, Any, int, int], Awaitable[dict[str, float]]],
) -> tuple[dict[tuple[str, int], dict[str, float]], dict[tuple[str, int], float]]:
    """The best (highest ``jobs_s``) of ``repeat`` runs per engine and level, and its live rows.

    Engines alternate within each level, so load from other processes on a shared machine
    penalises every mode alike. ``run(name, engine, concurrency, repetition)`` runs one level.
    """
    best: dict[tuple[str, int], dict[str, float]] = {}
    live_rows: dict[tuple[str, int], float] = {}
    for c in levels:
        for rep in range(repeat):
            for name, engine in engines.items():
                engine.reset_stats()
                result = await run(name, engine, c, rep)
                if (name, c) not in best or result["jobs_s"] > best[(name, c)]["jobs_s"]:
                    best[(name, c)] = result
                    live_rows[(name, c)] = engine.live_rows_per_step
    return best, live_rows
