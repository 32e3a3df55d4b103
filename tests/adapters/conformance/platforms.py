"""The harnesses the conformance suite runs: add one line here to plug a platform in."""

from __future__ import annotations

from collections.abc import Callable

from tests.adapters.conformance.dingtalk import DingTalkStreamHarness
from tests.adapters.conformance.feishu import FeishuLongConnHarness, FeishuWebhookHarness
from tests.adapters.conformance.harness import PlatformHarness
from tests.adapters.conformance.slack import SlackSocketHarness
from tests.adapters.conformance.telegram import TelegramWebhookHarness
from tests.adapters.conformance.wecom import WeComHarness

#: Test id -> a factory of a fresh harness (one per test module run).
HARNESSES: dict[str, Callable[[], PlatformHarness]] = {
    "feishu-webhook": FeishuWebhookHarness,
    "feishu-longconn": FeishuLongConnHarness,
    "slack-socket": SlackSocketHarness,
    "wecom-webhook": WeComHarness,
    "telegram-webhook": TelegramWebhookHarness,
    "dingtalk-stream": DingTalkStreamHarness,
}
