"""Benchmark: Telegram webhook acknowledgement latency of the real bridge at a fixed update rate.

``python -m bridge serve`` runs in Telegram webhook mode with its SQLite store, relay and the tiny
model answering every photo, against the loopback fake Bot API (getMe, getFile, file download,
sendMessage, editMessageText) served by this process. Updates are POSTed open-loop at ``--rate``
per second for ``--seconds`` with the secret-token header (10% are re-deliveries of an earlier
update), each from its own private chat; each acknowledgement is timed from its scheduled send
time, so a stalled server cannot hide queueing delay. Run::

    python bench/telegram_webhook.py --rate 200 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import IMAGES, free_port  # noqa: E402
from tests.adapters.telegram.fake_telegram import (  # noqa: E402
    TOKEN,
    FakeTelegram,
    message,
    photo_sizes,
)

SECRET = "bench-webhook-secret"


def make_update(fake: FakeTelegram, i: int) -> dict[str, Any]:
    sizes = photo_sizes(f"bench{i}")
    fake.add_file(sizes[-1]["file_id"], (IMAGES / "coffee.jpg").read_bytes())
    return {"update_id": 10_000 + i, "message": message(i + 1, chat_id=1_000 + i, caption="what?",
                                                        photo=sizes)}  # fmt: skip


async def run(rate: float, seconds: float, tmp: str) -> dict[str, Any]:
    fake = FakeTelegram()
    await fake.start()
    port = free_port()
    args = [
        sys.executable, "-m", "bridge", "serve", "--port", str(port),
        "--store", f"sqlite:///{tmp}/bridge.db", "--log-format", "json", "--model", "tiny",
        "--max-new-tokens", "8",
        "--telegram-mode", "webhook", "--telegram-token", TOKEN,
        "--telegram-base-url", fake.base_url, "--telegram-webhook-secret", SECRET,
    ]  # fmt: skip
    server = _start(args, Path(tmp) / "bridge.log")
    url = f"http://127.0.0.1:{port}/webhooks/telegram"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
            await _wait_listening(http, port, server)
            total = int(rate * seconds)
            rng = random.Random(7)
            updates = [make_update(fake, i) for i in range(total)]
            bodies: list[bytes] = []
            for i in range(total):  # 10% re-deliveries of an earlier update
                pick = rng.randrange(i) if i > 10 and rng.random() < 0.1 else i
                bodies.append(json.dumps(updates[pick]).encode())
            headers = {
                "Content-Type": "application/json",
                "X-Telegram-Bot-Api-Secret-Token": SECRET,
            }
            latencies: list[float] = []
            statuses: dict[int, int] = {}
            loop = asyncio.get_running_loop()
            start = loop.time() + 0.2

            async def one(i: int) -> None:
                due = start + i / rate
                await asyncio.sleep(max(0.0, due - loop.time()))
                async with http.post(url, data=bodies[i], headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                latencies.append(loop.time() - due)

            wall = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(total)))
            wall = time.perf_counter() - wall
            q = statistics.quantiles(latencies, n=100, method="inclusive")
            unique = len({b for b in bodies})
            for _ in range(600):  # every unique update answered once (up to two minutes)
                if len({(s.chat_id, s.reply_to) for s in fake.sent}) >= unique:
                    break
                await asyncio.sleep(0.2)
            return {
                "rate_per_s": rate,
                "updates": total,
                "unique": unique,
                "send_wall_s": round(wall, 2),
                "statuses": statuses,
                "ack_p50_ms": round(q[49] * 1000, 2),
                "ack_p99_ms": round(q[98] * 1000, 2),
                "ack_max_ms": round(max(latencies) * 1000, 2),
                "answered": len({(s.chat_id, s.reply_to) for s in fake.sent}),
                "replies_posted": len(fake.sent),
            }
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        await fake.stop()


def _start(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


async def _wait_listening(http: aiohttp.ClientSession, port: int, server: Any) -> None:
    for _ in range(1200):
        if server.poll() is not None:
            raise SystemExit("the bridge exited before it was ready")
        try:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                data = await r.json()
                if r.status == 200 and data["components"]["telegram"]["state"] == "listening":
                    return
        except (aiohttp.ClientError, KeyError, ValueError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the bridge did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run(args.rate, args.seconds, tmp)), indent=2))


if __name__ == "__main__":
    main()
