"""Time to first token and total latency of 16 concurrent streaming jobs: HTTP API vs /ws.

One bridge (BridgeApp, tiny model on CPU, answer cache off) on loopback. Each round sends the
same ``--concurrency`` jobs (one photo, one prompt, ``--max-tokens``) once as streaming
``POST /v1/chat/completions`` requests through the official ``openai`` client and once as /ws
submits through the reference client (``bridge.client.HubClient``, one connection per job), in
alternating order. TTFT: request sent to first content delta; total: to the last event.

    python bench/http_vs_ws.py [--concurrency 16] [--max-tokens 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import platform
import statistics
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import IMAGES, free_port, quiet_logs
from bridge.app import BridgeApp
from bridge.client import HubClient
from bridge.config import load_settings
from bridge.store.memory import MemoryStore
from engine import Engine, EngineConfig
from engine.tiny import ensure_tiny_model

TOKEN = "bench-token"
PROMPT = "Describe the image."
PHOTO = (IMAGES / "chelsea.jpg").read_bytes()


async def http_job(client: openai.AsyncOpenAI, max_tokens: int) -> tuple[float, float]:
    """One streaming chat completion: (ttft, total) seconds."""
    url = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    t0 = time.perf_counter()
    ttft = float("nan")
    stream = await client.chat.completions.create(
        model="tiny",
        stream=True,
        max_tokens=max_tokens,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": PROMPT},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    )
    async for chunk in stream:
        if ttft != ttft and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    return ttft, time.perf_counter() - t0


async def ws_job(url: str, job_id: str, max_tokens: int) -> tuple[float, float]:
    """One /ws job on its own connection: (ttft, total) seconds."""
    async with HubClient(url, TOKEN) as client:
        await client.wait_connected(10.0)
        t0 = time.perf_counter()
        ttft = float("nan")
        await client.submit(job_id, PROMPT, PHOTO, max_tokens=max_tokens)
        async for frame in client.frames():
            if frame.get("kind") == "delta" and ttft != ttft:
                ttft = time.perf_counter() - t0
            if frame.get("kind") in ("done", "error"):
                if frame["kind"] == "error":
                    raise RuntimeError(f"ws job failed: {frame}")
                break
        return ttft, time.perf_counter() - t0


def summary(samples: list[tuple[float, float]]) -> str:
    ttft = sorted(s[0] for s in samples)
    total = sorted(s[1] for s in samples)

    def p95(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, int(0.95 * len(xs)))]

    return (
        f"TTFT median {statistics.median(ttft) * 1000:7.1f} ms  p95 {p95(ttft) * 1000:7.1f} ms | "
        f"total median {statistics.median(total) * 1000:7.1f} ms  p95 {p95(total) * 1000:7.1f} ms"
    )


async def main(concurrency: int, max_tokens: int, rounds: int) -> None:
    quiet_logs()
    engine = Engine(
        EngineConfig(
            model=str(ensure_tiny_model()),
            device="cpu",
            max_new_tokens=max_tokens,
            max_batch=concurrency,
            cache_ttl_s=0,
        )
    )
    settings = load_settings(
        {"port": str(free_port()), "token": [TOKEN], "token-submit-rate": "0"}, env={}
    )
    app = BridgeApp(settings, engine=engine, store=MemoryStore(), adapters=[])
    await app.start()
    try:
        while not engine.status().ready:  # noqa: ASYNC110 - the engine offers no ready event
            await asyncio.sleep(0.05)
        base = app.urls[0]
        ws_url = base.replace("http", "ws", 1) + "/ws"
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0)
        await http_job(client, max_tokens)  # warm-up
        results: dict[str, list[tuple[float, float]]] = {"http": [], "ws": []}
        for r in range(rounds):
            order = ["http", "ws"] if r % 2 == 0 else ["ws", "http"]
            for kind in order:
                if kind == "http":
                    jobs = [http_job(client, max_tokens) for _ in range(concurrency)]
                else:
                    jobs = [ws_job(ws_url, f"j{r}-{i}", max_tokens) for i in range(concurrency)]
                results[kind] += await asyncio.gather(*jobs)
        await client.close()
        print(
            f"{platform.processor() or platform.machine()}, {concurrency} concurrent streaming "
            f"jobs x {rounds} rounds, max_tokens={max_tokens}, tiny model on CPU"
        )
        for kind in ("http", "ws"):
            print(f"{kind:>4}: {summary(results[kind])}")
    finally:
        await app.stop(grace_s=2.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.max_tokens, args.rounds))
