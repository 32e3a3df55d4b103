"""What each component of the bridge is built with, derived from the settings (engine, hub,
shared answer cache), kept apart from the composition root that builds and runs them."""

from __future__ import annotations

from typing import Literal, cast

from bridge.config import Settings
from bridge.hub import HubConfig
from bridge.store import Store
from engine import EngineConfig
from engine.shared_cache import SharedAnswerCache


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's settings derived from the process settings."""
    return EngineConfig(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        max_batch=settings.max_batch,
        batch_wait_ms=settings.batch_wait_ms,
        batching=cast(Literal["static", "continuous", "auto"], settings.batching),
        queue_size=settings.queue_size,
        max_new_tokens=settings.max_new_tokens,
        job_timeout_s=settings.job_timeout,
        vision_cache_bytes=settings.vision_cache_bytes,
        limits=settings.limits,
    )


def shared_answer_cache(settings: Settings, store: Store) -> SharedAnswerCache | None:
    """The cluster-wide answer cache on the Redis store's client; None for other stores or
    when ``--shared-cache-ttl`` is 0."""
    from bridge.store.redis import RedisStore

    if not isinstance(store, RedisStore) or settings.shared_cache_ttl <= 0:
        return None
    from bridge.store.redis_answers import RedisAnswerCache

    return RedisAnswerCache(
        store, ttl_s=settings.shared_cache_ttl, max_bytes=settings.shared_cache_max_bytes
    )


def hub_config(settings: Settings) -> HubConfig:
    """The hub's settings derived from the process settings."""
    admin = frozenset({settings.admin_token}) if settings.admin_token else frozenset()
    return HubConfig(
        tokens=frozenset(settings.token) | admin,
        admin_tokens=admin,
        heartbeat_s=settings.heartbeat,
        heartbeat_timeout_s=settings.heartbeat_timeout,
        token_submit_rate=settings.token_submit_rate,
        topic_grants=settings.topic_grant,
        max_inflight_bytes=settings.max_inflight_bytes,
        max_frame_bytes=settings.limits.max_frame_bytes,
        max_image_bytes=settings.limits.max_image_bytes,
        max_prompt_chars=settings.limits.max_prompt_chars,
    )
