"""The harnesses the conformance suite runs: add one line here to plug a platform in."""

from __future__ import annotations

from collections.abc import Callable

from tests.adapters.conformance.dingtalk import DingTalkStreamHarness
from tests.adapters.conformance.feishu import FeishuLongConnHarness, FeishuWebhookHarness
from tests.adapters.conformance.harness import PlatformHarness

#: Test id -> a factory of a fresh harness (one per test module run).
HARNESSES: dict[str, Callable[[], PlatformHarness]] = {
    "feishu-webhook": FeishuWebhookHarness,
    "feishu-longconn": FeishuLongConnHarness,
    "dingtalk-stream": DingTalkStreamHarness,
}
