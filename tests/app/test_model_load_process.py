"""Real ``bridge serve`` processes and models that cannot load, load slowly, or load with progress.

The hub is reached through ``HF_ENDPOINT`` on loopback: a closed port (unreachable) or a socket that
accepts connections and never answers (a hub that hangs), so no test needs the network.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.app.procs import BridgeProcess, free_port
from tests.conftest import ROOT, UNIT

HUB_ID = "Qwen/Qwen2.5-VL-3B-Instruct"


def hub_env(tmp_path: Path, endpoint: str | None = None, offline: bool = False) -> dict[str, str]:
    """An environment with an empty Hugging Face cache, online or offline."""
    env = dict(os.environ)
    env["HF_HOME"] = str(tmp_path / "hf-home")
    # Explicit values, since BridgeProcess merges its env over the test run's (which is offline).
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1" if offline else "0"
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    return env


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def serve_to_exit(
    tmp_path: Path, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            "serve",
            "--port",
            str(free_port()),
            "--log-format",
            "json",
            "--store",
            "memory://",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120 * UNIT,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_a_model_path_that_does_not_exist_is_a_config_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--model", "/nope/model"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bridge: error: --model: '/nope/model': no such model folder "
        "(and not a Hugging Face id like 'org/name')"
    ]
    assert result.stdout == ""


def test_an_uncached_id_offline_exits_1_with_one_line_saying_what_to_do(tmp_path: Path) -> None:
    result = serve_to_exit(tmp_path, "--model", HUB_ID, env=hub_env(tmp_path, offline=True))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ""  # nothing printed beside the JSON log (no plain hub warnings)
    lines = json_lines(result.stdout)
    assert len(lines) == len(result.stdout.splitlines())
    errors = [line for line in lines if line["level"] == "error"]
    assert [e["event"] for e in errors] == ["model_load_failed"]
    message = str(errors[0]["error"])
    assert "HF_HUB_OFFLINE" in message and f"hf download {HUB_ID}" in message
    assert "local model folder" in message
    assert "shutdown_done" in [line["event"] for line in lines]


def test_an_unreachable_hub_exits_1_at_once_instead_of_retrying(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = serve_to_exit(tmp_path, "--model", HUB_ID, env=hub_env(tmp_path, closed))
    assert result.returncode == 1, result.stdout + result.stderr
    # The hub's own retries (1+2+4+8+8 s per file) would take far longer than one attempt.
    assert time.monotonic() - started < 60 * UNIT
    errors = [line for line in json_lines(result.stdout) if line["level"] == "error"]
    assert [e["event"] for e in errors] == ["model_load_failed"]
    assert "the hub cannot be reached" in str(errors[0]["error"])
    assert "--model-load-retry" in str(errors[0]["error"])
    assert "Retrying in" not in result.stdout + result.stderr


async def get_json(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.text()


async def poll_reason(bridge: BridgeProcess, pattern: str, limit_s: float = 60.0) -> str:
    """Poll ``/readyz`` until its reason matches ``pattern``; the reason."""
    deadline = time.monotonic() + limit_s * UNIT
    reason = ""
    while time.monotonic() < deadline:
        assert bridge.proc is not None and bridge.proc.poll() is None, bridge.log()
        try:
            status, body = await get_json(bridge.base + "/readyz")
            reason = str(body.get("reason"))
            if status == 503 and re.search(pattern, reason):
                return reason
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz never said {pattern!r} (last: {reason!r}):\n{bridge.log()}")


async def wait_exit(bridge: BridgeProcess, limit_s: float) -> int:
    assert bridge.proc is not None
    deadline = time.monotonic() + limit_s
    while bridge.proc.poll() is None:
        assert time.monotonic() < deadline, f"still running after {limit_s:.0f}s:\n{bridge.log()}"
        await asyncio.sleep(0.05)
    return bridge.proc.returncode


async def test_model_load_retry_keeps_trying_and_sigterm_exits_0(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    bridge = BridgeProcess(
        tmp_path / "b.log",
        "--store",
        "memory://",
        "--model",
        HUB_ID,
        "--model-load-retry",
        "--grace",
        "2",
        env=hub_env(tmp_path, closed),
    ).start()
    try:
        reason = await poll_reason(bridge, r"attempt [2-9]")
        assert "model failed to load" in reason and "cannot be reached" in reason
        assert "bridge_ready 0.0" in await get_text(bridge.base + "/metrics")
        retries = [e for e in json_lines(bridge.log()) if e["event"] == "model_load_retry"]
        assert len(retries) >= 2 and [e["attempt"] for e in retries[:2]] == [1, 2]
        assert bridge.proc is not None
        sent = time.monotonic()
        bridge.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(bridge, 30 * UNIT) == 0
        assert time.monotonic() - sent < 2 + 10 * UNIT
        assert "shutdown_done" in bridge.log()
    finally:
        bridge.ensure_dead()


@pytest.fixture
def hanging_hub() -> Iterator[str]:
    """A hub endpoint whose connections are accepted by the kernel and never answered."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


async def test_sigterm_during_a_stuck_load_exits_within_the_grace(
    tmp_path: Path, hanging_hub: str
) -> None:
    env = hub_env(tmp_path, hanging_hub)
    env["HF_HUB_ETAG_TIMEOUT"] = "600"  # the hub request would hang for ten minutes
    bridge = BridgeProcess(
        tmp_path / "b.log", "--store", "memory://", "--model", HUB_ID, "--grace", "2", env=env
    ).start()
    try:
        first = await poll_reason(bridge, r"^loading model '.+': asking the hub, \d+\.\d s$")
        # The reason is live: its elapsed seconds move on while the load is stuck.
        await poll_reason(
            bridge, r"asking the hub, (?!" + re.escape(first.rsplit(", ", 1)[1]) + ")"
        )
        assert bridge.proc is not None
        sent = time.monotonic()
        bridge.proc.send_signal(signal.SIGTERM)  # once: no second signal needed
        code = await wait_exit(bridge, 30 * UNIT)
        assert code == 1, bridge.log()
        assert time.monotonic() - sent < 2 + 10 * UNIT
        lines = json_lines(bridge.log())
        errors = [e for e in lines if e["level"] == "error"]
        assert [e["event"] for e in errors] == ["engine.load_abandoned"], errors
        assert "did not stop within the grace period" in str(errors[0]["error"])
        assert lines[-1]["event"] == "shutdown_done"
    finally:
        bridge.ensure_dead()


async def test_tiny_load_logs_progress_and_sets_bridge_ready(tmp_path: Path) -> None:
    bridge = BridgeProcess(tmp_path / "b.log", "--store", "memory://").start()
    try:
        await bridge.wait_ready()
        assert "bridge_ready 1.0" in await get_text(bridge.base + "/metrics")
        progress = [e for e in json_lines(bridge.log()) if e["event"] == "engine.load_progress"]
        assert {"loading processor", "loading weights", "warming up"} <= {
            str(e["phase"]) for e in progress
        }
        assert all(e["shards"] == 1 and int(str(e["checkpoint_bytes"])) > 0 for e in progress[1:])
        assert bridge.proc is not None
        assert await bridge.terminate() == 0
    finally:
        bridge.ensure_dead()
