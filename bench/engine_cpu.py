"""CPU benchmark of the engine on the tiny model: batching modes versus one generate at a time.

Runs the same jobs (sample photos, varied prompts, fixed ``max_tokens``) through an engine with
``max_batch=1`` (the naive one-request-at-a-time handler) and one engine per batching mode
(``static``: one generate per batch; ``continuous``: jobs admitted between decode steps), at
several client concurrencies, and prints jobs/s and p50/p95 latency as a Markdown table.

    python bench/engine_cpu.py [--jobs 96] [--max-tokens 32] [--concurrency 1,4,16,48]
        [--repeat 2] [--batching static,continuous]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import IMAGES, best_of_alternating
from engine import Done, Engine, EngineConfig, JobRequest

PHOTOS = ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "hubble.jpg", "astronaut.png"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def run_level(
    engine: Engine, images: list[bytes], jobs: int, concurrency: int, max_tokens: int, tag: str
) -> dict[str, float]:
    """Push ``jobs`` jobs through ``engine`` from ``concurrency`` clients."""
    latencies: list[float] = []
    tokens = 0
    counter = iter(range(jobs))

    async def client() -> None:
        nonlocal tokens
        for i in counter:
            req = JobRequest(
                job_id=f"{tag}-{i}",
                image=images[i % len(images)],
                prompt=f"Describe the image, variant {i}.",
                max_tokens=max_tokens,
            )
            started = time.perf_counter()
            handle = engine.submit(req)
            last = None
            async for event in handle.events():
                last = event
            if not isinstance(last, Done):
                raise RuntimeError(f"job {req.job_id} failed: {last}")
            latencies.append(time.perf_counter() - started)
            tokens += last.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "jobs_s": jobs / wall,
        "tokens_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p95": _percentile(latencies, 0.95),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,4,16,48")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--batching",
        default="static,continuous",
        help="comma-separated batching modes to compare with sequential",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    images = [(IMAGES / name).read_bytes() for name in PHOTOS]

    def config(max_batch: int, batching: str) -> EngineConfig:
        return EngineConfig(
            model="tiny",
            device="cpu",
            max_batch=max_batch,
            batch_wait_ms=args.batch_wait_ms,
            queue_size=1024,
            max_new_tokens=args.max_tokens,
            cache_ttl_s=0,
            job_timeout_s=600,
            batching=batching,  # type: ignore[arg-type]
        )

    engines = {"sequential": Engine(config(1, "static"))}
    for mode in modes:
        engines[mode] = Engine(config(args.max_batch, mode))
    for engine in engines.values():
        await engine.start()
    for mode in modes:
        if engines[mode].batching != mode:
            raise SystemExit(f"the tiny model does not run {mode!r} batching")
    try:

        async def level(mode: str, engine: Engine, c: int, rep: int) -> dict[str, float]:
            return await run_level(
                engine, images, args.jobs, c, args.max_tokens, f"{mode}{c}.{rep}"
            )

        results, live_rows = await best_of_alternating(engines, levels, args.repeat, level)
    finally:
        for engine in engines.values():
            await engine.stop()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    print(
        f"jobs per level: {args.jobs}, max_tokens: {args.max_tokens}, "
        f"max_batch: {args.max_batch}, batch_wait_ms: {args.batch_wait_ms}, "
        f"best of {args.repeat} alternating runs\n"
    )
    names = ["sequential", *modes]
    header = ["concurrency"]
    for name in names:
        header += [f"{name} jobs/s", "p50 s", "p95 s"]
    header += [f"{m} speed-up" for m in modes] + [f"{m} live rows/step" for m in modes]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for c in levels:
        cells = [str(c)]
        for name in names:
            r = results[(name, c)]
            cells += [f"{r['jobs_s']:.1f}", f"{r['p50']:.3f}", f"{r['p95']:.3f}"]
        base = results[("sequential", c)]["jobs_s"]
        cells += [f"{results[(m, c)]['jobs_s'] / base:.2f}x" for m in modes]
        cells += [f"{live_rows[(m, c)]:.1f}" for m in modes]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
