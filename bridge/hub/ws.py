"""The aiohttp side of a /ws connection: a bounded send queue, one writer, close handling.

All protocol decisions live in :mod:`bridge.hub.connection` and the hub (:mod:`bridge.hub.hub`,
:mod:`bridge.hub.frames`, :mod:`bridge.hub.resume`, :mod:`bridge.hub.liveness`); this module
only moves frames, so it is small and every write goes through :meth:`Connection.send`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from bridge.hub import protocol as p
from bridge.hub.connection import ConnectionCore

if TYPE_CHECKING:
    from bridge.hub.session import Session

log = structlog.get_logger(__name__)

_MESSAGE_TOO_BIG = 1009
# Below this many bytes waiting in the socket's buffer a frame is written at once, without a task.
WRITE_HIGH_WATER = 256 * 1024


def text_frame(text: str) -> bytes:
    """An unmasked, uncompressed, final WebSocket text frame (RFC 6455 §5.2) carrying ``text``."""
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65_536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class HubWebSocket(web.WebSocketResponse):
    """aiohttp's WebSocket response with our close code for oversized frames (4004, not 1009)."""

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        """Close, mapping the transport's "message too big" to the hub's documented 4004."""
        if code == _MESSAGE_TOO_BIG:
            code, message = p.CLOSE_TOO_LARGE, b"frame too large"
        return await super().close(code=code, message=message, drain=drain)


class Connection:
    """One live WebSocket: its protocol core, outgoing queue and the session it serves."""

    __slots__ = (
        "__weakref__",
        "_close_task",
        "core",
        "counted",
        "id",
        "on_closing",
        "queue",
        "queue_max",
        "remote",
        "sent",
        "session",
        "token_label",
        "transport",
        "wall_connected_at",
        "write_since",
        "writer",
        "ws",
    )

    def __init__(
        self,
        conn_id: str,
        ws: HubWebSocket,
        core: ConnectionCore,
        remote: str,
        queue_max: int,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.id = conn_id
        self.ws = ws
        self.core = core
        self.remote = remote
        self.queue_max = queue_max
        self.transport = transport
        self.queue: deque[str] = deque()
        self.writer: asyncio.Task[None] | None = None
        self.write_since: float | None = None
        self._close_task: asyncio.Task[None] | None = None
        self.sent = 0
        self.session: Session | None = None
        self.token_label: str | None = None
        self.counted = False
        self.wall_connected_at = time.time()
        self.on_closing: Any = None

    @property
    def closing(self) -> bool:
        """True once a close was decided; nothing more is sent or handled."""
        return self._close_task is not None or self.ws.closed

    def send(self, frame: str, *, force: bool = False) -> bool:
        """Send a frame: at once when the socket keeps up, else through the bounded queue.

        A full queue means the client stopped reading: it is closed with 4003 and its events
        stay in the session's replay buffer.

        Args:
            frame: the text to send.
            force: bypass the bound (a resume replay, which the replay buffer already bounds).

        Returns:
            Whether the frame was accepted.
        """
        if self._close_task is not None:
            return False
        queue = self.queue
        transport = self.transport
        if (
            not queue
            and self.writer is None
            and transport is not None
            and transport.get_write_buffer_size() < WRITE_HIGH_WATER
        ):
            # The hot path: no task, no await. Whole frames written on the loop thread cannot
            # interleave with aiohttp's own control frames. (Measured: corking frames of one
            # loop iteration into one write cost more CPU in fan-out than it saved.)
            if transport.is_closing():
                return False
            transport.write(text_frame(frame))
            self.sent += 1
            return True
        if self.ws.closed:
            return False
        if not force and len(queue) >= self.queue_max:
            self.close(p.CLOSE_SLOW_CONSUMER, "slow consumer")
            return False
        queue.append(frame)
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._drain())
        return True

    async def _drain(self) -> None:
        ws = self.ws
        queue = self.queue
        try:
            while queue:
                frame = queue.popleft()
                self.write_since = time.monotonic()
                await ws.send_str(frame)
                self.sent += 1
        except (ConnectionError, RuntimeError) as exc:
            # The peer is gone; its events stay in the session's replay buffer.
            log.debug("ws_send_failed", conn_id=self.id, error=type(exc).__name__)
            queue.clear()
        finally:
            self.write_since = None
            self.writer = None

    def stalled_for(self, now: float) -> float:
        """Seconds the current write has been blocked (0 when none is)."""
        since = self.write_since
        return 0.0 if since is None else max(0.0, now - since)

    def close(self, code: int, reason: str, *, flush_s: float = 0.0) -> None:
        """Close with ``code`` soon (a task), after flushing queued frames for up to ``flush_s``."""
        if self._close_task is not None or self.ws.closed:
            return
        self.core.closed(code)
        if self.on_closing is not None:
            self.on_closing(self, code)
        if flush_s <= 0:
            self.queue.clear()
        self._close_task = asyncio.get_running_loop().create_task(
            self._close(code, reason, flush_s)
        )

    async def _close(self, code: int, reason: str, flush_s: float) -> None:
        writer = self.writer
        if flush_s > 0 and writer is not None:
            await asyncio.wait({writer}, timeout=flush_s)
        writer = self.writer
        if writer is not None:
            writer.cancel()
            self.queue.clear()
        try:
            await self.ws.close(code=code, message=reason.encode()[:120], drain=False)
        except Exception as exc:  # the transport may already be gone
            log.debug("ws_close_failed", conn_id=self.id, error=type(exc).__name__)

    async def wait_closed(self) -> None:
        """Wait for a decided close to finish."""
        task = self._close_task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
