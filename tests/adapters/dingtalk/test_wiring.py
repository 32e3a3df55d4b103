"""``--dingtalk-*`` options: defaults, the stream-mode check, the adapter built, no secret shown."""

from __future__ import annotations

import pytest

from adapters.dingtalk import DingTalkAdapter
from bridge.config import ConfigError, load_settings
from bridge.metrics import Metrics
from bridge.platforms import build_adapters, dingtalk

SECRET = "dt-secret-NEVER-SHOWN"


def test_off_by_default_with_the_public_base_url() -> None:
    s = load_settings({}, env={})
    assert s.dingtalk_mode == "off" and s.dingtalk_base_url == "https://api.dingtalk.com"
    assert dingtalk.build(s, Metrics()) == []


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"dingtalk-mode": "stream"}, "needs --dingtalk-client-id and --dingtalk-client-secret"),
        ({"dingtalk-mode": "stream", "dingtalk-client-id": "x"}, "needs --dingtalk-client-secret"),
        ({"dingtalk-mode": "webhook"}, "--dingtalk-mode: 'webhook' is not one of"),
        ({"dingtalk-base-url": "ftp://x"}, "--dingtalk-base-url"),
    ],
)
def test_incomplete_options_are_refused(flags: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(flags, env={})


def test_stream_mode_builds_the_adapter_and_hides_the_secret() -> None:
    s = load_settings(
        {"dingtalk-mode": "stream", "dingtalk-client-id": "ding123"},
        env={"BRIDGE_DINGTALK_CLIENT_SECRET": SECRET},
    )
    [adapter] = [a for a in build_adapters(s, Metrics()) if a.platform == "dingtalk"]
    assert isinstance(adapter, DingTalkAdapter)
    assert adapter.config.client_secret == SECRET
    assert (
        SECRET not in repr(s) and SECRET not in repr(adapter) and SECRET not in repr(adapter.config)
    )
    assert dingtalk.routes(adapter, s) == []


def test_a_card_template_switches_answers_to_streamed_cards() -> None:
    s = load_settings(
        {
            "dingtalk-mode": "stream",
            "dingtalk-client-id": "ding123",
            "dingtalk-client-secret": SECRET,
            "dingtalk-card-template-id": "tmpl.schema",
        },
        env={},
    )
    [adapter] = dingtalk.build(s, Metrics())
    assert isinstance(adapter, DingTalkAdapter)
    assert adapter.config.card_template_id == "tmpl.schema"
    assert adapter.config.card_content_key == "content"
