"""Heartbeat lateness of the hub while the engine is saturated (issue: p99 < 100 ms).

Runs the real :class:`bridge.app.BridgeApp` in this process (real engine, tiny model, memory
store, ``--heartbeat 1 --heartbeat-timeout 2``). One child process holds ``--connections`` idle,
authenticated WebSockets that answer pings and record when each ping arrives; another keeps
``--inflight`` jobs (``max_tokens`` 64, real images) running at all times over several
connections. The server records heartbeat lateness (ping sent minus ping due) per ping; the bench
reports its distribution with and without load, the wheel's own firing lateness, the clients' ping
inter-arrival jitter and jobs/s. Loopback only; bounded in time.

    python bench/hub_heartbeat_load.py --connections 1000 --inflight 48 --idle 12 --load 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import itertools
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection as Pipe
from typing import Any

import structlog
import websockets

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import IMAGES, free_port, raise_nofile
from bridge.app import BridgeApp
from bridge.config import load_settings

IDLE_TOKEN = "bench-idle"
LOAD_CONNS = 6  # the per-connection submit bucket is 10/s: spread the load over several tokens


def quantiles(values: list[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds (empty input gives NaN)."""
    if not values:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"n": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000}


# --- idle clients (child process) -------------------------------------------------------------
def idle_main(port: int, count: int, pipe: Pipe, deadline: float) -> None:
    raise_nofile()
    asyncio.run(_idle(port, count, pipe, deadline))


