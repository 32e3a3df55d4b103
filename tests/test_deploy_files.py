"""docker-compose.yml, the Dockerfile and nginx.conf, checked structurally (no Docker here)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from bridge.config import OPTIONS
from tests.conftest import ROOT


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_two_bridges_redis_and_nginx_with_state_volumes() -> None:
    services = compose()["services"]
    assert set(services) == {"bridge1", "bridge2", "redis", "nginx"}
    volumes = set(compose()["volumes"])
    for name in ("bridge1", "bridge2"):
        svc = services[name]
        env = svc["environment"]
        assert env["BRIDGE_STORE"] == "redis://redis:6379/0"
        assert env["BRIDGE_HOST"] == "0.0.0.0"
        for key in env:
            assert key.startswith("BRIDGE_")
            option = key[len("BRIDGE_") :].lower().replace("_", "-")
            assert option in {o.name for o in OPTIONS}, key
        mount = svc["volumes"][0]
        volume, target = mount.split(":")[:2]
        assert volume in volumes and target == "/var/lib/bridge"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["build"] == "."
    assert "--appendonly" in services["redis"]["command"]
    nginx_mount = services["nginx"]["volumes"][0].split(":")
    assert (ROOT / nginx_mount[0]).is_file() and nginx_mount[1] == "/etc/nginx/nginx.conf"


def test_nginx_upgrades_websockets_and_outlasts_the_heartbeat() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade", conf)
    assert "proxy_http_version 1.1" in conf
    for upstream in ("bridge1:8080", "bridge2:8080"):
        assert upstream in conf
    heartbeat = next(o.default for o in OPTIONS if o.name == "heartbeat")
    deadline = next(o.default for o in OPTIONS if o.name == "heartbeat-timeout")
    ws_block = conf[conf.index("location /ws") :]
    ws_block = ws_block[: ws_block.index("}")]
    timeout = re.search(r"proxy_read_timeout\s+(\d+)s?;", ws_block)
    assert timeout is not None and int(timeout.group(1)) > heartbeat + deadline


def test_dockerfile_pins_torch_first_and_serves_with_a_state_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()
    torch_at = text.index("torch==2.13.0")
    assert torch_at < text.index("pip install .")
    assert 'VOLUME ["/var/lib/bridge"]' in text
    assert 'ENTRYPOINT ["bridge", "serve"]' in text
    assert "STOPSIGNAL SIGTERM" in text and "/readyz" in text
    for folder in ("bridge", "engine", "adapters"):
        assert f"COPY {folder} ./{folder}" in text
