"""Fan-out throughput of the hub: events/s delivered to many subscribed sessions, with latency.

The hub (with seq numbering, replay buffers and write-behind to a memory store on) runs in this
process; the subscribed clients run in one child process, so the two take one core each on a
2-core machine. Loopback only; bounded by event count and time. By default the same load runs
first against a bare aiohttp WebSocket server (one ``send_str`` per delivery, a seq counter per
socket, the event encoded once per publish) so the CPU per delivery is compared in one run.

    python bench/hub_fanout.py --sessions 2000 --events 200              # bare, then hub
    python bench/hub_fanout.py --sessions 2000 --events 200 --modes hub --gc-off
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

from aiohttp import WSMsgType, web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cpu_s, quiet_logs, raise_nofile, ws_upgrade_request

TOKEN = "bench-token"
TOPIC = "chat:bench:room"


# --- clients (child process) ------------------------------------------------------------------


def client_main(port: int, sessions: int, events: int, pipe: Pipe, limit_s: float) -> None:
    raise_nofile()
    quiet_logs()
    asyncio.run(_clients(port, sessions, events, pipe, limit_s))


class _Receiver(asyncio.Protocol):
    """A minimal WebSocket client for one session: handshake, hello, subscribe, count events.

    The bench needs clients much cheaper than the server under test; this one parses frame
    headers itself and reads ``seq`` without decoding JSON (only sampled sessions decode).
    """

    def __init__(self, stats: dict[str, Any], sample: bool, events: int, done: Any) -> None:
        self.stats = stats
        self.sample = sample
        self.events = events
        self.done = done
        self.buf = bytearray()
        self.upgraded = False
        self.last_seq = 0
        self.transport: Any = None
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(ws_upgrade_request())

    def send(self, obj: dict[str, Any]) -> None:
        payload = json.dumps(obj).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        n = len(payload)
        header = bytes((0x81, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x81, 0xFE, n)
        self.transport.write(header + mask + masked)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            del self.buf[: end + 4]
            self.upgraded = True
            self.send({"type": "hello", "token": TOKEN})
            self.send({"type": "subscribe", "topic": TOPIC})
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 2:
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            self.frame(payload)
        del buf[:pos]

    def frame(self, payload: bytes) -> None:
        now = time.monotonic()
        if payload.startswith(b'{"type":"event","seq":'):
            end = payload.index(b",", 22)
            seq = int(payload[22:end])
            stats = self.stats
            if seq != self.last_seq + 1:
                stats["gaps"] += 1
            self.last_seq = seq
            stats["received"] += 1
            if stats["first_at"] is None:
                stats["first_at"] = now
            stats["last_at"] = now
            if self.sample:
                stats["latencies"].append(now - float(json.loads(payload)["text"]))
            if seq >= self.events:
                self.done(self)
        elif payload.startswith(b'{"type":"subscribed"'):
            if not self.ready.done():
                self.ready.set_result(None)
        elif payload.startswith(b'{"type":"ping"'):
            self.send({"type": "pong", "ts": json.loads(payload)["ts"]})


async def _clients(port: int, sessions: int, events: int, pipe: Pipe, limit_s: float) -> None:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"received": 0, "gaps": 0, "first_at": None, "last_at": 0.0}
    stats["latencies"] = []
    finished: set[int] = set()
    all_done = asyncio.Event()

    def done(receiver: _Receiver) -> None:
        finished.add(id(receiver))
        if len(finished) == sessions:
            all_done.set()

    receivers: list[_Receiver] = []
    for i in range(sessions):
        # A tenth of the sessions report latency, which keeps the client light.
        factory = functools.partial(_Receiver, stats, i % 10 == 0, events, done)
        _t, receiver = await loop.create_connection(factory, "127.0.0.1", port)
        receivers.append(receiver)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(r.ready for r in receivers)), limit_s)
    pipe.send(("ready", sum(1 for r in receivers if r.ready.done())))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_done.wait(), limit_s)
    latencies = sorted(stats.pop("latencies"))
    stats["p50_ms"] = 1000 * statistics.median(latencies) if latencies else None
    stats["p99_ms"] = 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else None
    stats["max_ms"] = 1000 * latencies[-1] if latencies else None
    pipe.send(stats)
    for receiver in receivers:
        receiver.transport.close()


# --- server -----------------------------------------------------------------------------------


class _GcPauses:
    """Counts the cyclic collector's full (generation 2) collections and their longest pause."""

    def __init__(self) -> None:
        self.full = 0
        self.longest_s = 0.0
        self.total_s = 0.0
        self.objects = 0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            took = time.perf_counter() - self._t0
            self.full += 1
            self.total_s += took
            self.longest_s = max(self.longest_s, took)
            self.objects = max(self.objects, len(gc.get_objects()))


