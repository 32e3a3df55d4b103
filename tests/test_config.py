"""Configuration: precedence flag > env > file > default, validation, secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import OPTIONS, ConfigError, Settings, load_settings


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return str(path)


def test_defaults_match_the_spec() -> None:
    s = load_settings({}, env={})
    assert (s.host, s.port, s.model, s.device) == ("127.0.0.1", 8080, "tiny", "auto")
    assert (s.max_batch, s.batch_wait_ms, s.queue_size, s.max_new_tokens) == (8, 10.0, 256, 256)
    assert s.store == "sqlite:///var/bridge.db"
    assert (s.heartbeat, s.heartbeat_timeout) == (45.0, 10.0)
    assert s.token == () and s.admin_token is None
    assert s.feishu_mode == "off" and s.feishu_base_url == "https://open.feishu.cn"


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'port = 9001\nmax-batch = 3\nmodel = "file-model"\nheartbeat = 30\n')
    env = {"BRIDGE_PORT": "9002", "BRIDGE_MAX_BATCH": "4"}
    s = load_settings({"port": "9003"}, env=env, config_file=cfg)
    assert s.port == 9003  # flag wins
    assert s.max_batch == 4  # env beats file
    assert s.model == "file-model"  # file beats default
    assert s.heartbeat == 30.0
    assert s.queue_size == 256  # default


def test_config_file_from_env_and_bridge_table_and_underscores(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[bridge]\nbatch_wait_ms = 25\ntoken = ["a", "b"]\n')
    s = load_settings({}, env={"BRIDGE_CONFIG": cfg})
    assert s.batch_wait_ms == 25.0
    assert s.token == ("a", "b")


def test_tokens_from_env_are_comma_separated_and_flags_repeat() -> None:
    assert load_settings({}, env={"BRIDGE_TOKEN": "x, y,,z"}).token == ("x", "y", "z")
    assert load_settings({"token": ["p", "q,r"]}, env={}).token == ("p", "q", "r")


@pytest.mark.parametrize(
    ("flags", "env", "needle"),
    [
        ({"port": "not-a-port"}, {}, "--port: 'not-a-port' is not a port number"),
        ({"port": "70000"}, {}, "--port: 70000 is out of range"),
        ({}, {"BRIDGE_MAX_BATCH": "0"}, "BRIDGE_MAX_BATCH: 0 is out of range"),
        ({"device": "tpu"}, {}, "--device: 'tpu' is not auto, cpu, cuda or cuda:N"),
        ({"store": "postgres://x"}, {}, "--store: must be sqlite"),
        ({"heartbeat": "nan"}, {}, "--heartbeat"),
        ({"heartbeat": "-1"}, {}, "--heartbeat: -1 is out of range"),
        ({"feishu-mode": "smoke"}, {}, "--feishu-mode: 'smoke' is not one of"),
        ({"feishu-base-url": "ftp://x"}, {}, "--feishu-base-url"),
        ({"host": "bad host!"}, {}, "--host"),
        ({"feishu-mode": "webhook"}, {}, "needs --feishu-app-id and --feishu-app-secret"),
    ],
)
def test_bad_values_give_one_line_naming_the_option(
    flags: dict[str, object], env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(flags, env=env)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_bad_file_values_and_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'prot'"):
        load_settings({}, env={}, config_file=write(tmp_path, "prot = 1\n"))
    with pytest.raises(ConfigError, match="port: 'x' is not a port"):
        load_settings({}, env={}, config_file=write(tmp_path, 'port = "x"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, env={}, config_file=write(tmp_path, "port = = 3\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({}, env={}, config_file=str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="max-batch: True is not an integer"):
        load_settings({}, env={}, config_file=write(tmp_path, "max-batch = true\n"))
    with pytest.raises(ConfigError, match="must be a value"):
        load_settings({}, env={}, config_file=write(tmp_path, "[port]\nx = 1\n"))
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00port")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, env={}, config_file=str(binary))


def test_secrets_never_appear_in_errors_repr_or_public_view() -> None:
    secret = "s3cr3t-value-with\nnewline"
    with pytest.raises(ConfigError) as err:
        load_settings({"admin-token": secret}, env={})
    assert "s3cr3t" not in str(err.value)
    s = load_settings(
        {
            "admin-token": "adm1n",
            "token": ["cl1ent"],
            "feishu-mode": "webhook",
            "feishu-app-id": "cli_1",
            "feishu-app-secret": "app-s3cret",
            "feishu-encrypt-key": "enc-k3y",
        },
        env={},
    )
    text = repr(s) + str(s.public())
    for value in ("adm1n", "cl1ent", "app-s3cret", "enc-k3y"):
        assert value not in text
    assert "cli_1" in text


def test_every_option_is_a_settings_field_with_the_same_default() -> None:
    defaults = Settings()
    for opt in OPTIONS:
        assert getattr(defaults, opt.attr) == opt.default, opt.name
        assert opt.env == "BRIDGE_" + opt.name.upper().replace("-", "_")


def test_vision_cache_bytes_reaches_the_engine() -> None:
    from bridge.app import engine_config

    assert engine_config(load_settings({}, env={})).vision_cache_bytes == 256 * 2**20
    s = load_settings({"vision-cache-bytes": "64MiB"}, env={"BRIDGE_VISION_CACHE_BYTES": "1"})
    assert engine_config(s).vision_cache_bytes == 64 * 2**20
    assert engine_config(load_settings({"vision-cache-bytes": "0"}, env={})).vision_cache_bytes == 0
    with pytest.raises(ConfigError, match="vision-cache-bytes"):
        load_settings({"vision-cache-bytes": "-1"}, env={})
