"""IM jobs/s and added latency through Redis (cluster) versus in-process (single node).

Drives jobs through the real relay path, ``Relay.accept(InboundMessage)`` → store inbox and dedupe
claims → (cluster: Redis Streams job queue) → engine → publisher → hub, with an instant fake engine
and a fake adapter, so the figures are the bridge's own overhead, not the model's:

- ``sqlite``: SqliteStore in a temp dir, no queue, events published straight to the hub (what
  ``BridgeApp`` builds for ``sqlite://``);
- ``redis``: RedisStore, RedisJobQueue and ClusterFanout over the Redis Streams event log (what
  it builds for ``redis://``); the local hub gets each event at once, other nodes through the
  stream.

Closed loop: ``C`` workers each accept one message and wait for the hub to see its ``done``.
Latency is measured from the call to ``accept()`` to the reply's ``finish`` and to the hub's
``done``. A second part runs two cluster nodes (the second in a child process) on one queue and
reports how the jobs were split. Loopback only; keys live under a unique prefix in the given DB and
are deleted at the end.

    python bench/cluster_jobs.py --jobs 600 --concurrency 1,16,64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adapters.base import AdapterStatus, ImageRef, InboundMessage, MessageSink
from bench.common import cpu_s, delete_keys, quiet_logs
from bridge.relay import Publisher, Relay
from bridge.store import Store
from engine.types import (
    Delta,
    Done,
    EngineStatus,
    JobEvent,
    JobHandle,
    JobRequest,
    Queued,
    Started,
    Usage,
)

ANSWER_WORDS = ("a", "cup", "of", "coffee")
IMAGE = b"\x89PNG bench image"


# --- fakes: engine, adapter, hub ----------------------------------------------------------------


class _Handle:
    """A job answering at once (or after ``delay_s``): queued, started, a delta a word, done."""

    def __init__(self, job_id: str, delay_s: float) -> None:
        self.job_id = job_id
        self._delay_s = delay_s

    async def events(self) -> AsyncIterator[JobEvent]:
        yield Queued(0)
        yield Started()
        if self._delay_s > 0:
            await asyncio.sleep(self._delay_s)
        for i, word in enumerate(ANSWER_WORDS):
            yield Delta(word if i == 0 else " " + word)
        yield Done(" ".join(ANSWER_WORDS), Usage(3, len(ANSWER_WORDS)))

    def cancel(self) -> None:
        return None


class BenchEngine:
    """An always-ready engine with unbounded capacity; the relay's concurrency is the limit."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.submitted = 0

    async def start(self) -> None:
        return None

    async def stop(self, grace_s: float = 10.0) -> None:
        return None

    def submit(self, request: JobRequest) -> JobHandle:
        self.submitted += 1
        return _Handle(request.job_id, self.delay_s)

    def status(self) -> EngineStatus:
        return EngineStatus(True, "bench", "float32", (), 0, 1_000_000)


class _Reply:
    """A reply stream that records when the answer was finished."""

    def __init__(self, adapter: BenchAdapter, job_id: str) -> None:
        self._adapter = adapter
        self._job_id = job_id

    @property
    def reply_message_id(self) -> str:
        return "r-" + self._job_id

    async def update(self, text_so_far: str) -> None:
        return None

    async def finish(self, final_text: str) -> None:
        self._adapter.finished[self._job_id] = time.monotonic()

    async def fail(self, apology: str) -> None:
        self._adapter.failed += 1


class BenchAdapter:
    """A Feishu stand-in: the image is in memory, replies only record their finish time."""

    platform = "feishu"

    def __init__(self) -> None:
        self.finished: dict[str, float] = {}
        self.failed = 0

    async def start(self, sink: MessageSink) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def fetch_image(self, msg: InboundMessage, ref: ImageRef) -> bytes:
        return IMAGE

    async def open_reply(self, msg: InboundMessage, existing_reply_id: str | None = None) -> _Reply:
        return _Reply(self, f"{msg.platform}:{msg.message_id}")

    async def send_text_reply(self, msg: InboundMessage, text: str) -> None:
        return None

    def status(self) -> AdapterStatus:
        return AdapterStatus("feishu", "webhook", "listening", True, 0.0)


