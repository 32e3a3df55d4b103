"""Server CPU per streamed token, TTFT and total latency of 16 concurrent streams: HTTP vs /ws.

The server is a separate ``python -m bridge serve --model tiny`` child (CPU, loopback), so its CPU
time, read from ``/proc/<pid>/stat`` (utime + stime) before and after each batch, holds none of the
clients' work. Each round sends the same ``--concurrency`` jobs (one photo, one prompt that differs
only in a job number so the engine's answer cache never answers, ``--max-tokens``) once as
streaming ``POST /v1/chat/completions`` requests and once as /ws submits, alternating which path
goes first. Both paths are driven the same way: ``n`` connections are opened first (HTTP: each
has answered one ``GET /v1/models``; /ws: each is past ``hello``/``welcome``), the request bodies
(the JSON with the photo as a base64 data URL; the submit frame) are encoded before the clock
starts, and all jobs wait on one event; each job's clock starts just before its bytes are handed
to the socket (HTTP: the prepared request written in one call by :mod:`bench.rawhttp`; /ws:
aiohttp's client), and both decode every event with ``json.loads``. TTFT: request sent to first
content delta; total: to the last event. Tokens: the usage each path reports. The bench
process's own CPU per token is shown too, so the two clients can be seen to cost the same.

``--client openai`` sends the HTTP jobs through the official ``openai`` package instead (what
earlier figures used): its request building, JSON encoding and chunk parsing then count in the
HTTP latency. ``--server-root DIR`` runs the server from another checkout (before/after).

    python bench/http_vs_ws.py [--concurrency 16] [--max-tokens 16] [--rounds 3]
        [--client http|openai] [--server-root DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, quiet_logs  # noqa: E402
from bench.rawhttp import RawHttp, request_bytes  # noqa: E402
from bench.stream_jobs import (  # noqa: E402
    TOKEN,
    Result,
    chat_body,
    http_job,
    openai_job,
    submit_frame,
    ws_job,
    ws_open,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Pause before each batch's first CPU reading: torch's worker threads keep spinning for a while
#: after the previous work (the HTTP pool-filling jobs), which must not count against the batch.
SETTLE_S = 1.0


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
    client_cpu_s: float = 0.0

    def add(self, results: list[Result], before: Reading, after: Reading) -> None:
        """One batch's results and the server readings around it."""
        self.samples += [(r[0], r[1]) for r in results]
        self.tokens += sum(r[2] for r in results)
        self.prompt_tokens += sum(r[3] for r in results)
        self.cpu_s += after.cpu_s - before.cpu_s
        self.loop_cpu_s += after.loop_cpu_s - before.loop_cpu_s
        self.batch_jobs += after.batch_jobs - before.batch_jobs
        self.batches += after.batches - before.batches
        self.client_cpu_s += after.client_cpu_s - before.client_cpu_s


@dataclass(frozen=True)
class Reading:
    """The server's CPU seconds (process, event-loop thread) and batch-size histogram now, and
    the bench process's own CPU seconds (the clients)."""

    cpu_s: float
    loop_cpu_s: float
    batch_jobs: float
    batches: float
    client_cpu_s: float


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
        f"client CPU {m.client_cpu_s / m.tokens * 1000:5.2f} ms/token | "
        f"{m.batch_jobs / max(m.batches, 1):4.1f} jobs per generate call, "
        f"{m.prompt_tokens / len(m.samples):.0f} prompt tokens per job"
    )
    return line, p50(ttft), p50(total)


class Server:
    """The ``python -m bridge serve --model tiny`` child, logging to a file."""

    def __init__(
        self, concurrency: int, max_tokens: int, log_path: Path, root: Path = ROOT
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = ["--port", str(self.port), "--model", "tiny", "--device", "cpu"]
        args += ["--max-batch", str(concurrency), "--max-new-tokens", str(max_tokens)]
        args += ["--token", TOKEN, "--token-submit-rate", "0", "--log-level", "warning"]
        pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", *args],
                cwd=root,
                env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *pythonpath])},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.stat = f"/proc/{self.proc.pid}/stat"
        self.loop_stat = f"/proc/{self.proc.pid}/task/{self.proc.pid}/stat"
        self._openai: openai.AsyncOpenAI | None = None

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
            time.process_time(),
        )

    def openai_client(self) -> openai.AsyncOpenAI:
        """The ``openai`` client of ``--client openai`` (one, so its keep-alive pool is kept)."""
        if self._openai is None:
            self._openai = openai.AsyncOpenAI(
                base_url=self.base + "/v1", api_key=TOKEN, max_retries=0
            )
        return self._openai

    async def close_openai(self) -> None:
        """Close the ``openai`` client if one was made."""
        if self._openai is not None:
            await self._openai.close()

    async def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 10)


