"""Topic grants: the ``TOKEN=PATTERN`` parser, the option's three sources, and matching."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import ConfigError, load_settings
from bridge.grants import TopicGrants, check_pattern, parse_grant

TOKEN_CHARS = "".join(ch for ch in string.printable if not ch.isspace())
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=40).filter(
    lambda t: "=chat:" not in t and "=*" not in t and not t.endswith("=")
) | st.text(string.ascii_letters, min_size=1, max_size=20).map(lambda t: t + "==")
patterns = st.sampled_from(["chat:", "*"]).flatmap(
    lambda start: st.text(string.ascii_letters + string.digits + "_:*?-", max_size=30).map(
        lambda rest: start + rest
    )
)


@given(token=tokens, pattern=patterns)
def test_token_and_pattern_round_trip(token: str, pattern: str) -> None:
    assert parse_grant(f"{token}={pattern}") == (token, pattern)


@given(text=st.text(max_size=80))
def test_anything_else_is_refused_without_echoing_the_token(text: str) -> None:
    try:
        token, pattern = parse_grant(text)
    except ValueError as exc:
        head = text.split("=", 1)[0]
        # Whatever the message says of its own (the expected form) is no echo of the input.
        template = "a topic grant must be TOKEN=PATTERN, PATTERN starting 'chat:' or '*'"
        if len(head) >= 4 and head not in template:
            assert head not in str(exc)
    else:
        assert f"{token}={pattern}" == text and check_pattern(pattern) == pattern


@pytest.mark.parametrize(
    "bad", ["tok", "tok=", "=chat:x", "tok=ops", "tok=chat:a b", "tok=chat:x,", "t k=chat:x"]
)
def test_bad_grants(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_grant(bad)


def test_matching_is_a_case_sensitive_glob_per_label() -> None:
    grants = TopicGrants(
        [("L1", "chat:feishu:*"), ("L2", "chat:feishu:oc_a?c"), ("L2", "chat:x:[ab]")]
    )
    assert grants.allows("L1", "chat:feishu:oc_anything")
    assert not grants.allows("L1", "chat:slack:C1")
    assert grants.allows("L2", "chat:feishu:oc_abc")
    assert not grants.allows("L2", "chat:feishu:oc_ABC")
    assert not grants.allows("L2", "chat:feishu:oc_abcd")
    assert grants.allows("L2", "chat:x:b") and not grants.allows("L2", "chat:x:c")
    assert not grants.allows("L3", "chat:feishu:oc_abc") and not grants.allows(None, "chat:x:a")
    assert grants.by_label() == {
        "L1": ("chat:feishu:*",),
        "L2": ("chat:feishu:oc_a?c", "chat:x:[ab]"),
    }


def test_flag_env_and_toml(tmp_path: Path) -> None:
    flags = {"token": ["a", "b=="], "topic-grant": ["a=chat:feishu:*", "b===chat:x:1"]}
    s = load_settings(flags, env={})
    assert s.topic_grant == (("a", "chat:feishu:*"), ("b==", "chat:x:1"))
    env = {"BRIDGE_TOKEN": "a,b", "BRIDGE_TOPIC_GRANT": "a=chat:feishu:*, b=chat:y:*"}
    assert load_settings({}, env=env).topic_grant == (("a", "chat:feishu:*"), ("b", "chat:y:*"))
    cfg = tmp_path / "b.toml"
    cfg.write_text('token = ["a"]\ntopic-grant = ["a=chat:feishu:oc_1", "a=chat:feishu:oc_2"]\n')
    s = load_settings({}, env={}, config_file=str(cfg))
    assert s.topic_grant == (("a", "chat:feishu:oc_1"), ("a", "chat:feishu:oc_2"))
    assert "chat:feishu" not in repr(s) and s.public()["topic_grant"] == "***"


def test_a_grant_for_an_unknown_token_is_an_error_that_hides_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"token": ["a"], "topic-grant": ["s3cret-tok=chat:feishu:*"]}, env={})
    assert "s3cret" not in str(info.value) and "chat:feishu:*" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings({"token": ["a"], "topic-grant": ["s3cret-tok"]}, env={})
    assert "s3cret" not in str(info.value)
