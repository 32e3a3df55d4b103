"""Memory of a burst of large /ws submits: RSS of a real ``bridge serve`` read from /proc.

N connections each send one large submit at the same moment (loopback only); clients answered
``busy`` retry after the ``retry_after`` they were given, so every job must still end exactly once.
Printed: RSS before, the peak during the burst (VmHWM, reset just before it), RSS right after and
a few seconds later, and the busy/retry counts. Run it twice to compare, e.g. with the budget
effectively off::

    python bench/hub_inflight_rss.py --connections 90 --image-mib 10 --max-inflight-bytes 64GiB
    python bench/hub_inflight_rss.py --connections 90 --image-mib 10

``--env MALLOC_ARENA_MAX=2`` (repeatable) passes allocator settings to the server process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import IMAGES, free_port
from tests.hub.rawws import RawClient

TOKEN = "bench-token"


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A memory figure of ``pid`` from /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: ``5`` into /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Outcome:
    """What one client saw of its job."""

    busy: int = 0
    terminal: list[str] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)


def payload(image_mib: float) -> str:
    """A valid PNG padded with zeros to ``image_mib`` MiB, base64-encoded."""
    png = (IMAGES / "astronaut.png").read_bytes()
    size = max(len(png), int(image_mib * 2**20))
    return base64.b64encode(png + bytes(size - len(png))).decode()


async def client(
    port: int, index: int, image: str, start: asyncio.Event, limit_s: float
) -> Outcome:
    """One connection: hello, wait for the start, submit, retry on ``busy``, read to the end."""
    out = Outcome()
    ws = await RawClient.connect("127.0.0.1", port)
    try:
        await ws.send_json({"type": "hello", "token": TOKEN})
        await ws.recv_json("welcome")
        await start.wait()
        job = f"j{index}"
        body = {"type": "submit", "id": job, "prompt": "describe", "image": image}
        deadline = time.monotonic() + limit_s
        await ws.send_json(body)
        while time.monotonic() < deadline:
            frame = await asyncio.wait_for(
                ws.recv_json("event", "error"), deadline - time.monotonic()
            )
            if frame["type"] == "error":
                if frame.get("code") == "busy" and frame.get("id") == job:
                    out.busy += 1
                    await asyncio.sleep(float(frame.get("retry_after") or 1.0))
                    await ws.send_json(body)
                    continue
                out.other_errors.append(str(frame.get("code")))
                continue
            if frame.get("kind") in ("done", "error"):
                out.terminal.append(str(frame["kind"]))
                break
    finally:
        ws.close()
    return out


def _spawn(
    args: list[str], root: Path | None, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    cwd = root or Path(__file__).resolve().parents[1]
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            args, cwd=cwd, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT
        )


async def burst(
    *,
    connections: int,
    image_mib: float,
    max_inflight: str | None,
    env: dict[str, str],
    log_path: Path,
    limit_s: float = 240.0,
    settle_s: float = 3.0,
    server_root: Path | None = None,
) -> dict[str, Any]:
    """Start a server, run one burst, return the figures (KiB) and outcomes."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "bridge",
        "serve",
        "--port",
        str(port),
        "--model",
        "tiny",
        "--store",
        "memory://",
        "--token",
        TOKEN,
        "--max-new-tokens",
        "4",
        "--queue-size",
        str(max(256, connections)),
        "--token-submit-rate",
        "0",
        "--log-format",
        "json",
        "--log-level",
        "warning",
        "--heartbeat",
        "600",
        "--heartbeat-timeout",
        "600",
    ]  # fmt: skip  (a long heartbeat: clients busy sending cannot answer pings)
    if max_inflight is not None:
        args += ["--max-inflight-bytes", max_inflight]
    proc = _spawn(args, server_root, env, log_path)
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            for _ in range(1200):
                assert proc.poll() is None, f"the server exited; see {log_path}"
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        image = payload(image_mib)
        # One job first, so the model's first-run allocations are not counted as the burst's.
        start = asyncio.Event()
        start.set()
        await client(port, -1, payload(0.1), start, limit_s)
        before = rss_kib(proc.pid)
        start = asyncio.Event()
        tasks = [
            asyncio.create_task(client(port, i, image, start, limit_s)) for i in range(connections)
        ]
        await asyncio.sleep(0.5)  # every hello answered
        reset_peak(proc.pid)
        t0 = time.monotonic()
        start.set()
        outcomes = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        peak = rss_kib(proc.pid, "VmHWM")
        after = rss_kib(proc.pid)
        await asyncio.sleep(settle_s)
        settled = rss_kib(proc.pid)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            metrics = await resp.text()
        inflight = [
            line for line in metrics.splitlines() if line.startswith("bridge_ws_inflight_bytes ")
        ]
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "connections": connections,
        "frame_mib": round(len(image) / 2**20, 2),
        "max_inflight": max_inflight or "default (256MiB)",
        "env": env,
        "rss_before_mib": round(before / 1024),
        "rss_peak_mib": round(peak / 1024),
        "rss_after_mib": round(after / 1024),
        "rss_settled_mib": round(settled / 1024),
        "burst_s": round(elapsed, 1),
        "busy_answers": sum(o.busy for o in outcomes),
        "jobs_ended": sum(len(o.terminal) for o in outcomes),
        "jobs_done": sum(o.terminal.count("done") for o in outcomes),
        "ended_twice": sum(1 for o in outcomes if len(o.terminal) > 1),
        "other_errors": sorted({e for o in outcomes for e in o.other_errors}),
        "inflight_gauge_after": inflight[0].split()[1] if inflight else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=90)
    parser.add_argument("--image-mib", type=float, default=10.0, help="decoded image size")
    parser.add_argument("--max-inflight-bytes", default=None, help="server budget (default 256MiB)")
    parser.add_argument("--env", action="append", default=[], help="K=V for the server")
    parser.add_argument("--log", default="/tmp/bench-inflight.log")
    parser.add_argument(
        "--server-root",
        default=None,
        help="run the server from this checkout (e.g. `git archive` of an older commit)",
    )
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    result = asyncio.run(
        burst(
            connections=args.connections,
            image_mib=args.image_mib,
            max_inflight=args.max_inflight_bytes,
            env=env,
            log_path=Path(args.log),
            server_root=Path(args.server_root) if args.server_root else None,
        )
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
