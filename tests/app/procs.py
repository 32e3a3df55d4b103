"""Run real ``bridge serve`` processes for end-to-end and crash tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.conftest import ROOT, UNIT


def free_port() -> int:
    """A TCP port on loopback that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BridgeProcess:
    """One ``python -m bridge serve`` child with its log in a file."""

    def __init__(
        self,
        log_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.log_path = log_path
        self.args = ["--port", str(self.port), "--log-format", "json", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        # How the service is started: ``python -m bridge`` unless a test runs the console script.
        self.launcher = launcher or [sys.executable, "-m", "bridge"]

    def start(self) -> BridgeProcess:
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [*self.launcher, "serve", *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, limit_s: float = 90.0) -> None:
        """Poll ``/readyz`` until 200; fail with the log if the process dies or time runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s * UNIT
        async with aiohttp.ClientSession() as http:
            while loop.time() < deadline:
                assert self.proc is not None and self.proc.poll() is None, self.log()
                try:
                    async with http.get(self.base + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"bridge not ready in {limit_s}s:\n{self.log()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def terminate(self, limit_s: float = 15.0) -> int:
        """Send SIGTERM (a graceful stop); the exit code (killed past the limit)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        for _ in range(int(limit_s * 10)):
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.1)
        self.proc.kill()
        return self.proc.wait(10)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