class BenchHub:
    """The hub end: records when each job's ``done`` arrives and wakes whoever waits for it."""

    def __init__(self) -> None:
        self.done_at: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[None]] = {}

    async def publish(self, topic: str, job_id: str, event: JobEvent) -> None:
        if isinstance(event, Done):
            self.done_at[job_id] = time.monotonic()
            waiter = self.waiters.pop(job_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


# --- one node -----------------------------------------------------------------------------------


@dataclass
class Node:
    """One bridge node's relay path: store, (queue, fan-out), relay, fake engine/adapter/hub."""

    store: Store
    relay: Relay
    adapter: BenchAdapter
    hub: BenchHub
    fanout: Any = None

    async def stop(self) -> None:
        """Stop the relay, the fan-out and the store, in the order ``BridgeApp.stop`` uses."""
        await self.relay.stop(5.0)
        if self.fanout is not None:
            await self.fanout.stop()
        await self.store.close()


async def build_node(
    store_url: str, name: str, delay_s: float, relay_concurrency: int, lease_s: float
) -> Node:
    """Wire one node the way ``BridgeApp`` does for the store URL's scheme, then start it."""
    from bridge.store import open_store

    store = open_store(store_url)
    await store.open()
    adapter, hub = BenchAdapter(), BenchHub()
    engine = BenchEngine(delay_s)
    if store_url.startswith("redis://"):
        from bridge.cluster.redis_eventlog import RedisEventLog
        from bridge.cluster.redis_jobs import RedisJobQueue
        from bridge.fanout import ClusterFanout

        fanout = ClusterFanout(RedisEventLog(store_url, client_name=f"bench-{name}"), hub, name)
        await fanout.start()
        queue = RedisJobQueue(store_url, consumer=name, claim_idle_s=lease_s)
        relay = Relay(
            store,
            engine,
            fanout,
            [adapter],
            lease_s=lease_s,
            sweep_s=max(0.5, lease_s / 4),
            queue=queue,
            max_concurrency=relay_concurrency,
        )
        await relay.start()
        return Node(store, relay, adapter, hub, fanout)
    publisher: Publisher = hub
    relay = Relay(store, engine, publisher, [adapter], max_concurrency=relay_concurrency)
    await relay.start()
    return Node(store, relay, adapter, hub)


def message(run: str, i: int) -> InboundMessage:
    """A new image message (unique message and event ids, 50 chats)."""
    return InboundMessage(
        platform="feishu",
        chat_id=f"oc_chat_{i % 50}",
        message_id=f"om_{run}_{i}",
        event_id=f"ev_{run}_{i}",
        sender_id="ou_bench",
        text="What is in this picture?",
        images=(ImageRef("img_bench"),),
        message_type="image",
        received_at=time.time(),
    )


# --- the load -----------------------------------------------------------------------------------


@dataclass
class Level:
    """The timings of one closed-loop run."""

    jobs: int
    seconds: float
    cpu_s: float = 0.0
    accepted_at: dict[str, float] = field(default_factory=dict)
    acked_at: dict[str, float] = field(default_factory=dict)


async def drive(node: Node, run: str, jobs: int, concurrency: int, limit_s: float) -> Level:
    """``concurrency`` workers accept messages one at a time, each waiting for the hub's done."""
    level = Level(jobs, 0.0)
    counter = iter(range(jobs))
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        for i in counter:
            msg = message(run, i)
            job_id = Relay.entry_id(msg)
            waiter: asyncio.Future[None] = loop.create_future()
            node.hub.waiters[job_id] = waiter
            level.accepted_at[job_id] = time.monotonic()
            if not await node.relay.accept(msg):
                raise RuntimeError(f"fresh message {job_id} taken for a duplicate")
            level.acked_at[job_id] = time.monotonic()
            await asyncio.wait_for(waiter, limit_s)

    t0, cpu0 = time.monotonic(), cpu_s()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    level.seconds = time.monotonic() - t0
    level.cpu_s = cpu_s() - cpu0
    return level


async def settle(node: Node, limit_s: float = 60.0) -> None:
    """Wait until every accepted entry is complete (answered and marked in the inbox)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not await node.store.inbox_pending(limit=10):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("inbox entries still pending after the run")


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if q == 0.5:
        return round(1000 * statistics.median(ordered), 2)
    return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)


def summarize(
    level: Level, done_at: dict[str, float], finished: dict[str, float]
) -> dict[str, Any]:
    """Jobs/s and p50/p99 of accept → 200, accept → reply finished, accept → hub saw done."""
    acks = [level.acked_at[j] - t for j, t in level.accepted_at.items()]
    fin = [finished[j] - t for j, t in level.accepted_at.items() if j in finished]
    done = [done_at[j] - t for j, t in level.accepted_at.items() if j in done_at]
    return {
        "jobs": level.jobs,
        "jobs_per_s": round(level.jobs / level.seconds, 1),
        "cpu_ms_per_job": round(1000 * level.cpu_s / level.jobs, 2),
        "cpu_busy_pct": round(100 * level.cpu_s / level.seconds),
        "accept_p50_ms": _ms(acks, 0.5),
        "accept_p99_ms": _ms(acks, 0.99),
        "finish_p50_ms": _ms(fin, 0.5),
        "finish_p99_ms": _ms(fin, 0.99),
        "hub_done_p50_ms": _ms(done, 0.5),
        "hub_done_p99_ms": _ms(done, 0.99),
        "finished": len(fin),
    }


# --- the second node (child process) ------------------------------------------------------------


def node_b_main(store_url: str, delay_s: float, relay_concurrency: int, pipe: Pipe) -> None:
    """A second cluster node that only consumes the shared queue; reports its finishes."""
    quiet_logs()
    asyncio.run(_node_b(store_url, delay_s, relay_concurrency, pipe))


async def _node_b(store_url: str, delay_s: float, relay_concurrency: int, pipe: Pipe) -> None:
    node = await build_node(store_url, "bench-node-b", delay_s, relay_concurrency, 60.0)
    pipe.send("ready")
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
    await node.stop()
    pipe.send(node.adapter.finished)


# --- scenarios ----------------------------------------------------------------------------------


async def overhead(args: argparse.Namespace, redis_url: str) -> list[dict[str, Any]]:
    """Both modes at each concurrency with the instant engine, one node."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        urls = {"sqlite": f"sqlite:///{tmp}/bridge.db", "redis": redis_url + "overhead:"}
        for mode in args.modes.split(","):
            node = await build_node(urls[mode], "bench-node-a", 0.0, args.relay_concurrency, 60.0)
            try:
                await drive(node, f"{mode}-warm", 50, 8, args.limit_s)
                await settle(node)
                for conc in args.concurrency:
                    jobs = max(args.jobs // 4, 100) if conc == 1 else args.jobs
                    level = await drive(node, f"{mode}-{conc}", jobs, conc, args.limit_s)
                    await settle(node)
                    row = summarize(level, node.hub.done_at, node.adapter.finished)
                    rows.append({"mode": mode, "concurrency": conc, **row})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                await node.stop()
    return rows


async def split(
    args: argparse.Namespace, redis_url: str, nodes: int, delay_s: float
) -> dict[str, Any]:
    """One or two cluster nodes on one queue; node A accepts every message, both consume."""
    url = f"{redis_url}split-{nodes}-{int(delay_s * 1000)}:"
    ctx = mp.get_context("spawn")
    child: Any = None
    parent: Pipe | None = None
    if nodes == 2:
        parent, child_end = ctx.Pipe()
        child = ctx.Process(
            target=node_b_main, args=(url, delay_s, args.split_node_concurrency, child_end)
        )
        child.start()
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(None, parent.recv), 120)  # "ready"
    node = await build_node(url, "bench-node-a", delay_s, args.split_node_concurrency, 60.0)
    remote: dict[str, float] = {}
    try:
        level = await drive(node, f"split{nodes}", args.split_jobs, args.split_concurrency, 60.0)
        await settle(node)
    finally:
        await node.stop()
        if parent is not None and child is not None:
            parent.send("stop")
            remote = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
            child.join(30)
    finished = {**node.adapter.finished, **remote}
    row = summarize(level, node.hub.done_at, finished)
    local = sum(1 for j in level.accepted_at if j in node.adapter.finished)
    far = sum(1 for j in level.accepted_at if j in remote)
    result = {
        "nodes": nodes,
        "engine_ms": round(delay_s * 1000),
        "per_node_concurrency": args.split_node_concurrency,
        "concurrency": args.split_concurrency,
        "answered_by_a": local,
        "answered_by_b": far,
        **row,
    }
    print(json.dumps(result), flush=True)
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    quiet_logs()
    prefix = f"bench-jobs-{uuid.uuid4().hex[:8]}:"
    redis_url = f"{args.redis}?prefix={prefix}"
    out: dict[str, Any] = {"redis": args.redis, "prefix": prefix}
    try:
        out["overhead"] = await overhead(args, redis_url)
        out["split"] = []
        if not args.skip_split:
            for delay_ms in args.split_engine_ms:
                for nodes in (1, 2):
                    out["split"].append(await split(args, redis_url, nodes, delay_ms / 1000))
    finally:
        with contextlib.suppress(Exception):
            out["keys_deleted"] = await delete_keys(args.redis, prefix)
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="Redis URL (DB)")
    parser.add_argument("--modes", default="sqlite,redis")
    parser.add_argument("--jobs", type=int, default=600, help="jobs per level (a quarter at C=1)")
    parser.add_argument("--concurrency", type=_ints, default=[1, 16, 64])
    parser.add_argument("--relay-concurrency", type=int, default=64, help="relay max_concurrency")
    parser.add_argument("--limit-s", type=float, default=30.0, help="longest wait for one job")
    parser.add_argument("--split-jobs", type=int, default=600)
    parser.add_argument("--split-concurrency", type=int, default=64)
    parser.add_argument("--split-node-concurrency", type=int, default=8)
    parser.add_argument("--split-engine-ms", type=_ints, default=[0, 100])
    parser.add_argument("--skip-split", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
