"""Server CPU per streamed token, TTFT and total latency of 16 concurrent streams: HTTP vs /ws.

The server is a separate ``python -m bridge serve --model tiny`` child (CPU, loopback), so its CPU
time, read from ``/proc/<pid>/stat`` (utime + stime) before and after each batch, holds none of the
clients' work. Each round sends the same ``--concurrency`` jobs (one photo, one prompt that differs
only in a job number so the engine's answer cache never answers, ``--max-tokens``) once as
streaming ``POST /v1/chat/completions`` requests through the official ``openai`` client and once
as /ws submits through the reference client (``bridge.client.HubClient``, one connection per job),
alternating which path goes first. Arrival is the same on both paths: the connections are opened
before the batch (HTTP: a warm-up batch fills the client's keep-alive pool; /ws: every client
waits for ``welcome``), then all jobs are sent at once. TTFT: request sent to first content
delta; total: to the last event. Tokens: the usage each path reports (``completion_tokens``).

    python bench/http_vs_ws.py [--concurrency 16] [--max-tokens 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import IMAGES, free_port, quiet_logs  # noqa: E402
from bridge.client import HubClient  # noqa: E402

TOKEN = "bench-token"
PROMPT = "Describe the image."
PHOTO = (IMAGES / "chelsea.jpg").read_bytes()
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Pause before each batch's first CPU reading: torch's worker threads keep spinning for a while
#: after the previous work (the HTTP pool-filling jobs), which must not count against the batch.
SETTLE_S = 1.0

#: One job: (TTFT seconds, total seconds, completion tokens, prompt tokens).
Result = tuple[float, float, int, int]


def cpu_s(stat_path: str) -> float:
    """User plus system CPU seconds from a ``/proc/.../stat`` file (a process or one thread)."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Measured:
    """What one path (http or ws) measured over all rounds."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    cpu_s: float = 0.0
    loop_cpu_s: float = 0.0
    batch_jobs: float = 0.0
    batches: float = 0.0

    def add(self, results: list[Result], before: Reading, after: Reading) -> None:
        """One batch's results and the server readings around it."""
        self.samples += [(r[0], r[1]) for r in results]
        self.tokens += sum(r[2] for r in results)
        self.prompt_tokens += sum(r[3] for r in results)
        self.cpu_s += after.cpu_s - before.cpu_s
        self.loop_cpu_s += after.loop_cpu_s - before.loop_cpu_s
        self.batch_jobs += after.batch_jobs - before.batch_jobs
        self.batches += after.batches - before.batches


@dataclass(frozen=True)
class Reading:
    """The server's CPU seconds (process, event-loop thread) and batch-size histogram now."""

    cpu_s: float
    loop_cpu_s: float
    batch_jobs: float
    batches: float


def prompt(tag: str) -> str:
    """The shared prompt with a job number, so no two jobs hit the answer cache."""
    return f"{PROMPT} #{tag}"


async def http_job(client: openai.AsyncOpenAI, tag: str, max_tokens: int) -> Result:
    """One streaming chat completion."""
    url = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    t0 = time.perf_counter()
    ttft = float("nan")
    tokens = prompt_tokens = 0
    stream = await client.chat.completions.create(
        model="tiny",
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=max_tokens,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt(tag)},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    )
    async for chunk in stream:
        if ttft != ttft and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
            prompt_tokens = chunk.usage.prompt_tokens
    return ttft, time.perf_counter() - t0, tokens, prompt_tokens


async def ws_job(client: HubClient, tag: str, max_tokens: int, go: asyncio.Event) -> Result:
    """One /ws job on an already connected client."""
    await go.wait()
    t0 = time.perf_counter()
    ttft = float("nan")
    await client.submit(f"j{tag}", prompt(tag), PHOTO, max_tokens=max_tokens)
    async for frame in client.frames():
        if frame.get("kind") == "delta" and ttft != ttft:
            ttft = time.perf_counter() - t0
        if frame.get("kind") == "error":
            raise RuntimeError(f"ws job failed: {frame}")
        if frame.get("kind") == "done":
            usage = frame["usage"]
            total = time.perf_counter() - t0
            return ttft, total, int(usage["completion_tokens"]), int(usage["prompt_tokens"])
    raise RuntimeError("ws client closed before done")


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.95 * len(s)))]


def summary(m: Measured) -> tuple[str, float, float]:
    """One line per path, and its TTFT and total p50 in seconds."""
    ttft = [s[0] for s in m.samples]
    total = [s[1] for s in m.samples]
    line = (
        f"TTFT p50 {p50(ttft) * 1000:7.1f} ms p95 {p95(ttft) * 1000:7.1f} ms | "
        f"total p50 {p50(total) * 1000:7.1f} ms p95 {p95(total) * 1000:7.1f} ms | "
        f"server CPU {m.cpu_s / m.tokens * 1000:6.2f} ms/token "
        f"(event loop {m.loop_cpu_s / m.tokens * 1000:5.2f}) over {m.tokens} tokens | "
        f"{m.batch_jobs / max(m.batches, 1):4.1f} jobs per generate call, "
        f"{m.prompt_tokens / len(m.samples):.0f} prompt tokens per job"
    )
    return line, p50(ttft), p50(total)


