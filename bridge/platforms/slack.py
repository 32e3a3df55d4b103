"""Slack wiring: ``--slack-*`` checks and the Socket Mode adapter (no webhook routes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.base import Adapter
from bridge.config import ConfigError, Settings
from bridge.metrics import Metrics
from bridge.observers import ImMetrics

if TYPE_CHECKING:
    from bridge.platforms import Route


def check(s: Settings) -> None:
    """Socket Mode needs both tokens, each of its own kind."""
    if s.slack_mode == "off":
        return
    missing = [
        name
        for name, value in (
            ("--slack-app-token", s.slack_app_token),
            ("--slack-bot-token", s.slack_bot_token),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"--slack-mode {s.slack_mode} needs {' and '.join(missing)}")
    if not (s.slack_app_token or "").startswith("xapp-"):
        raise ConfigError("--slack-app-token must be an app-level token (xapp-...)")
    if not (s.slack_bot_token or "").startswith("xoxb-"):
        raise ConfigError("--slack-bot-token must be a bot token (xoxb-...)")


def build(s: Settings, metrics: Metrics) -> list[Adapter]:
    """The Slack adapter when ``--slack-mode`` is ``socket``."""
    if s.slack_mode == "off":
        return []
    from adapters.slack import SlackAdapter, SlackConfig

    cfg = SlackConfig(
        app_token=s.slack_app_token or "",
        bot_token=s.slack_bot_token or "",
        base_url=s.slack_base_url,
        max_image_bytes=s.limits.image_cap(),
    )
    return [SlackAdapter(cfg, observer=ImMetrics(metrics, "slack"))]


def routes(adapter: Adapter, s: Settings) -> list[Route]:
    """Socket Mode connects out, so Slack needs no routes."""
    return []
