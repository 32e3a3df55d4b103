"""``--wecom-*`` options and their checks, and the callback core against arbitrary requests."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.wecom import WeComAdapter
from adapters.wecom.callback import CallbackCore
from bridge.config import ConfigError, load_settings
from bridge.metrics import Metrics
from bridge.platforms import build_adapters
from tests.adapters.wecom.conftest import make_config
from tests.adapters.wecom.fake_wecom import AES_KEY, AGENT_ID, CORP_ID, SECRET, TOKEN

FLAGS = {
    "wecom-mode": "webhook",
    "wecom-corp-id": CORP_ID,
    "wecom-agent-id": AGENT_ID,
    "wecom-secret": SECRET,
    "wecom-token": TOKEN,
    "wecom-aes-key": AES_KEY,
    "store": "memory://",
}


def test_complete_options_build_one_adapter_and_mask_secrets() -> None:
    s = load_settings(FLAGS, env={})
    assert s.wecom_base_url == "https://qyapi.weixin.qq.com"
    for text in (repr(s), str(s.public())):
        assert SECRET not in text and TOKEN not in text and AES_KEY not in text
    [adapter] = build_adapters(s, Metrics())
    assert isinstance(adapter, WeComAdapter) and adapter.platform == "wecom"


def test_off_by_default() -> None:
    s = load_settings({"store": "memory://"}, env={})
    assert s.wecom_mode == "off"
    assert not [a for a in build_adapters(s, Metrics()) if a.platform == "wecom"]


@pytest.mark.parametrize("missing", ["wecom-corp-id", "wecom-secret", "wecom-token"])
def test_missing_options_are_named(missing: str) -> None:
    flags = {k: v for k, v in FLAGS.items() if k != missing}
    with pytest.raises(ConfigError, match=f"--{missing}"):
        load_settings(flags, env={})


@pytest.mark.parametrize(
    ("key", "why"),
    [("x" * 42, "43 characters"), ("?" * 43, "not base64"), (AES_KEY[:-1] + "=", "32 bytes")],
)
def test_bad_aes_key_is_refused_without_echo(key: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        load_settings({**FLAGS, "wecom-aes-key": key}, env={})
    assert key not in str(info.value)


def test_agent_id_must_be_a_number_and_env_works() -> None:
    with pytest.raises(ConfigError, match="agent_id"):
        load_settings({**FLAGS, "wecom-agent-id": "app"}, env={})
    env = {"BRIDGE_WECOM_SECRET": "from-env"}
    flags = {k: v for k, v in FLAGS.items() if k != "wecom-secret"}
    assert load_settings(flags, env=env).wecom_secret == "from-env"


CORE = CallbackCore(make_config("http://x"), clock=lambda: 0.0)
QUERY = st.dictionaries(
    st.sampled_from(["msg_signature", "timestamp", "nonce", "echostr"]), st.text(max_size=80)
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(QUERY, st.binary(max_size=2000))
def test_arbitrary_requests_are_refused_cleanly(query: dict[str, str], body: bytes) -> None:
    decision = CORE.message(query, body)
    assert decision.kind == "rejected" and decision.status in (400, 403, 413)
    check = CORE.url_check(query)
    assert check.kind == "rejected" and check.status in (400, 403)
