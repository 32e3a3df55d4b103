"""``/readyz`` carries the replica's load (weight, queue, rows, GPU memory) and ``/metrics`` the
same figures, on a real loopback server with a fake CUDA memory query."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp

from bridge.app import BridgeApp
from bridge.config import load_settings
from bridge.store.memory import MemoryStore
from engine.types import EngineStatus, WorkerStatus
from tests.app.fakes import FakeEngine
from tests.app.procs import free_port

GIB = 2**30


class GpuEngine(FakeEngine):
    """A fake engine on two CUDA devices whose queue and rows the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.queue_depth = 0
        self.rows = (0, 0)

    def status(self) -> EngineStatus:
        workers = tuple(
            WorkerStatus(f"w{i}", f"cuda:{i}", True, n > 0, n, 0) for i, n in enumerate(self.rows)
        )
        return EngineStatus(
            self.ready, "fake", "bfloat16", workers, self.queue_depth, 64,
            reason=None if self.ready else "model is loading",
        )  # fmt: skip


async def get(base: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(base + path) as resp:
        if path == "/metrics":
            return resp.status, await resp.text()
        return resp.status, await resp.json()


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


async def test_readyz_and_metrics_report_the_load() -> None:
    free = {"cuda:0": 40 * GIB, "cuda:1": 30 * GIB}
    engine = GpuEngine()
    settings = load_settings({"port": str(free_port()), "max-batch": "4"}, env={})
    app = BridgeApp(
        settings,
        engine=engine,
        store=MemoryStore(),
        adapters=[],
        mem_info=lambda device: (free[device], 80 * GIB),
    )
    await app.start()
    try:
        base = app.urls[0]
        code, body = await get(base, "/readyz")
        assert code == 503 and body["load"]["weight"] == 0 and "reason" in body
        engine.loaded.set()
        for _ in range(500):
            if (await get(base, "/readyz"))[0] == 200:
                break
            await asyncio.sleep(0.01)
        engine.rows, engine.queue_depth = (4, 2), 16
        code, body = await get(base, "/readyz")
        assert code == 200 and body["status"] == "ready" and "engine" in body["components"]
        load = body["load"]
        assert (load["live_rows"], load["max_rows"]) == (6, 8)
        assert (load["queue_depth"], load["queue_capacity"]) == (16, 64)
        assert load["gpu"]["cuda:1"] == {
            "used_bytes": 50 * GIB,
            "free_bytes": 30 * GIB,
            "total_bytes": 80 * GIB,
        }
        assert load["weight"] == round(100 * (1 - (6 / 8 + 16 / 64) / 2))  # memory is ample
        _, text = await get(base, "/metrics")
        assert gauge(text, "bridge_engine_load_weight") == load["weight"]
        assert gauge(text, "bridge_engine_live_rows") == 6
        used = 'bridge_engine_gpu_memory_used_bytes{device="cuda:0"}'
        assert gauge(text, used) == 40 * GIB
        assert gauge(text, 'bridge_engine_gpu_memory_free_bytes{device="cuda:1"}') == 30 * GIB
        app.draining = True
        code, body = await get(base, "/readyz")
        assert code == 503 and body["load"]["weight"] == 0
    finally:
        engine.loaded.set()
        await app.stop(grace_s=1.0)
