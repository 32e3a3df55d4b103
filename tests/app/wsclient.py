"""The /ws client side the app tests share: read frames the way every client must.

The server pings right after ``welcome`` and then every ``heartbeat`` seconds, and closes with
4002 when a ping goes unanswered, so a test client that reads frames answers those pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import websockets


async def recv_frame(ws: Any, within: float = 60.0) -> dict[str, Any]:
    """The next frame that is not a server ping (answered on the way), within ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            frame: dict[str, Any] = json.loads(await ws.recv())
            if frame.get("type") != "ping":
                return frame
            # A server already closing still has its earlier frames waiting to be read.
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(json.dumps({"type": "pong", "ts": frame.get("ts")}))
