"""Benchmark: WeCom callback acknowledgement latency of a real bridge at a fixed event rate.

Starts a fake WeCom API in this process and ``python -m bridge serve --model tiny --wecom-mode
webhook`` (SQLite store, relay, the tiny model answering every photo), then POSTs encrypted,
signed image callbacks open-loop at ``--rate`` per second (10% are WeCom-style retries of an
earlier MsgId) and measures each acknowledgement from its scheduled send time, so a stalled
server cannot hide queueing delay. Afterwards it waits (at most ``--drain-s``) for the answers and
counts messages that got more than one. Run::

    python bench/wecom_callback.py --rate 200 --seconds 10 [--users 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import IMAGES, free_port  # noqa: E402
from tests.adapters.wecom.fake_wecom import (  # noqa: E402
    AES_KEY,
    AGENT_ID,
    CORP_ID,
    SECRET,
    TOKEN,
    CallbackSender,
    FakeWeCom,
    SignedRequest,
    image_message,
    message_xml,
)

PLACEHOLDER = "Looking at your photo…"


def source_index(i: int) -> int:
    """Every tenth event re-delivers the one five places earlier (same MsgId, new nonce)."""
    return i - 5 if i % 10 == 9 and i >= 5 else i


def make_events(total: int, users: int) -> list[SignedRequest]:
    """Signed callbacks from ``users`` senders in turn (each sender is its own chat topic)."""
    sender = CallbackSender()
    return [
        sender.sign_message(
            message_xml(
                image_message(10**12 + source_index(i), "media-photo", user=f"u{i % users}")
            ),
            nonce=f"n{i}",
        )
        for i in range(total)
    ]


async def load(base: str, rate: float, seconds: float, users: int) -> dict[str, object]:
    """Send the events open-loop and collect acknowledgement latencies."""
    total = int(rate * seconds)
    events = make_events(total, users)
    url = base + "/webhooks/wecom"
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.1

        async def one(i: int) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            req = events[i]
            async with session.post(url, params=req.query, data=req.body) as r:
                await r.read()
                statuses[r.status] += 1
            latencies.append(loop.time() - scheduled)

        await asyncio.gather(*(one(i) for i in range(total)))
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "events": total,
        "rate_per_s": rate,
        "users": users,
        "statuses": dict(statuses),
        "p50_ms": round(q[49] * 1000, 2),
        "p90_ms": round(q[89] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
    }


async def run(
    rate: float, seconds: float, users: int, drain_s: float, tmp: str
) -> dict[str, object]:
    """Start the fake and the bridge, load it, then wait for the answers."""
    fake = FakeWeCom()
    fake.media["media-photo"] = ((IMAGES / "chelsea.jpg").read_bytes(), "image/jpeg")
    await fake.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [
        sys.executable, "-m", "bridge", "serve", "--port", str(port), "--model", "tiny",
        "--store", f"sqlite:///{tmp}/bridge.db", "--log-format", "json",
        "--max-new-tokens", "32", "--queue-size", "4096", "--wecom-mode", "webhook",
        "--wecom-corp-id", CORP_ID, "--wecom-agent-id", AGENT_ID, "--wecom-secret", SECRET,
        "--wecom-token", TOKEN, "--wecom-aes-key", AES_KEY, "--wecom-base-url", fake.base_url,
    ]  # fmt: skip
    with (Path(tmp) / "bridge.log").open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(1200):
                try:
                    async with http.get(base + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise SystemExit("the bridge did not become ready")
        result = await load(base, rate, seconds, users)
        messages = len({source_index(i) for i in range(int(rate * seconds))})
        loop = asyncio.get_running_loop()
        end = loop.time()
        for _ in range(int(drain_s * 5)):
            if len(fake.sent) >= 2 * messages:
                break
            await asyncio.sleep(0.2)
        answers = [s for s in fake.sent if s.content != PLACEHOLDER]
        placeholders = len(fake.sent) - len(answers)
        result.update(
            {
                "messages": messages,
                "placeholders": placeholders,
                "answers": len(answers),
                "drain_s_after_load": round(loop.time() - end, 1),
            }
        )
        return result
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 60)
        await fake.stop()


def main() -> None:
    """Parse arguments and run the benchmark; prints one JSON line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=50, help="distinct senders (chats)")
    parser.add_argument("--drain-s", type=float, default=120.0, help="wait for answers this long")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run(args.rate, args.seconds, args.users, args.drain_s, tmp))))


if __name__ == "__main__":
    main()
