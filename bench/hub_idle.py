"""Idle capacity of the hub: N authenticated, heartbeating connections in one server process.

Measures the server's RSS per connection and the CPU its heartbeat machinery uses while idle.
The server runs in this process; clients run in child processes (each process may hold at most
20,000 open files here). Loopback only; every phase is bounded in time.

    python bench/hub_idle.py --connections 19000 --window 50 --heartbeat 45
    python bench/hub_idle.py --bare   # the same load on a bare aiohttp WebSocket handler
    python bench/hub_idle.py --connections 5000 --modes bare,hub   # both, one after the other

The hub's store is SQLite in a temporary folder (the default of ``bridge serve``) unless
``--store memory`` keeps session headers in this process too.

With ``--modes`` each server runs in a fresh process of its own (in turn), so one's freed memory
cannot lower the other's RSS figure, and the hub/bare ratio comes from one invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from multiprocessing.connection import Connection as Pipe
from typing import Any

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cpu_s, quiet_logs, raise_nofile
from bridge.hub import Hub, HubConfig
from bridge.metrics import Metrics
from bridge.store.memory import MemoryStore
from tests.hub.fakes import FakeEngine

TOKEN = "bench-token"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- clients (child processes) ----------------------------------------------------------------


def client_main(port: int, count: int, pipe: Pipe, bare: bool, deadline_s: float) -> None:
    raise_nofile()
    quiet_logs()
    asyncio.run(_clients(port, count, pipe, bare, deadline_s))


async def _clients(port: int, count: int, pipe: Pipe, bare: bool, deadline_s: float) -> None:
    import websockets

    url = f"ws://127.0.0.1:{port}/ws"
    ready = 0
    pongs = 0
    handshakes = asyncio.Semaphore(200)  # bounded concurrent handshakes

    async def one() -> None:
        nonlocal ready, pongs
        ws: Any = None
        async with handshakes:
            for attempt in range(20):
                try:
                    ws = await websockets.connect(
                        url, ping_interval=None, compression=None, open_timeout=60, max_queue=4
                    )
                    if not bare:
                        await ws.send(json.dumps({"type": "hello", "token": TOKEN}))
                        await ws.recv()
                    break
                except (OSError, TimeoutError, websockets.InvalidHandshake):
                    await asyncio.sleep(0.2 * (attempt + 1))
            else:
                return
        ready += 1
        try:
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("type") == "ping":
                    await ws.send(json.dumps({"type": "pong", "ts": frame["ts"]}))
                    pongs += 1
        except websockets.ConnectionClosed:
            return

    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    started = time.monotonic()
    while ready < count and time.monotonic() - started < deadline_s:  # noqa: ASYNC110 - progress poll
        await asyncio.sleep(0.2)
    pipe.send(("ready", ready))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pipe.recv)  # "stop"
    pipe.send(("pongs", pongs))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- server -----------------------------------------------------------------------------------


async def bare_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    async for _ in ws:
        pass
    return ws


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here, not at the top: client processes (spawned) must not pay for the engine.

    limit = raise_nofile()
    quiet_logs()
    cfg = HubConfig(
        tokens=frozenset({TOKEN}),
        heartbeat_s=args.heartbeat,
        heartbeat_timeout_s=args.heartbeat_timeout,
        max_connections_per_token=args.connections + 10,
        hello_timeout_s=120.0,
    )
    store: Any = MemoryStore()
    if args.store == "sqlite":  # the default store of `bridge serve`: session headers on disk
        from bridge.store.sqlite import SqliteStore

        folder = tempfile.mkdtemp(prefix="hub-idle-")
        store = SqliteStore(f"sqlite:///{folder}/bridge.db")
        await store.open()
    hub = Hub(cfg, engine=FakeEngine(), store=store, metrics=Metrics())
    app = web.Application()
    if args.bare:
        app.router.add_get("/ws", bare_handler)
    else:
        await hub.start()
        app.router.add_get("/ws", hub.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    gc.collect()
    await asyncio.sleep(0.5)
    if args.trace:
        tracemalloc.start(args.trace)
        traced_before = tracemalloc.take_snapshot()
    rss_before = rss_bytes()
    ctx = mp.get_context("spawn")
    per = [args.connections // args.procs] * args.procs
    per[0] += args.connections - sum(per)
    pipes, procs = [], []
    t0 = time.monotonic()
    for count in per:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=client_main, args=(port, count, child, args.bare, args.connect_deadline)
        )
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    loop = asyncio.get_running_loop()
    ready = 0
    for pipe in pipes:
        _kind, n = await loop.run_in_executor(None, pipe.recv)
        ready += n
    connect_s = time.monotonic() - t0
    open_conns = len(hub.connections()) if not args.bare else ready
    gc.collect()
    await asyncio.sleep(1.0)
    rss_after = rss_bytes()
    top: list[str] = []
    if args.trace:
        diff = tracemalloc.take_snapshot().compare_to(traced_before, "traceback")
        tracemalloc.stop()
        for stat in diff[: args.trace_top]:
            frame = stat.traceback[-1]
            where = f"{frame.filename.rpartition('site-packages/')[2]}:{frame.lineno}"
            top.append(f"{stat.size_diff / max(1, open_conns):7.1f} B/conn  {where}")
    cpu0, w0 = cpu_s(), time.monotonic()
    fired0 = hub._timer.fired if hub._timer else 0
    await asyncio.sleep(args.window)
    cpu1, w1 = cpu_s(), time.monotonic()
    fired1 = hub._timer.fired if hub._timer else 0
    lateness = hub._timer.lateness_max if hub._timer else 0.0
    for pipe in pipes:
        pipe.send("stop")
    pongs = 0
    for pipe in pipes:
        _kind, n = await loop.run_in_executor(None, pipe.recv)
        pongs += n
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if not args.bare:
        await hub.shutdown(grace_s=2.0)
    await runner.cleanup()
    await store.close()
    return {
        "mode": "bare aiohttp" if args.bare else "hub",
        **({"traced_per_connection": top} if top else {}),
        "store": None if args.bare else args.store,
        "connections_requested": args.connections,
        "connections_open": open_conns,
        "nofile_limit": limit,
        "connect_s": round(connect_s, 1),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_per_connection_kib": round((rss_after - rss_before) / max(1, open_conns) / 1024, 2),
        "heartbeat_s": args.heartbeat,
        "window_s": round(w1 - w0, 1),
        "cpu_s_in_window": round(cpu1 - cpu0, 3),
        "cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / (w1 - w0), 3),
        "timer_fires_in_window": fired1 - fired0,
        "pongs_sent_by_clients": pongs,
        "timer_lateness_max_ms": round(lateness * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=19_000)
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--heartbeat", type=float, default=45.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=50.0, help="idle seconds measured")
    parser.add_argument("--connect-deadline", type=float, default=180.0)
    parser.add_argument("--bare", action="store_true", help="bare aiohttp handler baseline")
    parser.add_argument("--modes", default=None, help="run each of bare,hub in its own process")
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        help="with N > 0: tracemalloc (N frames) names the top allocation sites per connection",
    )
    parser.add_argument("--trace-top", type=int, default=25, help="allocation sites listed")
    parser.add_argument(
        "--store",
        choices=("memory", "sqlite"),
        default="sqlite",
        help="the hub's store: sqlite (the default of `bridge serve`) or memory (in-process)",
    )
    args = parser.parse_args()
    if args.modes is None:
        print(json.dumps(asyncio.run(run(args)), indent=2))
        return
    results = [_run_alone(mode.strip()) for mode in args.modes.split(",")]
    out: dict[str, Any] = {"runs": results}
    by_mode = {r["mode"]: r for r in results}
    hub, bare = by_mode.get("hub"), by_mode.get("bare aiohttp")
    if hub and bare and bare["rss_per_connection_kib"] > 0:
        ratio = hub["rss_per_connection_kib"] / bare["rss_per_connection_kib"]
        out["hub_over_bare_rss_per_connection"] = round(ratio, 2)
    print(json.dumps(out, indent=2))


def _run_alone(mode: str) -> dict[str, Any]:
    """This script again with the same arguments for one mode, in a fresh process."""
    argv: list[str] = []
    skip = False
    for arg in sys.argv[1:]:
        if skip or arg == "--bare" or arg.startswith("--modes="):
            skip = False
            continue
        if arg == "--modes":
            skip = True
            continue
        argv.append(arg)
    if mode == "bare":
        argv.append("--bare")
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


if __name__ == "__main__":
    main()
