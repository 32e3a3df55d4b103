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
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from bridge.hub import protocol as p
from bridge.hub.connection import ConnectionCore
from bridge.hub.frame_gate import FrameGate
from bridge.hub.inflight import InflightBudget

if TYPE_CHECKING:
    from bridge.hub.session import Session

log = structlog.get_logger(__name__)

_MESSAGE_TOO_BIG = 1009
# Below this many bytes waiting in the socket's buffer a frame is written at once, without a task.
WRITE_HIGH_WATER = 256 * 1024
#: A slow consumer's close may wait this long for its socket to take the close frame; then the
#: transport is aborted, so a client that never reads cannot pin its buffered output forever.
SLOW_CLOSE_ABORT_S = 10.0


# Frame headers: one prebuilt per short length, a compiled struct for the 16-bit ones (every
# delivery builds a frame, so this is on the fan-out hot path).
_SHORT_HEADERS = tuple(bytes((0x81, n)) for n in range(126))
_HEADER_16 = struct.Struct("!BBH")


def text_frame(text: str) -> bytes:
    """An unmasked, uncompressed, final WebSocket text frame (RFC 6455 §5.2) carrying ``text``."""
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        return _SHORT_HEADERS[n] + payload
    if n < 65_536:
        return _HEADER_16.pack(0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class HubWebSocket(web.WebSocketResponse):
    """aiohttp's WebSocket response with our close code for oversized frames (4004, not 1009)
    and, given a budget, a :class:`~bridge.hub.frame_gate.FrameGate` in front of its parser.

    Args:
        budget: the process's inbound-bytes budget (None: no gate).
        **kwargs: passed to :class:`aiohttp.web.WebSocketResponse`.

    Attributes:
        gate: the gate reading this connection's frame headers (None without a budget, or if
            this aiohttp version offers no place for it; then nothing is reserved).
    """

    # Slots, not instance-dict entries: the two extra attributes grew every connection's dict.
    __slots__ = ("_budget", "gate")

    def __init__(self, *, budget: InflightBudget | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._budget = budget
        self.gate: FrameGate | None = None

    def _post_start(self, request: Any, protocol: str | None, writer: Any) -> None:
        # aiohttp hands its parser to the request's protocol here; the gate takes its place, and
        # any bytes that came with the upgrade request go through the gate too. These are
        # aiohttp internals, checked by tests/hub/test_inflight.py for each upgrade.
        handler = request.protocol
        budget = self._budget
        tail = getattr(handler, "_message_tail", b"") if budget is not None else b""
        if tail:
            handler._message_tail = b""
        super()._post_start(request, protocol, writer)
        if budget is None:
            return
        parser = getattr(self, "_parser", None)
        if parser is None or getattr(handler, "_payload_parser", None) is not parser:
            log.warning("ws_gate_unavailable", detail="aiohttp internals changed; no frame gate")
            if tail:
                handler._payload_parser.feed_data(tail)
            return
        assert parser is not None
        gate = FrameGate(parser, budget, self._max_msg_size)
        handler._payload_parser = gate
        self.gate = gate
        if tail and gate.feed_data(tail)[0]:
            handler.close()

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
        "_queue",
        "core",
        "counted",
        "forced_chars",
        "id",
        "max_pending_bytes",
        "on_closing",
        "queue_max",
        "queued_chars",
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
        max_pending_bytes: int = 4 * 2**20,
    ) -> None:
        self.id = conn_id
        self.ws = ws
        self.core = core
        self.remote = remote
        self.queue_max = queue_max
        self.max_pending_bytes = max_pending_bytes
        self.transport = transport
        # Made when a frame first has to wait (760 bytes that most connections never need).
        self._queue: deque[str] | None = None
        #: Characters of the frames in :attr:`queue` (about their bytes: event frames are JSON).
        self.queued_chars = 0
        #: Characters sent with ``force`` since the queue was last empty (a resume's replay):
        #: they raise the byte bound for as long as they may still be pending.
        self.forced_chars = 0
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
    def queue(self) -> Collection[str]:
        """The frames waiting for the writer, oldest first (read-only view for callers)."""
        queue = self._queue
        return () if queue is None else queue

    @property
    def closing(self) -> bool:
        """True once a close was decided; nothing more is sent or handled."""
        return self._close_task is not None or self.ws.closed

    def pending_bytes(self) -> int:
        """Output this client has not taken yet, as far as the process can see: the frames queued
        here plus the bytes the transport holds unwritten.

        The kernel's socket buffers (this host's send buffer, the peer's receive buffer) absorb
        the first few MiB of a client that stops reading without showing up here; once they are
        full, everything more lands in the transport and counts.
        """
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self.queued_chars + buffered

    def send(self, frame: str, *, force: bool = False) -> bool:
        """Send a frame: at once when the socket keeps up, else through the bounded queue.

        A client that stopped reading is closed with 4003 (its events stay in the session's
        replay buffer) when the queue holds ``queue_max`` frames or when :meth:`pending_bytes`
        would pass ``max_pending_bytes`` (plus what a resume's replay added with ``force``).

        Args:
            frame: the text to send.
            force: bypass the bound (a resume replay, which the replay buffer already bounds).

        Returns:
            Whether the frame was accepted.
        """
        if self._close_task is not None:
            return False
        queue = self._queue
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
        if force:
            self.forced_chars += len(frame)
        elif (queue is not None and len(queue) >= self.queue_max) or (
            self.pending_bytes() + len(frame) > self.max_pending_bytes + self.forced_chars
        ):
            log.info(
                "ws_slow_consumer",
                conn_id=self.id,
                queued_frames=len(self.queue),
                pending_bytes=self.pending_bytes(),
                limit_bytes=self.max_pending_bytes,
            )
            self.close(p.CLOSE_SLOW_CONSUMER, "slow consumer")
            return False
        if queue is None:
            self._queue = queue = deque()
        queue.append(frame)
        self.queued_chars += len(frame)
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._drain())
        return True

    async def _drain(self) -> None:
        ws = self.ws
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                frame = queue.popleft()
                self.queued_chars -= len(frame)
                self.write_since = time.monotonic()
                await ws.send_str(frame)
                self.sent += 1
        except (ConnectionError, RuntimeError) as exc:
            # The peer is gone; its events stay in the session's replay buffer.
            log.debug("ws_send_failed", conn_id=self.id, error=type(exc).__name__)
            self._clear_queue()
        finally:
            self.write_since = None
            self.writer = None
            if not queue:
                self.forced_chars = 0
                if self._queue is queue:
                    self._queue = None  # a caught-up connection gives the deque back

    def _clear_queue(self) -> None:
        if self._queue is not None:
            self._queue.clear()
        self.queued_chars = 0
        self.forced_chars = 0

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
            self._clear_queue()
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
            self._clear_queue()
        try:
            if code == p.CLOSE_SLOW_CONSUMER:
                # The close frame waits behind output the client is not reading: bound the wait.
                async with asyncio.timeout(SLOW_CLOSE_ABORT_S):
                    await self.ws.close(code=code, message=reason.encode()[:120], drain=False)
            else:
                await self.ws.close(code=code, message=reason.encode()[:120], drain=False)
        except TimeoutError:
            log.info("ws_slow_consumer_aborted", conn_id=self.id)
            if self.transport is not None:
                self.transport.abort()
        except Exception as exc:  # the transport may already be gone
            log.debug("ws_close_failed", conn_id=self.id, error=type(exc).__name__)

    async def wait_closed(self) -> None:
        """Wait for a decided close to finish."""
        task = self._close_task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
