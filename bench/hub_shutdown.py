"""Hub.shutdown time with N authenticated connections on a Redis store (in-process hub, clients in a
child process reusing bench/cluster_connections.py's minimal client).

    python bench/hub_shutdown.py --connections 10000 --redis redis://127.0.0.1:6379/13 \
        [--concurrency 64] [--dirty]

--dirty: shut down before the first flush, so every session (owner, header) is still unsaved
(the worst case); otherwise sessions were flushed once and shutdown has only bye/close to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

import bridge.hub.persist as persist  # noqa: E402
from bench.cluster_connections import TOKENS, client_main  # noqa: E402
from bench.common import quiet_logs, raise_nofile  # noqa: E402
from bridge.hub import Hub, HubConfig  # noqa: E402
from bridge.metrics import Metrics  # noqa: E402
from bridge.store.redis import RedisStore  # noqa: E402
from tests.hub.fakes import FakeEngine  # noqa: E402
from tests.redis_fixtures import delete_prefix  # noqa: E402


async def run(args: argparse.Namespace) -> dict[str, object]:
    persist.FLUSH_CONCURRENCY = args.concurrency
    prefix = f"bench-shutdown-{uuid.uuid4().hex[:8]}:"
    store = RedisStore(f"{args.redis}?prefix={prefix}")
    await store.open()
    cfg = HubConfig(
        tokens=frozenset(TOKENS),
        flush_interval_s=3600.0 if args.dirty else 0.5,
        max_connections_per_token=100_000,
    )
    hub = Hub(cfg, engine=FakeEngine(), store=store, metrics=Metrics())
    await hub.start()
    app = web.Application()
    app.router.add_get("/ws", hub.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=client_main, args=(port, args.connections, child, 300.0, 200)
    )
    proc.start()
    loop = asyncio.get_running_loop()
    ready = await loop.run_in_executor(None, parent.recv)
    if not args.dirty:
        await asyncio.sleep(1.5)  # a few write-behind flushes: every session is stored
    unsaved = sum(1 for s in hub._registry.sessions.values() if s.needs_save())
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    real_flush = hub._writes.flush

    async def timed_flush(*args: float) -> bool:
        start = time.monotonic()
        ok = await real_flush(*args)
        marks["flush_s"] = marks.get("flush_s", 0.0) + time.monotonic() - start
        return ok

    async def idle_watch() -> None:
        await hub._idle.wait()
        marks["all_closed_s"] = time.monotonic() - t0

    hub._writes.flush = timed_flush  # type: ignore[method-assign]
    await asyncio.sleep(0)
    hub._idle.clear()
    watch = asyncio.ensure_future(idle_watch())
    await hub.shutdown(grace_s=5.0)
    watch.cancel()
    shutdown_s = time.monotonic() - t0
    parent.send("stop")
    await loop.run_in_executor(None, parent.recv)
    proc.join(10)
    await runner.cleanup()
    stored = 0
    for session_id in list(hub._registry.sessions)[:200]:
        stored += (await store.load_session(session_id)) is not None
    await store.close()
    delete_prefix(args.redis, prefix)
    return {
        "connections": ready,
        "sessions": hub.session_count,
        "unsaved_at_shutdown": unsaved,
        "flush_concurrency": args.concurrency,
        "shutdown_s": round(shutdown_s, 2),
        **{k: round(v, 2) for k, v in marks.items()},
        "sample_sessions_stored": f"{stored}/200",
        "flush_failures": hub._writes.failures,
        "unsaved_after": sum(1 for s in hub._registry.sessions.values() if s.needs_save()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--dirty", action="store_true")
    args = parser.parse_args()
    raise_nofile()
    quiet_logs()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
