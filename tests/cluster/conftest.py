"""Cluster test fixtures: a real Redis (shared DB 12 or private)."""

from __future__ import annotations

from tests.redis_fixtures import (
    private_redis,
    redis_base_url,
    redis_cluster_url,
    redis_store_url,
)

__all__ = ["private_redis", "redis_base_url", "redis_cluster_url", "redis_store_url"]
