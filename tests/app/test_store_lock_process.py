"""One SQLite file, one process: a second ``bridge serve`` on it exits 2 with one line, and a
process that cannot bind its port never touches the store."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.app.procs import BridgeProcess
from tests.conftest import ROOT, UNIT


async def test_a_second_process_on_the_same_sqlite_file_exits_2(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/bridge.db"
    first = BridgeProcess(tmp_path / "first.log", "--store", store).start()
    try:
        await first.wait_ready()
        assert first.proc is not None
        second = BridgeProcess(tmp_path / "second.log", "--store", store).start()
        assert second.proc is not None
        code = await asyncio.to_thread(second.proc.wait, 60 * UNIT)
        assert code == 2, second.log()
        plain = [line for line in second.log().splitlines() if not line.startswith("{")]
        assert plain == [
            f"bridge: error: --store: {tmp_path}/bridge.db is in use by another bridge process "
            f"(pid {first.proc.pid}); an SQLite file serves one process only: stop that process, "
            "give this one its own sqlite:///PATH, or use redis:// to run several nodes"
        ]
        events = [
            json.loads(line)["event"] for line in second.log().splitlines() if line[:1] == "{"
        ]
        assert "sqlite_store_opened" not in events and "bridge_started" not in events
        await first.wait_ready(10)  # the first one is unharmed
        assert await first.terminate() == 0
        # The lock goes with the process: the file can be used again.
        third = BridgeProcess(tmp_path / "third.log", "--store", store).start()
        try:
            await third.wait_ready()
            assert await third.terminate() == 0
        finally:
            third.ensure_dead()
    finally:
        first.ensure_dead()


def test_a_process_that_cannot_bind_its_port_does_not_touch_the_store(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bridge",
                "serve",
                "--port",
                str(port),
                "--log-format",
                "json",
                "--store",
                f"sqlite:///{tmp_path}/var/bridge.db",
            ],
            capture_output=True,
            text=True,
            timeout=120 * UNIT,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    events = [json.loads(line)["event"] for line in result.stdout.splitlines() if line[:1] == "{"]
    assert "listen_failed" in events
    assert not (tmp_path / "var").exists()  # neither the database, its lock nor its folder