async def measure(
    server: Server,
    http: aiohttp.ClientSession,
    jobs: list[Awaitable[Result]],
    go: asyncio.Event,
    into: Measured,
) -> None:
    """Start ``jobs`` (each waits on ``go``), let the server settle, then read, set ``go`` and
    read again when all are done: both paths are timed and read the same way."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    await asyncio.sleep(SETTLE_S)  # every job waits on ``go`` by now
    before = await server.read(http)
    go.set()
    results = await asyncio.gather(*tasks)
    into.add(results, before, await server.read(http))


async def http_batch(
    server: Server, stack: contextlib.AsyncExitStack, kind: str, r: int, n: int, max_tokens: int
) -> tuple[list[Awaitable[Result]], asyncio.Event]:
    """``n`` prepared jobs on ``n`` open connections, waiting on one event (``openai``: the
    client's keep-alive pool filled by ``n`` one-token jobs first)."""
    go = asyncio.Event()
    if kind == "openai":
        warm = asyncio.Event()
        warm.set()
        client = server.openai_client()
        await asyncio.gather(*(openai_job(client, f"{r}w{i}", 1, warm) for i in range(n)))
        return [openai_job(client, f"{r}h{i}", max_tokens, go) for i in range(n)], go
    host = f"127.0.0.1:{server.port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    hello = request_bytes(host, "/v1/models", b"", auth, "GET")
    headers = {**auth, "Content-Type": "application/json"}
    conns = []
    for _ in range(n):
        conn = await RawHttp.open("127.0.0.1", server.port)
        stack.push_async_callback(conn.close)
        await conn.fetch(hello)  # like /ws's hello/welcome: the connection has served a request
        conns.append(conn)
    requests = [
        request_bytes(host, "/v1/chat/completions", chat_body(f"{r}h{i}", max_tokens), headers)
        for i in range(n)
    ]
    return [http_job(conn, req, go) for conn, req in zip(conns, requests, strict=True)], go


async def run_batch(
    server: Server,
    http: aiohttp.ClientSession,
    kind: str,
    r: int,
    n: int,
    max_tokens: int,
    into: Measured,
) -> None:
    """One measured batch of ``n`` jobs over ``kind`` (``http``, ``openai`` or ``ws``)."""
    async with contextlib.AsyncExitStack() as stack:
        if kind == "ws":
            ws_url = server.base.replace("http", "ws", 1) + "/ws"
            conns = [await stack.enter_async_context(await ws_open(http, ws_url)) for _ in range(n)]
            go = asyncio.Event()
            jobs = [
                ws_job(ws, submit_frame(f"{r}s{i}", max_tokens), go) for i, ws in enumerate(conns)
            ]
        else:
            jobs, go = await http_batch(server, stack, kind, r, n, max_tokens)
        await measure(server, http, jobs, go, into)


async def main(
    concurrency: int, max_tokens: int, rounds: int, client: str, root: Path = ROOT
) -> None:
    quiet_logs()
    measured = {"http": Measured(), "ws": Measured()}
    with tempfile.TemporaryDirectory(prefix="bench-http-ws-") as tmp:
        server = Server(concurrency, max_tokens, Path(tmp) / "server.log", root)
        try:
            await server.wait_ready(180.0)
            # One pool for both paths; the HTTP jobs keep their n keep-alive connections in it.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0)
            async with aiohttp.ClientSession(connector=connector) as http:
                # Warm-up, not measured: one batch each way, so both paths find torch warmed up.
                await run_batch(server, http, client, -1, concurrency, max_tokens, Measured())
                await run_batch(server, http, "ws", -1, concurrency, max_tokens, Measured())
                for r in range(rounds):
                    for kind in ["http", "ws"] if r % 2 == 0 else ["ws", "http"]:
                        path = client if kind == "http" else "ws"
                        await run_batch(
                            server, http, path, r, concurrency, max_tokens, measured[kind]
                        )
            await server.close_openai()
        finally:
            await server.stop()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {concurrency} "
        f"concurrent streaming jobs x {rounds} rounds, max_tokens={max_tokens}, tiny model on CPU, "
        f"server in its own process ({root}), HTTP client: {client}"
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
    parser.add_argument(
        "--client",
        choices=["http", "openai"],
        default="http",
        help="HTTP side: aiohttp with prepared bodies (default, like the /ws side) or the openai "
        "package",
    )
    parser.add_argument(
        "--server-root",
        type=Path,
        default=ROOT,
        help="run the server from this checkout (a before/after comparison; default: this one)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.max_tokens, args.rounds, args.client, args.server_root))
