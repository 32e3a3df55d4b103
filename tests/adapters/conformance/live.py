"""The bridge side of the conformance suite: one ``bridge serve`` per harness, restartable on
the same sqlite store, plus the probes the tests read (``/readyz``, ``/api/status``, ``/ws``,
the JSON log) and a deadline poller (no fixed sleeps)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import websockets

from tests.adapters.conformance.harness import BotReply, PlatformHarness
from tests.app.procs import BridgeProcess
from tests.app.wsclient import recv_frame
from tests.conftest import UNIT

CLIENT_TOKEN = "conformance-client-token-K9"
ADMIN_TOKEN = "conformance-admin-token-P4"
T = TypeVar("T")


async def poll(probe: Callable[[], Awaitable[T | None]], what: str, limit_s: float = 60.0) -> T:
    """Call ``probe`` every 20 ms until it returns something other than None (or fail)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s * UNIT
    while True:
        result = await probe()
        if result is not None:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {limit_s}s waiting for {what}")
        await asyncio.sleep(0.02)


class LiveBridge:
    """A ``bridge serve`` for one harness; restarts keep the store, and every log is kept."""

    def __init__(self, harness: PlatformHarness, workdir: Path) -> None:
        self.harness = harness
        self.workdir = workdir
        self.args = [
            "--store", f"sqlite:///{workdir / 'bridge.db'}",
            "--token", CLIENT_TOKEN,
            "--topic-grant", f"{CLIENT_TOKEN}=chat:{harness.platform}:*",
            "--admin-token", ADMIN_TOKEN,
            "--max-new-tokens", "24",
            *harness.bridge_args(),
        ]  # fmt: skip
        self.processes: list[BridgeProcess] = []

    @property
    def proc(self) -> BridgeProcess:
        """The process now running."""
        return self.processes[-1]

    async def start(self) -> None:
        """Start a process, wait for ``/readyz`` and the adapter's link, attach the harness."""
        n = len(self.processes)
        proc = BridgeProcess(self.workdir / f"{self.harness.name}-{n}.log", *self.args)
        self.processes.append(proc.start())
        await proc.wait_ready()
        self.harness.attach(proc.base)
        await self.wait_link(healthy=True)

    async def restart(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, or ``kill -9``) and start a new one on the same store."""
        if kill:
            self.proc.kill9()
        else:
            assert await self.proc.terminate() == 0, self.proc.log()
        await self.start()

    async def stop(self) -> None:
        """Stop the process gracefully (killed past its grace)."""
        if self.processes:
            await self.proc.terminate()
            self.proc.ensure_dead()

    def logs(self) -> str:
        """Everything every process of this bridge wrote to stdout and stderr."""
        return "\n".join(p.log() for p in self.processes)

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines named ``event`` from the running process."""
        out = []
        for line in self.proc.log().splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                record = json.loads(line)
                if record.get("event") == event:
                    out.append(record)
        return out

    async def get_json(self, path: str, *, admin: bool = False) -> tuple[int, Any]:
        """``GET path`` on the running process: status and decoded body."""
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if admin else {}
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.proc.base + path, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    async def im_events(self) -> dict[str, float]:
        """``bridge_im_events_total`` of this platform from ``/metrics``, by outcome."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.proc.base + "/metrics") as resp,
        ):
            text = await resp.text()
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith("bridge_im_events_total{"):
                continue
            labels, _, value = line.partition("} ")
            if f'platform="{self.harness.platform}"' in labels:
                outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
                counts[outcome] = float(value)
        return counts

    async def link_status(self) -> dict[str, Any]:
        """The adapter's status as ``/readyz`` reports it."""
        _status, body = await self.get_json("/readyz")
        status: dict[str, Any] = body["components"][self.harness.platform]
        return status

    async def wait_link(self, *, healthy: bool, limit_s: float = 60.0) -> dict[str, Any]:
        """Poll ``/readyz`` until the adapter's ``healthy`` is as asked; its status."""

        async def probe() -> dict[str, Any] | None:
            status = await self.link_status()
            return status if status["healthy"] is healthy else None

        return await poll(probe, f"{self.harness.platform} healthy={healthy}", limit_s)


class Subscriber:
    """A ``/ws`` client subscribed to one chat's topic, collecting the streamed jobs."""

    def __init__(self, bridge: LiveBridge, chat: str) -> None:
        self.topic = f"chat:{bridge.harness.platform}:{chat}"
        self._url = bridge.proc.ws_url
        self._ws: Any = None

    async def __aenter__(self) -> Subscriber:
        self._ws = await websockets.connect(self._url)
        await self._ws.send(json.dumps({"type": "hello", "token": CLIENT_TOKEN}))
        assert (await recv_frame(self._ws))["type"] == "welcome"
        await self._ws.send(json.dumps({"type": "subscribe", "topic": self.topic}))
        assert await recv_frame(self._ws) == {"type": "subscribed", "topic": self.topic}
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._ws.close()

    async def final(self, job_id: str, within: float = 60.0) -> tuple[str, dict[str, Any]]:
        """The concatenated deltas and the closing (``done``/``error``) event of ``job_id``."""
        streamed = ""
        while True:
            frame = await recv_frame(self._ws, within * UNIT)
            if frame.get("type") != "event" or frame.get("id") != job_id:
                continue
            assert frame["topic"] == self.topic
            if frame["kind"] == "delta":
                streamed += frame["text"]
            elif frame["kind"] in ("done", "error"):
                return streamed, frame


async def final_reply(
    harness: PlatformHarness, chat: str, expected: str, limit_s: float = 60.0
) -> list[BotReply]:
    """Wait until some reply in ``chat`` shows ``expected``; all of the chat's replies then."""

    async def probe() -> list[BotReply] | None:
        replies = harness.replies(chat)
        return replies if any(r.final_text == expected for r in replies) else None

    return await poll(probe, f"a reply showing {expected!r} in {chat}", limit_s)


async def acked(harness: PlatformHarness, delivery: Any, limit_s: float = 30.0) -> None:
    """Wait until the bridge acknowledged the latest delivery of ``delivery``."""

    async def probe() -> bool | None:
        return True if await harness.acked(delivery) else None

    await poll(probe, f"the ack of {delivery.message_id}", limit_s)
