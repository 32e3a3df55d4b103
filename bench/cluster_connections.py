"""Two bridge processes on one Redis store, each holding N idle authenticated WebSocket connections.

Starts two real ``python -m bridge serve`` processes (tiny model, Redis store under a unique key
prefix, 45 s heartbeat by default), opens N connections to each from one client process per bridge
(a minimal asyncio WebSocket client that says ``hello`` and answers pings), then reports for each
bridge: RSS before/after (KiB per connection), CPU over an idle window, the time to establish all
connections, and whether sample sessions resume on the *other* node with no gap (a job streamed on
node A; ``hello`` with its session and an earlier ``last_seq`` on node B → ``resumed: true`` and
every later event replayed in order). Everything is closed, the processes stopped and the keys
deleted at the end. Every process raises its soft open-file limit to the hard one.

    python bench/cluster_connections.py --connections 10000 --window 60
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    IMAGES,
    delete_keys,
    free_port,
    quiet_logs,
    raise_nofile,
    ws_upgrade_request,
)

TOKENS = tuple(f"bench-conn-token-{i:02d}" for i in range(16))  # the hub caps 1000 per token
IMAGE = IMAGES / "coffee.jpg"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def proc_cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- the clients (one child process per bridge) -------------------------------------------------


class IdleClient(asyncio.Protocol):
    """One idle session: upgrade, ``hello``, wait for ``welcome``, answer every ping.

    Far cheaper than a full client library, so 10,000 of them fit in one process and one core.
    """

    def __init__(self, token: str, stats: dict[str, int]) -> None:
        self.token = token
        self.stats = stats
        self.buf = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(ws_upgrade_request())

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats["lost"] += 1
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("closed before welcome"))

    def send(self, obj: dict[str, Any]) -> None:
        """Write one masked text frame (client frames must be masked)."""
        payload = json.dumps(obj, separators=(",", ":")).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        n = len(payload)
        header = bytes((0x81, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x81, 0xFE, n)
        assert self.transport is not None
        self.transport.write(header + mask + masked)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                assert self.transport is not None
                self.transport.close()
                return
            del self.buf[: end + 4]
            self.upgraded = True
            self.send({"type": "hello", "token": self.token})
        pos, buf = 0, self.buf
        while len(buf) - pos >= 2:
            opcode, n, head = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if len(buf) - pos < head + n:
                break
            self.frame(opcode, bytes(buf[pos + head : pos + head + n]))
            pos += head + n
        del buf[:pos]

    def frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x8:  # close
            self.stats["closed_by_server"] += 1
            assert self.transport is not None
            self.transport.close()
        elif payload.startswith(b'{"type":"ping"'):
            self.send({"type": "pong", "ts": json.loads(payload)["ts"]})
            self.stats["pongs"] += 1
        elif payload.startswith(b'{"type":"welcome"') and not self.welcomed.done():
            self.welcomed.set_result(None)


def client_main(port: int, count: int, pipe: Pipe, deadline_s: float, parallel: int) -> None:
    """Entry point of a client process: hold ``count`` sessions until told to stop."""
    raise_nofile()
    asyncio.run(_clients(port, count, pipe, deadline_s, parallel))


async def _clients(port: int, count: int, pipe: Pipe, deadline_s: float, parallel: int) -> None:
    loop = asyncio.get_running_loop()
    stats = {"lost": 0, "closed_by_server": 0, "pongs": 0, "failed": 0}
    clients: list[IdleClient] = []
    gate = asyncio.Semaphore(parallel)  # bounded handshakes: stay under the listen backlog

    async def one(i: int) -> None:
        async with gate:
            for attempt in range(5):
                client = IdleClient(TOKENS[i % len(TOKENS)], stats)

                def factory(c: IdleClient = client) -> IdleClient:
                    return c

                try:
                    await loop.create_connection(factory, "127.0.0.1", port)
                    await asyncio.wait_for(client.welcomed, 30)
                    clients.append(client)
                    return
                except (OSError, TimeoutError):
                    if client.transport is not None:
                        client.transport.close()
                    await asyncio.sleep(0.2 * (attempt + 1))
            stats["failed"] += 1

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks), deadline_s)
    connect_s = time.monotonic() - t0
    pipe.send({"ready": len(clients), "connect_s": round(connect_s, 1), **stats})
    await loop.run_in_executor(None, pipe.recv)  # "stop"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pipe.send(dict(stats))
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    await asyncio.sleep(0.5)


# --- the bridges ----------------------------------------------------------------------------------


class Bridge:
    """One ``python -m bridge serve`` child on the shared Redis store, logging to a file."""

    def __init__(self, name: str, store_url: str, log_dir: Path, heartbeat: float) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.log_path = log_dir / f"{name}.log"
        args = ["--port", str(self.port), "--store", store_url, "--model", "tiny"]
        args += ["--heartbeat", str(heartbeat), "--log-level", "warning", "--log-format", "json"]
        args += ["--max-new-tokens", "16"]
        for token in TOKENS:
            args += ["--token", token]
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", *args],
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def wait_ready(self, limit_s: float) -> None:
        """Poll ``/readyz`` until 200; fail with the log's tail if the process dies or times out."""
        import aiohttp

        deadline = time.monotonic() + limit_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.base + "/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready in {limit_s}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def sample(self) -> tuple[int, float]:
        """(RSS KiB, CPU seconds) now."""
        return proc_rss_kib(self.proc.pid), proc_cpu_s(self.proc.pid)

    async def stop(self, limit_s: float = 45.0) -> int | None:
        """SIGTERM, wait for the graceful shutdown, SIGKILL past ``limit_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, limit_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return await asyncio.to_thread(self.proc.wait, 10)


# --- resume on the other node -------------------------------------------------------------------


async def resume_check(a: Bridge, b: Bridge, sessions: int, pause_s: float) -> list[dict[str, Any]]:
    """Stream a job to a session on A, drop it, wait ``pause_s``, resume it on B from the middle.

    Every event after the ``last_seq`` sent must come back, in order and identical: no gap.
    """
    import websockets

    image = base64.b64encode(await asyncio.to_thread(IMAGE.read_bytes)).decode()
    results = []
    for i in range(sessions):
        token = TOKENS[i % len(TOKENS)]
        frames: list[dict[str, Any]] = []
        async with websockets.connect(a.ws_url, max_size=2**24) as ws:
            await ws.send(json.dumps({"type": "hello", "token": token}))
            welcome = json.loads(await ws.recv())
            job = {"type": "submit", "id": f"resume-{i}", "prompt": "What is this?"}
            await ws.send(json.dumps({**job, "image": image, "max_tokens": 8}))
            while not frames or frames[-1].get("kind") not in ("done", "error"):
                frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if frame.get("type") == "event":
                    frames.append(frame)
        session, seqs = welcome["session"], [f["seq"] for f in frames]
        last_seen = seqs[len(seqs) // 2 - 1] if len(seqs) > 1 else 0
        expected = [f for f in frames if f["seq"] > last_seen]
        await asyncio.sleep(pause_s)
        replayed: list[dict[str, Any]] = []
        async with websockets.connect(b.ws_url, max_size=2**24) as ws:
            hello = {"type": "hello", "token": token, "session": session}
            await ws.send(json.dumps({**hello, "last_seq": last_seen}))
            answer = json.loads(await ws.recv())
            # Anything owed arrives right after the welcome; give it a generous 5 s.
            with contextlib.suppress(TimeoutError):
                while answer.get("resumed") and len(replayed) < len(expected):
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    if frame.get("type") == "event":
                        replayed.append(frame)
        results.append(
            {
                "pause_s": pause_s,
                "session_events": len(frames),
                "last_seq_sent": last_seen,
                "resumed": bool(answer.get("resumed")),
                "same_session": answer.get("session") == session,
                "missed": answer.get("missed"),
                "expected_seqs": [f["seq"] for f in expected],
                "replayed_seqs": [f["seq"] for f in replayed],
                "no_gap_and_identical": replayed == expected,
            }
        )
    return results


def log_events(bridge: Bridge) -> dict[str, int]:
    """How often each event name appears in a bridge's JSON log (warnings and errors only)."""
    counts: dict[str, int] = {}
    for line in bridge.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            name = str(json.loads(line).get("event"))
            counts[name] = counts.get(name, 0) + 1
    return counts


