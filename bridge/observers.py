"""Adapters from the engine's and the IM adapters' observer hooks to Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable

from bridge.metrics import Metrics


class EngineMetrics:
    """An :class:`engine.types.EngineObserver` that records into :class:`Metrics` (thread-safe)."""

    def __init__(self, metrics: Metrics, latency: Callable[[float], None] | None = None) -> None:
        self._m = metrics
        self._latency = latency

    def on_batch(self, size: int) -> None:
        self._m.engine_batch_size.observe(size)

    def on_job_end(self, outcome: str, completion_tokens: int, seconds: float) -> None:
        self._m.engine_requests.labels(outcome=outcome).inc()
        if completion_tokens:
            self._m.engine_generated_tokens.inc(completion_tokens)
        self._m.engine_job_latency.observe(seconds)
        if self._latency is not None:
            self._latency(seconds)

    def on_queue_depth(self, depth: int) -> None:
        self._m.engine_queue_depth.set(depth)

    def on_batch_isolated(self, stage: str, jobs: int) -> None:
        self._m.engine_batch_isolations.labels(stage=stage).inc()

    def on_cache_lookup(self, tier: str, hit: bool) -> None:
        self._m.engine_cache_lookups.labels(tier=tier, result="hit" if hit else "miss").inc()

    def on_vision_cache_lookup(self, hit: bool) -> None:
        self._m.engine_vision_cache_lookups.labels(result="hit" if hit else "miss").inc()

    def on_vision_cache_bytes(self, size: int) -> None:
        self._m.engine_vision_cache_bytes.set(size)


class FeishuMetrics:
    """Counts Feishu events by outcome: accepted, duplicate, rejected."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def on_event(self, outcome: str) -> None:
        self._m.feishu_events.labels(outcome=outcome).inc()
        self._m.im_events.labels(platform="feishu", outcome=outcome).inc()


class ImMetrics:
    """Counts one IM platform's deliveries by outcome in ``bridge_im_events_total``."""

    def __init__(self, metrics: Metrics, platform: str) -> None:
        self._m = metrics
        self._platform = platform

    def on_event(self, outcome: str) -> None:
        self._m.im_events.labels(platform=self._platform, outcome=outcome).inc()
