"""Fan-out throughput of the hub: events/s delivered to many subscribed sessions, with latency.

The hub (with seq numbering, replay buffers and write-behind to a memory store on) runs in this
process; the subscribed clients run in one child process, so the two take one core each on a
2-core machine. Loopback only; bounded by event count and time.

    python bench/hub_fanout.py --sessions 2000 --events 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

import structlog
from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOKEN = "bench-token"
TOPIC = "chat:bench:room"


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# --- clients (child process) ------------------------------------------------------------------


def client_main(port: int, sessions: int, events: int, pipe: Pipe, limit_s: float) -> None:
    raise_nofile()
    quiet_logs()
    asyncio.run(_clients(port, sessions, events, pipe, limit_s))


async def _clients(port: int, sessions: int, events: int, pipe: Pipe, limit_s: float) -> None:
    import websockets

    url = f"ws://127.0.0.1:{port}/ws"
    ready = 0
    received = 0
    gaps = 0
    latencies: list[float] = []
    first_at: float | None = None
    last_at = 0.0
    all_ready = asyncio.Event()
    done = asyncio.Event()
    handshakes = asyncio.Semaphore(100)
    finished = 0

    async def one(index: int) -> None:
        nonlocal ready, received, gaps, first_at, last_at, finished
        async with handshakes:
            ws = await websockets.connect(
                url, ping_interval=None, compression=None, open_timeout=60, max_queue=64
            )
            await ws.send(json.dumps({"type": "hello", "token": TOKEN}))
            await ws.recv()
            await ws.send(json.dumps({"type": "subscribe", "topic": TOPIC}))
            await ws.recv()
        ready += 1
        if ready == sessions:
            all_ready.set()
        last_seq = 0
        sample = index % 10 == 0  # latency from a tenth of the sessions keeps the client light
        try:
            while last_seq < events:
                raw = await ws.recv()
                now = time.monotonic()
                frame = json.loads(raw)
                if frame["type"] == "ping":
                    await ws.send(json.dumps({"type": "pong", "ts": frame["ts"]}))
                    continue
                if frame["type"] != "event":
                    continue
                seq = frame["seq"]
                if seq != last_seq + 1:
                    gaps += 1
                last_seq = seq
                received += 1
                if first_at is None:
                    first_at = now
                last_at = now
                if sample:
                    latencies.append(now - float(frame["text"]))
        except websockets.ConnectionClosed:
            pass
        finished += 1
        if finished == sessions:
            done.set()
        await ws.close()

    tasks = [asyncio.ensure_future(one(i)) for i in range(sessions)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_ready.wait(), limit_s)
    pipe.send(("ready", ready))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), limit_s)
    latencies.sort()
    pipe.send(
        {
            "received": received,
            "gaps": gaps,
            "first_at": first_at,
            "last_at": last_at,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else None,
            "max_ms": 1000 * latencies[-1] if latencies else None,
        }
    )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- server -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bridge.hub import Hub, HubConfig
    from bridge.metrics import Metrics
    from bridge.store.memory import MemoryStore
    from engine.types import Delta
    from tests.hub.fakes import FakeEngine

    raise_nofile()
    quiet_logs()
    cfg = HubConfig(
        tokens=frozenset({TOKEN}),
        max_connections_per_token=args.sessions + 10,
        hello_timeout_s=120.0,
    )
    hub = Hub(cfg, engine=FakeEngine(), store=MemoryStore(), metrics=Metrics())
    await hub.start()
    app = web.Application()
    app.router.add_get("/ws", hub.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=client_main, args=(port, args.sessions, args.events, child, args.limit)
    )
    proc.start()
    loop = asyncio.get_running_loop()
    _kind, ready = await loop.run_in_executor(None, parent.recv)
    conns = list(hub._conns.values())
    await asyncio.sleep(0.5)
    cpu0 = cpu_s()
    t0 = time.monotonic()
    for _ in range(args.events):
        await hub.publish(TOPIC, "feishu:bench", Delta(f"{time.monotonic():.6f}"))
        # Let writers run; hold off while the sockets are behind (bounded queues, no 4003).
        await asyncio.sleep(0)
        while max(len(c.queue) for c in conns) > args.queue_high:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    publish_s = time.monotonic() - t0
    result = await loop.run_in_executor(None, parent.recv)
    cpu1 = cpu_s()
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    await hub.shutdown(grace_s=1.0)
    await runner.cleanup()
    span = (result["last_at"] or t0) - t0
    return {
        "sessions_subscribed": ready,
        "events_published": args.events,
        "deliveries_expected": ready * args.events,
        "deliveries_received": result["received"],
        "seq_gaps": result["gaps"],
        "publish_s": round(publish_s, 2),
        "delivery_span_s": round(span, 2),
        "delivered_per_s": round(result["received"] / span) if span > 0 else None,
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "latency_p50_ms": round(result["p50_ms"], 1) if result["p50_ms"] is not None else None,
        "latency_p99_ms": round(result["p99_ms"], 1) if result["p99_ms"] is not None else None,
        "latency_max_ms": round(result["max_ms"], 1) if result["max_ms"] is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--events", type=int, default=200, help="events published to the topic")
    parser.add_argument("--queue-high", type=int, default=64, help="pause publishing above this")
    parser.add_argument("--limit", type=float, default=180.0, help="seconds per phase, at most")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