# --- orchestration --------------------------------------------------------------------------------


def _per_bridge(
    b: Bridge, before: tuple[int, float], after: tuple[int, float], conns: int
) -> dict[str, Any]:
    return {
        "pid": b.proc.pid,
        "rss_before_mib": round(before[0] / 1024, 1),
        "rss_after_mib": round(after[0] / 1024, 1),
        "rss_per_connection_kib": round((after[0] - before[0]) / max(1, conns), 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_nofile()
    quiet_logs()
    prefix = f"bench-conns-{uuid.uuid4().hex[:8]}:"
    store_url = f"{args.redis}?prefix={prefix}"
    out: dict[str, Any] = {"nofile_limit": limit, "connections_per_bridge": args.connections}
    loop = asyncio.get_running_loop()
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    pipes: list[Pipe] = []
    with tempfile.TemporaryDirectory(prefix="bench-conns-") as tmp:
        bridges = [Bridge(n, store_url, Path(tmp), args.heartbeat) for n in ("a", "b")]
        try:
            t0 = time.monotonic()
            await asyncio.gather(*(b.wait_ready(args.start_limit) for b in bridges))
            out["bridges_ready_s"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(2.0)
            before = [b.sample() for b in bridges]
            await asyncio.sleep(args.baseline_window)
            base = [b.sample() for b in bridges]
            for b in bridges:
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=client_main,
                    args=(b.port, args.connections, child, args.connect_limit, args.parallel),
                )
                proc.start()
                procs.append(proc)
                pipes.append(parent)
            t1 = time.monotonic()
            ready = [await loop.run_in_executor(None, p.recv) for p in pipes]
            out["connect_all_s"] = round(time.monotonic() - t1, 1)
            out["clients"] = ready
            await asyncio.sleep(3.0)
            after = [b.sample() for b in bridges]
            w0 = time.monotonic()
            slices: list[list[float]] = [[] for _ in bridges]
            last = after
            for _ in range(max(1, round(args.window / 10))):
                await asyncio.sleep(args.window / max(1, round(args.window / 10)))
                now = [b.sample() for b in bridges]
                for i, (prev, cur) in enumerate(zip(last, now, strict=True)):
                    slices[i].append(round(cur[1] - prev[1], 2))
                last = now
            end = last
            window = time.monotonic() - w0
            out["window_s"] = round(window, 1)
            out["bridges"] = {}
            for i, b in enumerate(bridges):
                row = _per_bridge(b, before[i], after[i], ready[i]["ready"])
                row["cpu_pct_idle_no_clients"] = round(
                    100 * (base[i][1] - before[i][1]) / args.baseline_window, 2
                )
                row["cpu_pct_idle_window"] = round(100 * (end[i][1] - after[i][1]) / window, 2)
                row["cpu_s_per_slice"] = slices[i]
                out["bridges"][b.name] = row
            a, b = bridges
            n, settle_s = args.resume_sessions, args.resume_pause
            out["resume_a_to_b"] = await resume_check(a, b, n, settle_s)
            out["resume_b_to_a"] = await resume_check(b, a, n, settle_s)
            out["resume_a_to_b_at_once"] = await resume_check(a, b, n, 0.0)
            for p in pipes:
                p.send("stop")
            out["clients_at_end"] = [await loop.run_in_executor(None, p.recv) for p in pipes]
        finally:
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
            t2 = time.monotonic()
            codes = await asyncio.gather(*(b.stop(args.stop_limit) for b in bridges))
            out["bridge_exit_codes"] = list(codes)
            out["bridges_stopped_s"] = round(time.monotonic() - t2, 1)
            out["bridge_log_events"] = {b.name: log_events(b) for b in bridges}
            with contextlib.suppress(Exception):
                out["keys_deleted"] = await delete_keys(args.redis, prefix)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="Redis URL (DB)")
    parser.add_argument("--connections", type=int, default=10_000, help="per bridge")
    parser.add_argument("--heartbeat", type=float, default=45.0)
    parser.add_argument("--window", type=float, default=60.0, help="idle seconds measured")
    parser.add_argument("--baseline-window", type=float, default=10.0)
    parser.add_argument("--parallel", type=int, default=100, help="handshakes in flight")
    parser.add_argument("--connect-limit", type=float, default=150.0)
    parser.add_argument("--start-limit", type=float, default=120.0)
    parser.add_argument("--stop-limit", type=float, default=45.0, help="SIGTERM to SIGKILL")
    parser.add_argument("--resume-sessions", type=int, default=3, help="per direction")
    parser.add_argument(
        "--resume-pause", type=float, default=1.5, help="seconds between drop and resume"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