async def _idle(port: int, count: int, pipe: Pipe, deadline: float) -> None:
    url = f"ws://127.0.0.1:{port}/ws"
    arrivals: list[list[float]] = [[] for _ in range(count)]
    welcomed = 0
    all_in = asyncio.Event()
    hello = json.dumps({"type": "hello", "token": IDLE_TOKEN})

    async def one(i: int) -> None:
        nonlocal welcomed
        async with websockets.connect(
            url, ping_interval=None, compression=None, open_timeout=30
        ) as ws:
            await ws.send(hello)
            json.loads(await ws.recv())
            welcomed += 1
            if welcomed == count:
                all_in.set()
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "ping":
                    arrivals[i].append(time.monotonic())
                    await ws.send(json.dumps({"type": "pong", "ts": frame["ts"]}))

    tasks = []
    for i in range(count):
        tasks.append(asyncio.create_task(one(i)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in.wait(), max(0.0, deadline - time.monotonic()))
    pipe.send(("welcomed", welcomed))
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pipe.send(("arrivals", arrivals))


# --- the load (child process) -----------------------------------------------------------------
def load_main(
    port: int, tokens: list[str], inflight: int, max_bytes: int, pipe: Pipe, deadline: float
) -> None:
    images = [
        base64.b64encode(p.read_bytes()).decode()
        for p in sorted(IMAGES.iterdir())
        if not p.name.startswith("bad_") and p.stat().st_size <= max_bytes
    ]
    asyncio.run(_load(port, tokens, inflight, images, pipe, deadline))


async def _load(
    port: int, tokens: list[str], inflight: int, images: list[str], pipe: Pipe, deadline: float
) -> None:
    url = f"ws://127.0.0.1:{port}/ws"
    done_at: list[float] = []
    generated: list[int] = []
    cached = 0
    errors: dict[str, int] = {}
    per_conn = max(1, inflight // len(tokens))

    async def conn(k: int, token: str) -> None:
        nonlocal cached
        async with websockets.connect(url, ping_interval=None, max_size=None) as ws:
            await ws.send(json.dumps({"type": "hello", "token": token}))
            json.loads(await ws.recv())
            n = 0

            async def submit() -> None:
                nonlocal n
                n += 1
                frame = {
                    "type": "submit",
                    "id": f"l{k}-{n}",
                    # A distinct prompt per job: the engine's answer cache must not serve it.
                    "prompt": f"Describe the picture ({k}-{n}).",
                    "image": images[(k + n) % len(images)],
                    "max_tokens": 64,
                }
                await ws.send(json.dumps(frame))

            for _ in range(per_conn):
                await submit()
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "ping":
                    await ws.send(json.dumps({"type": "pong", "ts": frame["ts"]}))
                elif kind == "error" or (kind == "event" and frame["kind"] in ("done", "error")):
                    if kind == "event" and frame["kind"] == "done":
                        done_at.append(time.monotonic())
                        generated.append(frame["usage"]["completion_tokens"])
                        cached += bool(frame.get("cached"))
                    else:
                        code = frame.get("code", "?")
                        key = f"{code}: {frame.get('message', '')}"[:80]
                        errors[key] = errors.get(key, 0) + 1
                        if code in ("rate_limited", "busy"):
                            await asyncio.sleep(0.1)
                    await submit()  # keep the same number in flight

    tasks = [asyncio.create_task(conn(k, t)) for k, t in enumerate(tokens)]
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    crashed = [repr(r) for r in results if isinstance(r, BaseException) and not _cancel(r)]
    stats = {"cached": cached, "mean_tokens": statistics.fmean(generated) if generated else 0.0}
    pipe.send(("done", done_at, errors, crashed, stats))


def _cancel(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)


# --- the server (this process) ----------------------------------------------------------------
class GcPauses:
    """Records how long each cyclic garbage collection held the GIL, per generation."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)

    def clear(self) -> None:
        for values in self.pauses.values():
            values.clear()


class StallWatch:
    """A thread that names what the loop thread was doing whenever the loop stalls.

    The loop bumps a timestamp every 5 ms; when it is older than ``stall_s`` the watcher samples
    the loop thread's stack (in ``select`` means the thread was runnable but not running: GIL or
    CPU starvation; anywhere else is a long step on the loop) and the other threads' top frames.
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.beat = time.monotonic()
        self.samples: dict[str, int] = {}
        self._stop = threading.Event()
        self._loop_ident = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        def tick() -> None:
            self.beat = time.monotonic()
            loop.call_later(0.005, tick)

        tick()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            if time.monotonic() - self.beat < self.stall_s:
                continue
            frames = sys._current_frames()
            loop_frame = frames.get(self._loop_ident)
            where = traceback.format_stack(loop_frame, limit=3)[-1] if loop_frame else "?"
            key = "loop: " + " ".join(where.split())[:160]
            self.samples[key] = self.samples.get(key, 0) + 1
            for ident, frame in frames.items():
                if ident not in (self._loop_ident, threading.get_ident()):
                    top = " ".join(traceback.format_stack(frame, limit=1)[-1].split())[:160]
                    self.samples["other: " + top] = self.samples.get("other: " + top, 0) + 1


async def receive(pipe: Pipe, timeout_s: float) -> Any:
    """The next message from a child, or an error if it sends none in time (it crashed)."""
    if not await asyncio.to_thread(pipe.poll, timeout_s):
        raise RuntimeError(f"a client process sent nothing in {timeout_s} s")
    return pipe.recv()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.slow_callback_ms:
        # asyncio's debug mode logs every loop step longer than this, naming the callback.
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = args.slow_callback_ms / 1000
        logging.basicConfig(level=logging.WARNING)
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    port = free_port()
    load_tokens = [f"bench-load-{i}" for i in range(LOAD_CONNS)]
    settings = load_settings(
        {
            "port": str(port),
            "token": [IDLE_TOKEN, *load_tokens],
            "heartbeat": "1",
            "heartbeat-timeout": "2",
            "store": "memory://",
            "model": "tiny",
            "device": "cpu",
            "max-new-tokens": "64",
            "log-level": "warning",
        },
        env={},
    )
    watch = StallWatch(args.stall_ms / 1000) if args.stall_ms else None
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    app = BridgeApp(settings, adapters=[])
    await app.start()
    hub = app.hub
    ctx = mp.get_context("spawn")
    started = time.monotonic()
    try:
        while not app.engine.status().ready:
            if time.monotonic() - started > 60:
                raise RuntimeError("the engine did not load in 60 s")
            await asyncio.sleep(0.1)
        end = time.monotonic() + 30 + args.idle + args.warmup + args.load
        idle_rx, idle_tx = ctx.Pipe(duplex=False)
        idle = ctx.Process(target=idle_main, args=(port, args.connections, idle_tx, end))
        idle.start()
        _, welcomed = await receive(idle_rx, 90)
        await asyncio.sleep(2.0)  # every connection has had its first ping
        if args.gc_freeze:
            # Move everything alive now (torch, transformers, the model, the connections) out
            # of the collector's reach, so a full collection scans only what jobs allocate.
            gc.collect()
            gc.freeze()
            await asyncio.sleep(1.5)  # the pings that collection delayed are not measured

        hub.ping_lateness.clear()
        assert hub._timer is not None
        hub._timer.lateness.clear()
        t0 = time.monotonic()
        await asyncio.sleep(args.idle)
        t1 = time.monotonic()
        idle_late, idle_wheel = list(hub.ping_lateness), list(hub._timer.lateness)

        load_end = time.monotonic() + args.warmup + args.load + 1
        load_rx, load_tx = ctx.Pipe(duplex=False)
        load_args = (port, load_tokens, args.inflight, args.max_image_bytes, load_tx, load_end)
        load = ctx.Process(target=load_main, args=load_args)
        load.start()
        await asyncio.sleep(args.warmup)
        if watch is not None:
            watch.start(asyncio.get_running_loop())
        hub.ping_lateness.clear()
        hub._timer.lateness.clear()
        gc_pauses.clear()
        depths: list[int] = []
        t2 = time.monotonic()
        while time.monotonic() < t2 + args.load:
            depths.append(app.engine.status().queue_depth)
            await asyncio.sleep(0.5)
        t3 = time.monotonic()
        load_late, load_wheel = list(hub.ping_lateness), list(hub._timer.lateness)
        if watch is not None:
            watch.stop()
        _, done_at, errors, crashed, job_stats = await receive(load_rx, 60)
        _, arrivals = await receive(idle_rx, 90)
        load.join(10)
        idle.join(10)
    finally:
        await app.stop(grace_s=2.0)

    def jitter(lo: float, hi: float) -> list[float]:
        gaps = []
        for times in arrivals:
            inside = [t for t in times if lo <= t <= hi]
            gaps += [abs(b - a - 1.0) for a, b in itertools.pairwise(inside)]
        return gaps

    jobs = [t for t in done_at if t2 <= t <= t3]
    return {
        "connections": welcomed,
        "inflight": args.inflight,
        "torch_threads": args.torch_threads or "default",
        "max_image_bytes": args.max_image_bytes,
        "gc_freeze": args.gc_freeze,
        "switch_interval_ms": sys.getswitchinterval() * 1000,
        "idle": {
            "ping_lateness": quantiles(idle_late),
            "wheel_lateness": quantiles(idle_wheel),
            "client_interarrival_jitter": quantiles(jitter(t0, t1)),
        },
        "load": {
            "ping_lateness": quantiles(load_late),
            "wheel_lateness": quantiles(load_wheel),
            "client_interarrival_jitter": quantiles(jitter(t2, t3)),
            "jobs_per_s": len(jobs) / (t3 - t2),
            "queue_depth_mean": statistics.fmean(depths) if depths else 0.0,
            "errors": errors,
            "jobs": job_stats,
            "client_crashes": crashed,
            "gc_pauses": {f"gen{g}": quantiles(v) for g, v in gc_pauses.pauses.items()},
            "stalls": sorted(watch.samples.items(), key=lambda kv: -kv[1])[:25] if watch else [],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=48)
    parser.add_argument("--idle", type=float, default=12.0, help="seconds measured without load")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load not measured")
    parser.add_argument("--load", type=float, default=20.0, help="seconds measured under load")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads")
    parser.add_argument(
        "--slow-callback-ms", type=float, default=0, help="log loop steps longer than this"
    )
    parser.add_argument(
        "--switch-interval-ms", type=float, default=0, help="sys.setswitchinterval (GIL handoff)"
    )
    parser.add_argument(
        "--max-image-bytes", type=int, default=2_000_000, help="skip larger sample images"
    )
    parser.add_argument(
        "--stall-ms", type=float, default=0, help="sample the loop's stack when it stalls this long"
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() once the app and clients are up"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
