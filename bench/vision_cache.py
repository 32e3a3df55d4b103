"""The vision-feature cache on the tiny model on CPU: a second question about the same photo
against the first, per sample image, and jobs/s at 16 concurrent with 50% repeated images.

Part 1, per image of tests/data/images (the valid ones), one job at a time: the first question
(vision-cache miss: decode, preprocess, vision tower, prefill, decode steps) against a second,
different question about the same bytes (hit: straight to prefill). Latency and process CPU
per job, median of ``--reps`` (the vision cache is emptied before each first question).

Part 2, ``--concurrency`` clients, ``--jobs`` jobs, every image its own bytes (a photo with a
coloured corner, bench/answer_cache.py): ``none`` (all new images), ``50% repeated`` (half
the images had another question asked before) and the same 50% mix with the cache off.

The answer cache is off throughout (every question is new anyway).

    python bench/vision_cache.py [--reps 5] [--jobs 64] [--concurrency 16] [--max-tokens 8]
        [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.answer_cache import run, unique_images
from bench.common import IMAGES, cpu_s, quiet_logs
from engine import Done, Engine, EngineConfig, JobRequest

FIRST, SECOND = "Describe the image.", "What colour is it?"
ORDER = ["none", "50% repeated", "50% repeated, cache off"]


def config(vision_cache_bytes: int) -> EngineConfig:
    """The tiny model on CPU, no answer cache, fixed output length."""
    return EngineConfig(
        model="tiny",
        device="cpu",
        max_batch=16,
        ignore_eos=True,
        batch_wait_ms=10,
        cache_ttl_s=0,
        vision_cache_bytes=vision_cache_bytes,
    )


async def one(engine: Engine, job_id: str, data: bytes, prompt: str, tokens: int) -> float:
    """Run one job alone; its latency in ms."""
    started = time.perf_counter()
    last = None
    async for event in engine.submit(JobRequest(job_id, data, prompt, tokens)).events():
        last = event
    if not isinstance(last, Done):
        raise RuntimeError(f"job {job_id} failed: {last}")
    return (time.perf_counter() - started) * 1000


async def per_image(engine: Engine, reps: int, tokens: int) -> list[tuple[str, list[float]]]:
    """Part 1: median first / second latency and CPU ms per sample image."""
    rows = []
    names = sorted(p.name for p in IMAGES.iterdir() if not p.name.startswith("bad_"))
    for name in names:
        data = (IMAGES / name).read_bytes()
        samples: list[list[float]] = [[], [], [], []]
        for r in range(reps):
            engine.vision_cache.clear()
            for col, prompt in ((0, FIRST), (2, SECOND)):
                cpu0 = cpu_s()
                samples[col].append(await one(engine, f"{name}-{r}-{col}", data, prompt, tokens))
                samples[col + 1].append((cpu_s() - cpu0) * 1000)
        rows.append((name, [statistics.median(s) for s in samples]))
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    quiet_logs()
    on, off = Engine(config(256 * 2**20)), Engine(config(0))
    c, t = args.concurrency, args.max_tokens
    try:
        for engine in (on, off):
            await engine.start()
            await run(engine, unique_images(c, salt=0), c, t, "warm")
        images = await per_image(on, args.reps, t)
        half = args.jobs // 2
        rounds: list[dict[str, dict[str, float]]] = []
        for r in range(args.rounds):
            salt = 1 + 3 * r
            fresh = unique_images(args.jobs, salt=salt)
            seen, new = unique_images(half, salt=salt + 1), unique_images(half, salt=salt + 2)
            mixed = [x for pair in zip(seen, new, strict=True) for x in pair]
            await run(on, seen, c, t, f"prime{r}")  # another question about these images first
            await run(off, seen, c, t, f"prime-off{r}")
            plan = [
                ("none", on, fresh),
                ("50% repeated", on, mixed),
                ("50% repeated, cache off", off, mixed),
            ]
            plan = plan[r % 3 :] + plan[: r % 3]  # rotate the order: drift hits every scenario
            done = {name: await run(e, jobs, c, t, f"{name}{r}") for name, e, jobs in plan}
            rounds.append({name: done[name] for name in ORDER})
        mixes = {
            name: {k: statistics.median(rd[name][k] for rd in rounds) for k in rounds[0][name]}
            for name in rounds[0]
        }
        stats = on.vision_cache.snapshot()
    finally:
        for engine in (on, off):
            await engine.stop(grace_s=2.0)
    print(
        f"python {platform.python_version()}, tiny model on CPU, max_tokens {t} (ignore_eos), "
        f"answer cache off, median of {args.reps}"
    )
    print("| image | first question ms | CPU ms | second question ms | CPU ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, (first, first_cpu, second, second_cpu) in images:
        print(
            f"| {name} | {first:.0f} | {first_cpu:.1f} | {second:.0f} | {second_cpu:.1f} | "
            f"{first / second:.2f}x |"
        )
    print(f"\n{args.jobs} jobs, {c} concurrent, max_batch 16, median of {args.rounds} rounds")
    lines = [
        "| images | jobs/s | vs none | p50 ms | p95 ms | CPU ms/job |",
        "|---|---|---|---|---|---|",
    ]
    base = mixes["none"]["jobs_s"]
    lines += [
        f"| {name} | {m['jobs_s']:.1f} | {m['jobs_s'] / base:.2f}x | {m['p50_ms']:.0f} | "
        f"{m['p95_ms']:.0f} | {m['cpu_ms_job']:.1f} |"
        for name, m in mixes.items()
    ]
    print("\n".join(lines))
    print("vision cache:", stats)


if __name__ == "__main__":
    asyncio.run(main())
