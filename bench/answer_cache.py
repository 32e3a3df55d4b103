"""Jobs/s at 16 concurrent clients with 50% repeated questions vs none, tiny model on CPU, with the
answer cache's two tiers: this node's LRU, and the Redis one shared by every node.

Two engines (node A and node B) share one Redis (a fresh prefix, deleted afterwards). Every job
has its own image bytes (a sample photo with one pixel changed), so nothing repeats by accident.
Scenarios, each on node B and each timed from the first submit to the last ``done``:

* ``none``: every question is new (the baseline, same run);
* ``50% local``: half the questions were asked on node B before (its own LRU answers them);
* ``50% shared``: half were asked on node A before (B's LRU misses, Redis answers).

    python bench/answer_cache.py [--jobs 96] [--concurrency 16] [--max-tokens 32]
        [--rounds 2] [--redis redis://127.0.0.1:6379/11]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import IMAGES, cpu_s, quiet_logs
from bridge.store.redis import RedisStore
from bridge.store.redis_answers import RedisAnswerCache
from engine import Done, Engine, EngineConfig, JobRequest
from tests.redis_fixtures import delete_prefix

PHOTOS = ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "hubble.jpg"]
PROMPT = "Describe the image."


def unique_images(count: int, salt: int) -> list[bytes]:
    """``count`` JPEGs, each a sample photo with a 16x16 corner patch coloured from ``salt`` and
    its index (large enough to survive JPEG quantisation: all distinct, checked)."""
    bases = [Image.open(IMAGES / name).convert("RGB") for name in PHOTOS]
    out = []
    for i in range(count):
        img = bases[i % len(bases)].copy()
        img.paste((salt * 37 % 256, i % 256, (i // 256) * 64 % 256), (0, 0, 16, 16))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


async def run(
    engine: Engine, images: list[bytes], concurrency: int, max_tokens: int, tag: str
) -> dict[str, float]:
    """Ask one question per image from ``concurrency`` clients; jobs/s, latency, CPU, cached."""
    latencies: list[float] = []
    cached = 0
    todo = iter(enumerate(images))

    async def client() -> None:
        nonlocal cached
        for i, data in todo:
            started = time.perf_counter()
            handle = engine.submit(JobRequest(f"{tag}-{i}", data, PROMPT, max_tokens))
            last = None
            async for event in handle.events():
                last = event
            if not isinstance(last, Done):
                raise RuntimeError(f"job {tag}-{i} failed: {last}")
            cached += last.cached
            latencies.append(time.perf_counter() - started)

    cpu0, wall0 = cpu_s(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall0, cpu_s() - cpu0
    latencies.sort()
    return {
        "jobs_s": len(images) / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))] * 1000,
        "cpu_ms_job": cpu / len(images) * 1000,
        "cached": cached,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    quiet_logs()
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    url = f"{args.redis}?prefix={prefix}"
    stores = [RedisStore(url), RedisStore(url)]
    nodes = []
    try:
        for store in stores:
            await store.open()
            config = EngineConfig(
                model="tiny", device="cpu", max_batch=16, ignore_eos=True, batch_wait_ms=10
            )
            engine = Engine(config, shared_cache=RedisAnswerCache(store))
            await engine.start()
            nodes.append(engine)
        a, b = nodes
        half = args.jobs // 2
        warm = unique_images(args.concurrency, salt=0)  # throwaway: model and threads warm up
        await run(b, warm, args.concurrency, args.max_tokens, "warm")
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(args.rounds):
            salt = 1 + 5 * r
            fresh = unique_images(args.jobs, salt)
            asked_on_b, asked_on_a = unique_images(half, salt + 1), unique_images(half, salt + 2)
            new_b, new_a = unique_images(half, salt + 3), unique_images(half, salt + 4)
            every = [*warm, *fresh, *asked_on_b, *asked_on_a, *new_b, *new_a]
            assert len(set(every)) == len(every), "the generated images must all differ"
            await run(b, asked_on_b, args.concurrency, args.max_tokens, f"prime-b{r}")
            await run(a, asked_on_a, args.concurrency, args.max_tokens, f"prime-a{r}")
            await asyncio.sleep(0.5)  # the shared tier's writes are asynchronous to the jobs

            def mix(repeats: list[bytes], news: list[bytes]) -> list[bytes]:
                return [x for pair in zip(repeats, news, strict=True) for x in pair]

            c, t = args.concurrency, args.max_tokens
            rounds.append(
                {
                    "none": await run(b, fresh, c, t, f"none{r}"),
                    "50% local": await run(b, mix(asked_on_b, new_b), c, t, f"local{r}"),
                    "50% shared": await run(b, mix(asked_on_a, new_a), c, t, f"shared{r}"),
                }
            )
        results = {
            name: {k: statistics.mean(rd[name][k] for rd in rounds) for k in rounds[0][name]}
            for name in rounds[0]
        }
        counts = b.answers.counts
    finally:
        for engine in nodes:
            await engine.stop(grace_s=2.0)
        for store in stores:
            await store.close()
        delete_prefix(args.redis, prefix)
    print(
        f"python {platform.python_version()}, {args.jobs} jobs, {args.concurrency} concurrent, "
        f"max_tokens {args.max_tokens} (ignore_eos), max_batch 16, tiny model on CPU, "
        f"mean of {args.rounds} rounds"
    )
    print("| repeated questions | jobs/s | p50 ms | p95 ms | CPU ms/job | answered from cache |")
    print("|---|---|---|---|---|---|")
    base = results["none"]["jobs_s"]
    for name, row in results.items():
        print(
            f"| {name} | {row['jobs_s']:.1f} ({row['jobs_s'] / base:.2f}x) | {row['p50_ms']:.0f} | "
            f"{row['p95_ms']:.0f} | {row['cpu_ms_job']:.0f} | {row['cached']:.0f}/{args.jobs} |"
        )
    print("node B lookups:", {f"{t}/{'hit' if h else 'miss'}": n for (t, h), n in counts.items()})


if __name__ == "__main__":
    asyncio.run(main())
