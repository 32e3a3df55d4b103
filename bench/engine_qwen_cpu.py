"""CPU benchmark of continuous versus static batching on a shrunken random-weight Qwen2.5-VL.

The model is bench/engine_gpu.py's ``SHRUNK`` Qwen2.5-VL (2 layers, hidden size 64, real
vocabulary and image pipeline), so the multimodal rope path (per-row rope deltas) is what runs.
Its processor is rebuilt from the image processor and tokenizer (tests/engine/qwen_fixtures.py)
because the Qwen processor needs torchvision; ``Replica.load`` is pointed at that replica, and
everything else is the real engine (queue, scheduler, worker, streaming). Jobs carry images of
different sizes and ``max_tokens`` of 4, 8 or 12, so static batches wait for their longest row.

    python bench/engine_qwen_cpu.py [--jobs 32] [--concurrency 8,16] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from bench.common import best_of_alternating, quiet_logs
from engine import Done, Engine, EngineConfig, JobRequest
from engine.model import Replica
from tests.engine.qwen_fixtures import build_qwen_replica

SIZES = [(224, 224), (448, 224), (224, 336), (280, 280), (336, 224)]


def images() -> list[bytes]:
    """PNG photos-to-be of the sizes above (flat colours: content does not change the cost)."""
    out = []
    for i, size in enumerate(SIZES):
        buf = io.BytesIO()
        Image.new("RGB", size, (50 * i, 120, 200 - 30 * i)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def run_level(
    engine: Engine, photos: list[bytes], jobs: int, concurrency: int, tag: str
) -> float:
    """Jobs per second for ``jobs`` jobs pushed through ``engine`` by ``concurrency`` clients."""
    counter = iter(range(jobs))

    async def client() -> None:
        for i in counter:
            req = JobRequest(
                job_id=f"{tag}-{i}",
                image=photos[i % len(photos)],
                prompt=" ".join(f"w{10 + k}" for k in range(1 + i % 7)),
                max_tokens=4 + 4 * (i % 3),
            )
            last = None
            async for event in engine.submit(req).events():
                last = event
            if not isinstance(last, Done):
                raise RuntimeError(f"job {req.job_id} failed: {last}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return jobs / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--concurrency", default="8,16")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    quiet_logs()
    replica = build_qwen_replica(Path(tempfile.mkdtemp(prefix="qwen-shrunk-")) / "model")

    def load(cls: Any, *a: Any, **kw: Any) -> Replica:
        return replica

    Replica.load = classmethod(load)  # type: ignore[assignment,method-assign]
    modes = ["static", "continuous"]
    engines = {
        mode: Engine(
            EngineConfig(
                model="qwen-shrunk",
                device="cpu",
                max_batch=16,
                batch_wait_ms=5.0,
                queue_size=1024,
                max_new_tokens=12,
                cache_ttl_s=0,
                job_timeout_s=600,
                batching=mode,  # type: ignore[arg-type]
            )
        )
        for mode in modes
    }
    for engine in engines.values():
        await engine.start()
    if engines["continuous"].batching != "continuous":
        raise SystemExit("the shrunken Qwen2.5-VL does not run continuous batching")
    photos = images()
    try:

        async def level(mode: str, engine: Engine, c: int, rep: int) -> dict[str, float]:
            return {"jobs_s": await run_level(engine, photos, args.jobs, c, f"{mode}{c}.{rep}")}

        results, rows = await best_of_alternating(engines, levels, args.repeat, level)
    finally:
        for engine in engines.values():
            await engine.stop()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"jobs per level: {args.jobs}, max_tokens 4/8/12, best of {args.repeat}\n")
    print("| concurrency | static jobs/s | continuous jobs/s | speed-up | live rows/step (s / c) |")
    print("| --- | --- | --- | --- | --- |")
    for c in levels:
        s, k = results[("static", c)]["jobs_s"], results[("continuous", c)]["jobs_s"]
        print(
            f"| {c} | {s:.2f} | {k:.2f} | {k / s:.2f}x "
            f"| {rows[('static', c)]:.1f} / {rows[('continuous', c)]:.1f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
