"""The documented metrics carry real values: the engine observer, the heartbeat histogram."""

from __future__ import annotations

from bridge.metrics import Metrics
from bridge.observers import EngineMetrics
from engine import Done, Engine, EngineConfig, Failed, JobRequest
from tests.conftest import IMAGES


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_engine_outcomes_batches_and_tokens_are_counted() -> None:
    metrics = Metrics()
    engine = Engine(
        EngineConfig(model="tiny", device="cpu", max_batch=4, max_new_tokens=8, cache_ttl_s=600),
        observer=EngineMetrics(metrics),
    )
    await engine.start()
    photo = (IMAGES / "coffee.jpg").read_bytes()
    tokens = 0
    try:
        for job_id, image, prompt in (
            ("a", photo, "What is this?"),
            ("b", photo, "What is this?"),  # the same question again: answered from the cache
            ("c", b"not an image", "What is this?"),
        ):
            last = None
            async for event in engine.submit(JobRequest(job_id, image, prompt, 8)).events():
                last = event
            if isinstance(last, Done) and not last.cached:
                tokens += last.usage.completion_tokens
            assert isinstance(last, Done | Failed)
    finally:
        await engine.stop()
    assert sample(metrics, "bridge_engine_requests_total", outcome="done") == 1
    assert sample(metrics, "bridge_engine_requests_total", outcome="cached") == 1
    assert sample(metrics, "bridge_engine_requests_total", outcome="bad_image") == 1
    assert tokens > 0 and sample(metrics, "bridge_engine_generated_tokens_total") == tokens
    assert sample(metrics, "bridge_engine_batch_size_count") >= 1
    assert sample(metrics, "bridge_engine_batch_size_sum") >= 1
    assert sample(metrics, "bridge_engine_queue_depth") == 0


async def test_vision_cache_hits_misses_and_bytes_are_exported() -> None:
    metrics = Metrics()
    engine = Engine(
        EngineConfig(model="tiny", device="cpu", max_new_tokens=4, cache_ttl_s=0),
        observer=EngineMetrics(metrics),
    )
    await engine.start()
    photo = (IMAGES / "rocket.jpg").read_bytes()
    try:
        for job_id, prompt in (("a", "What is this?"), ("b", "Which colour?"), ("c", "Why?")):
            async for _ in engine.submit(JobRequest(job_id, photo, prompt, 4)).events():
                pass
        held = engine.vision_cache.size_bytes
    finally:
        await engine.stop()
    name = "bridge_engine_vision_cache_lookups_total"
    assert sample(metrics, name, result="miss") == 1
    assert sample(metrics, name, result="hit") == 2
    assert held > 0 and sample(metrics, "bridge_engine_vision_cache_bytes") == held
