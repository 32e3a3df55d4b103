"""The real process: exit 2 on bad config, ready with the tiny model, answers, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
import websockets.sync.client as ws_sync

from tests.app.procs import BridgeProcess
from tests.conftest import IMAGES, ROOT, UNIT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def test_bad_port_prints_one_line_and_exits_2() -> None:
    result = run_cli("serve", "--port", "not-a-port")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["bridge: error: --port: 'not-a-port' is not a port number (1-65535)"]
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_env_and_unknown_flag_exit_2() -> None:
    env = {**os.environ, "BRIDGE_HEARTBEAT": "soon"}
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "bridge: error: BRIDGE_HEARTBEAT: 'soon' is not a number"
    result = run_cli("serve", "--no-such-flag")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_make_tiny_model_writes_a_loadable_folder(tmp_path: Path) -> None:
    result = run_cli("make-tiny-model", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "config.json").exists()


def http_json(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    port = free_port()
    log_path = tmp_path / "bridge.log"
    env = {**os.environ, "BRIDGE_TOKEN": "client-token-1", "BRIDGE_LOG_FORMAT": "json"}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge",
                "serve",
                "--port",
                str(port),
                "--store",
                f"sqlite:///{tmp_path}/bridge.db",
                "--max-new-tokens",
                "8",
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    try:
        yield proc, f"127.0.0.1:{port}", log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_is_ready_answers_and_exits_0_on_sigterm(
    server: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, addr, log_path = server
    started = time.monotonic()
    status = 0
    while time.monotonic() - started < 60 * UNIT:
        assert proc.poll() is None, log_path.read_text()
        try:
            status, _ = http_json(f"http://{addr}/readyz")
        except OSError:
            status = 0
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200, log_path.read_text()
    assert http_json(f"http://{addr}/healthz") == (200, {"status": "ok"})
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        assert b"bridge_engine_queue_depth" in resp.read()

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    started_lines = [line for line in lines if line.get("event") == "bridge_started"]
    assert len(started_lines) == 1 and f"ws://{addr}/ws" == started_lines[0]["ws"]
    assert "client-token-1" not in log_path.read_text()

    image = base64.b64encode((IMAGES / "chelsea.jpg").read_bytes()).decode()
    with ws_sync.connect(f"ws://{addr}/ws", max_size=2**24) as ws:
        ws.send(json.dumps({"type": "hello", "token": "client-token-1"}))
        welcome = json.loads(ws.recv(timeout=10))
        assert welcome["type"] == "welcome" and welcome["resumed"] is False
        ws.send(json.dumps({"type": "submit", "id": "j1", "prompt": "What?", "image": image}))
        kinds, text = [], ""
        while True:
            frame = json.loads(ws.recv(timeout=60))
            if frame["type"] != "event":
                continue
            kinds.append(frame["kind"])
            if frame["kind"] == "delta":
                text += frame["text"]
            if frame["kind"] in ("done", "error"):
                break
        assert kinds[-1] == "done", frame
        assert frame["text"] == text

        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        bye = json.loads(ws.recv(timeout=10))
        assert bye["type"] == "bye"
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - sent_at < 10
    assert "shutdown_done" in log_path.read_text()


async def test_console_script_serves_and_sigint_says_bye_and_exits_0(tmp_path: Path) -> None:
    """The ``bridge`` command (README): SIGINT stops it like SIGTERM: ``bye``, 1001, exit 0."""
    script = Path(sys.executable).parent / "bridge"
    assert script.exists(), "the project's console script is not installed"
    bridge = BridgeProcess(
        tmp_path / "b.log", "--store", "memory://", "--token", "t1", launcher=[str(script)]
    ).start()
    try:
        await bridge.wait_ready()
        async with websockets.connect(bridge.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "token": "t1"}))
            assert json.loads(await ws.recv())["type"] == "welcome"
            assert bridge.proc is not None
            bridge.proc.send_signal(signal.SIGINT)
            frames = []
            with contextlib.suppress(websockets.ConnectionClosed):
                async with asyncio.timeout(15):
                    while True:
                        frames.append(json.loads(await ws.recv()))
            assert {"type": "bye", "reason": "shutdown"} in frames, frames
            assert ws.close_code == 1001
        async with asyncio.timeout(15 * UNIT):
            while bridge.proc.poll() is None:  # noqa: ASYNC110 - a child process, not a task
                await asyncio.sleep(0.05)
        assert bridge.proc.returncode == 0
        assert "shutdown_done" in bridge.log()
    finally:
        bridge.ensure_dead()