class Server:
    """The ``python -m bridge serve --model tiny`` child, logging to a file."""

    def __init__(self, concurrency: int, max_tokens: int, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = ["--port", str(self.port), "--model", "tiny", "--device", "cpu"]
        args += ["--max-batch", str(concurrency), "--max-new-tokens", str(max_tokens)]
        args += ["--token", TOKEN, "--token-submit-rate", "0", "--log-level", "warning"]
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.stat = f"/proc/{self.proc.pid}/stat"
        self.loop_stat = f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat"

    async def wait_ready(self, limit_s: float) -> None:
        """Poll ``/readyz`` until 200 (the model is loaded); fail with the log's tail."""
        deadline = time.monotonic() + limit_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.base + "/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.25)
        raise RuntimeError(f"server not ready in {limit_s}s:\n{self.log_path.read_text()[-3000:]}")

    async def read(self, http: aiohttp.ClientSession) -> Reading:
        """CPU seconds now (read first, so the /metrics request is not counted) and the
        ``bridge_engine_batch_size`` histogram's sum and count."""
        cpu, loop_cpu = cpu_s(self.stat), cpu_s(self.loop_stat)
        async with http.get(self.base + "/metrics") as resp:
            text = await resp.text()
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("bridge_engine_batch_size_sum", "bridge_engine_batch_size_count"):
                values[name] = float(value)
        return Reading(
            cpu,
            loop_cpu,
            values.get("bridge_engine_batch_size_sum", 0.0),
            values.get("bridge_engine_batch_size_count", 0.0),
        )

    async def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 10)


async def http_batch(
    server: Server,
    http: aiohttp.ClientSession,
    client: openai.AsyncOpenAI,
    r: int,
    n: int,
    max_tokens: int,
    into: Measured,
) -> None:
    """Fill the keep-alive pool with ``n`` connections, then send ``n`` jobs at once."""
    await asyncio.gather(*(http_job(client, f"{r}w{i}", 1) for i in range(n)))
    await asyncio.sleep(SETTLE_S)
    before = await server.read(http)
    results = await asyncio.gather(*(http_job(client, f"{r}h{i}", max_tokens) for i in range(n)))
    into.add(results, before, await server.read(http))


async def ws_batch(
    server: Server, http: aiohttp.ClientSession, r: int, n: int, max_tokens: int, into: Measured
) -> None:
    """Open ``n`` /ws clients and wait for every ``welcome``, then submit ``n`` jobs at once."""
    ws_url = server.base.replace("http", "ws", 1) + "/ws"
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(HubClient(ws_url, TOKEN)) for _ in range(n)]
        await asyncio.gather(*(c.wait_connected(10.0) for c in clients))
        go = asyncio.Event()
        jobs = [
            asyncio.create_task(ws_job(c, f"{r}s{i}", max_tokens, go))
            for i, c in enumerate(clients)
        ]
        await asyncio.sleep(SETTLE_S)  # every job waits on ``go`` by now
        before = await server.read(http)
        go.set()
        results = await asyncio.gather(*jobs)
        into.add(results, before, await server.read(http))


async def main(concurrency: int, max_tokens: int, rounds: int) -> None:
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="bench-http-ws-") as tmp:
        server = Server(concurrency, max_tokens, Path(tmp) / "server.log")
        try:
            await server.wait_ready(180.0)
            http = aiohttp.ClientSession()
            client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=TOKEN, max_retries=0)
            # Warm-up, not measured: one batch each way, so both paths find torch warmed up.
            await http_batch(server, http, client, -1, concurrency, max_tokens, Measured())
            await ws_batch(server, http, -1, concurrency, max_tokens, Measured())
            measured = {"http": Measured(), "ws": Measured()}
            for r in range(rounds):
                order = ["http", "ws"] if r % 2 == 0 else ["ws", "http"]
                for kind in order:
                    if kind == "http":
                        await http_batch(
                            server, http, client, r, concurrency, max_tokens, measured[kind]
                        )
                    else:
                        await ws_batch(server, http, r, concurrency, max_tokens, measured[kind])
            await client.close()
            await http.close()
        finally:
            await server.stop()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {concurrency} "
        f"concurrent streaming jobs x {rounds} rounds, max_tokens={max_tokens}, tiny model on CPU, "
        "server in its own process"
    )
    lines = {kind: summary(m) for kind, m in measured.items()}
    for kind, (line, _, _) in lines.items():
        print(f"{kind:>4}: {line}")
    (_, h_ttft, h_total), (_, w_ttft, w_total) = lines["http"], lines["ws"]
    h_cpu = measured["http"].cpu_s / measured["http"].tokens
    w_cpu = measured["ws"].cpu_s / measured["ws"].tokens
    print(
        f"HTTP vs /ws: TTFT p50 {100 * (h_ttft / w_ttft - 1):+.1f}%, total p50 "
        f"{100 * (h_total / w_total - 1):+.1f}%, server CPU/token {100 * (h_cpu / w_cpu - 1):+.1f}%"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.max_tokens, args.rounds))