class _BareFanout:
    """The baseline: a bare aiohttp WebSocket handler that answers hello/subscribe and sends each
    subscriber every event with its own seq (the same frames the hub sends, one ``send_str``
    each), without sessions, replay, store or heartbeats."""

    def __init__(self) -> None:
        self.subs: list[list[Any]] = []  # [ws, seq]

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, autoping=True)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            obj = json.loads(msg.data)
            if obj.get("type") == "hello":
                await ws.send_str('{"type":"welcome","session":"bare","resumed":false}')
            elif obj.get("type") == "subscribe":
                self.subs.append([ws, 0])
                topic = json.dumps(obj.get("topic"))
                await ws.send_str('{"type":"subscribed","topic":' + topic + "}")
        return ws

    async def publish(self, text: str) -> None:
        body = {"id": "feishu:bench", "kind": "delta", "text": text, "topic": TOPIC}
        tail = json.dumps(body, separators=(",", ":"), ensure_ascii=False)[1:]
        for sub in self.subs:
            sub[1] += 1
            await sub[0].send_str('{"type":"event","seq":' + str(sub[1]) + "," + tail)


async def run(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    from bridge.hub import Hub, HubConfig
    from bridge.metrics import Metrics
    from bridge.store.memory import MemoryStore
    from engine.types import Delta
    from tests.hub.fakes import FakeEngine

    raise_nofile()
    quiet_logs()
    app = web.Application()
    hub: Any = None
    bare = _BareFanout()
    if mode == "hub":
        cfg = HubConfig(
            tokens=frozenset({TOKEN}),
            topic_grants=((TOKEN, TOPIC),),
            max_connections_per_token=args.sessions + 10,
            hello_timeout_s=120.0,
        )
        hub = Hub(cfg, engine=FakeEngine(), store=MemoryStore(), metrics=Metrics())
        await hub.start()
        app.router.add_get("/ws", hub.handle)
    else:
        app.router.add_get("/ws", bare.handle)
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
    conns = list(hub._conns.values()) if hub is not None else []
    await asyncio.sleep(0.5)
    pauses = _GcPauses()
    gc.collect()
    if args.gc_off:
        gc.disable()
    gc.callbacks.append(pauses)
    cpu0 = cpu_s()
    t0 = time.monotonic()
    for i in range(args.events):
        if args.rate > 0:
            # Paced: latency is then delivery time (and pauses), not a backlog of queued events.
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
        if hub is not None:
            await hub.publish(TOPIC, "feishu:bench", Delta(f"{time.monotonic():.6f}"))
            # Let writers run; hold off while the sockets are behind (bounded queues, no 4003).
            await asyncio.sleep(0)
            while max(len(c.queue) for c in conns) > args.queue_high:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        else:
            # send_str waits for a paused transport to drain: that is the bare backpressure.
            await bare.publish(f"{time.monotonic():.6f}")
            await asyncio.sleep(0)
    publish_s = time.monotonic() - t0
    result = await loop.run_in_executor(None, parent.recv)
    cpu1 = cpu_s()
    gc.callbacks.remove(pauses)
    gc.enable()
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    if hub is not None:
        await hub.shutdown(grace_s=1.0)
    await runner.cleanup()
    span = (result["last_at"] or t0) - t0
    received = result["received"]
    return {
        "mode": "hub" if hub is not None else "bare aiohttp",
        "gc": "off" if args.gc_off else "on",
        "sessions_subscribed": ready,
        "events_published": args.events,
        "deliveries_expected": ready * args.events,
        "deliveries_received": received,
        "seq_gaps": result["gaps"],
        "publish_s": round(publish_s, 2),
        "delivery_span_s": round(span, 2),
        "delivered_per_s": round(received / span) if span > 0 else None,
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "cpu_us_per_delivery": round(1e6 * (cpu1 - cpu0) / received, 2) if received else None,
        "latency_p50_ms": round(result["p50_ms"], 1) if result["p50_ms"] is not None else None,
        "latency_p99_ms": round(result["p99_ms"], 1) if result["p99_ms"] is not None else None,
        "latency_max_ms": round(result["max_ms"], 1) if result["max_ms"] is not None else None,
        "gc_full_collections": pauses.full,
        "gc_full_longest_ms": round(pauses.longest_s * 1000, 1),
        "gc_full_total_ms": round(pauses.total_s * 1000, 1),
        "gc_tracked_objects_max": pauses.objects,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--events", type=int, default=200, help="events published to the topic")
    parser.add_argument("--queue-high", type=int, default=64, help="pause publishing above this")
    parser.add_argument("--limit", type=float, default=180.0, help="seconds per phase, at most")
    parser.add_argument(
        "--modes", default="bare,hub", help="servers to run in turn: bare (aiohttp), hub"
    )
    parser.add_argument(
        "--gc-off", action="store_true", help="disable the cyclic GC while publishing"
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="events/s to publish at (0: as fast as taken)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of --modes, alternating")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",")] * args.repeat
    results = [asyncio.run(run(args, mode)) for mode in modes]
    out: dict[str, Any] = {"runs": results}
    per = {
        mode: [r["cpu_us_per_delivery"] for r in results if r["mode"] == mode]
        for mode in ("hub", "bare aiohttp")
    }
    if all(per.values()) and all(v for v in per["hub"] + per["bare aiohttp"]):
        hub, bare = statistics.median(per["hub"]), statistics.median(per["bare aiohttp"])
        out["median_cpu_us_per_delivery"] = {"hub": hub, "bare aiohttp": bare}
        out["hub_over_bare_cpu_per_delivery"] = round(hub / bare, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
