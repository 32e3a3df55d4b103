"""The ``--slack-*`` options: checks, masking, and the adapter they build."""

from __future__ import annotations

import pytest

from adapters.slack import SlackAdapter, SlackConfig
from adapters.slack.config import ConfigError as SlackConfigError
from bridge.config import ConfigError, load_settings
from bridge.metrics import Metrics
from bridge.platforms import build_adapters
from tests.adapters.slack.fake_slack import APP_TOKEN, BOT_TOKEN

TOKENS = {"slack-app-token": APP_TOKEN, "slack-bot-token": BOT_TOKEN}


def test_off_by_default_and_builds_nothing() -> None:
    s = load_settings({}, env={})
    assert s.slack_mode == "off" and s.slack_base_url == "https://slack.com/api"
    assert not [a for a in build_adapters(s, Metrics()) if a.platform == "slack"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({}, "--slack-app-token and --slack-bot-token"),
        ({"slack-app-token": APP_TOKEN}, "needs --slack-bot-token"),
        ({"slack-bot-token": BOT_TOKEN}, "needs --slack-app-token"),
        ({"slack-app-token": BOT_TOKEN, "slack-bot-token": BOT_TOKEN}, "xapp-"),
        ({"slack-app-token": APP_TOKEN, "slack-bot-token": APP_TOKEN}, "xoxb-"),
    ],
)
def test_socket_mode_needs_both_tokens(flags: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_settings({"slack-mode": "socket", **flags}, env={})
    assert APP_TOKEN not in str(info.value) and BOT_TOKEN not in str(info.value)


def test_mode_is_checked_and_tokens_come_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="slack-mode"):
        load_settings({"slack-mode": "webhook"}, env={})
    env = {"BRIDGE_SLACK_APP_TOKEN": APP_TOKEN, "BRIDGE_SLACK_BOT_TOKEN": BOT_TOKEN}
    s = load_settings(
        {"slack-mode": "socket", "slack-base-url": "http://127.0.0.1:9/api/"}, env=env
    )
    assert s.slack_app_token == APP_TOKEN and s.slack_base_url == "http://127.0.0.1:9/api"
    text = repr(s) + repr(s.public())
    assert APP_TOKEN not in text and BOT_TOKEN not in text


async def test_socket_mode_builds_the_slack_adapter_with_im_metrics() -> None:
    metrics = Metrics()
    s = load_settings({"slack-mode": "socket", **TOKENS}, env={})
    (adapter,) = [a for a in build_adapters(s, metrics) if a.platform == "slack"]
    assert isinstance(adapter, SlackAdapter)
    assert adapter.config.api_root == "https://slack.com/api"
    assert adapter.status().state == "off" and adapter.status().mode == "socket"
    adapter._core.count("accepted")
    assert metrics.im_events.labels(platform="slack", outcome="accepted")._value.get() == 1
    await adapter.stop()


def test_the_adapter_config_validates_itself() -> None:
    with pytest.raises(SlackConfigError, match="app-level token"):
        SlackConfig(bot_token=BOT_TOKEN).validate()
    with pytest.raises(SlackConfigError, match="ping_interval_s"):
        SlackConfig(APP_TOKEN, BOT_TOKEN, ping_interval_s=5, receive_deadline_s=5).validate()
    assert APP_TOKEN not in repr(SlackConfig(APP_TOKEN, BOT_TOKEN))
