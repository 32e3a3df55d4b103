"""Wiring of this platform: its option checks, adapters and webhook routes (none until built)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.base import Adapter
from bridge.config import Settings
from bridge.metrics import Metrics

if TYPE_CHECKING:
    from bridge.platforms import Route


def check(s: Settings) -> None:
    """No WeCom options exist yet, so there is nothing to check."""


def build(s: Settings, metrics: Metrics) -> list[Adapter]:
    """No WeCom adapter exists yet."""
    return []


def routes(adapter: Adapter, s: Settings) -> list[Route]:
    """No WeCom routes exist yet."""
    return []
