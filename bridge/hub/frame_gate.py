"""The frame gate of /ws: frame headers read before aiohttp buffers a frame, so the inflight
budget is reserved (or the frame refused with ``busy``) before its payload is held.

aiohttp buffers a whole frame before handing it over, so the reservation has to happen earlier: a
:class:`FrameGate` sits between aiohttp's protocol and its WebSocket parser and reads just the frame
headers (RFC 6455 §5.2). A data frame whose declared length does not fit is never given to aiohttp:
its payload is dropped as it streams in (only its first and last few KiB are kept, to find the job
id) and the client gets ``busy`` with a ``retry_after``. Frames of at most
:data:`SMALL_FRAME_BYTES` (hello, pong, cancel, ack) always pass, so a full budget never breaks a
heartbeat; frames over the frame limit pass unreserved, so aiohttp still closes them with 4004.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog
from aiohttp._websocket.helpers import websocket_mask

from bridge.hub.inflight import InflightBudget

log = structlog.get_logger(__name__)

#: Data frames up to this size are always admitted (and still counted).
SMALL_FRAME_BYTES: Final = 64 * 1024
#: Bytes kept from each end of a dropped frame, to find its job id.
KEEP_BYTES: Final = 4096
#: What a refused client is told to wait before retrying (seconds).
RETRY_AFTER_S: Final = 1.0

_CONTINUATION: Final = 0x0
_TEXT: Final = 0x1
_BINARY: Final = 0x2
# An unescaped "id": "<job id>" member; the id alphabet is the protocol's (see protocol._ID_RE).
_ID_RE: Final = re.compile(rb'(?<!\\)"id"\s*:\s*"([A-Za-z0-9._:@/+=-]{1,128})"')
_TYPE_RE: Final = re.compile(rb'(?<!\\)"type"\s*:\s*"([a-z_]{1,32})"')


@dataclass(frozen=True, slots=True)
class Refused:
    """A data message dropped unread because it did not fit the budget.

    Attributes:
        declared: its payload bytes as declared by its frame header(s).
        job_id: the ``"id"`` found in its first or last bytes (None when not found).
        kind: its ``"type"`` when found there.
    """

    declared: int
    job_id: str | None
    kind: str | None


class _Parser(Protocol):
    def feed_data(self, data: bytes | bytearray | memoryview) -> tuple[bool, bytes]: ...

    def feed_eof(self) -> None: ...


class FrameGate:
    """Wraps aiohttp's WebSocket parser: reserves each data message at its first frame header.

    Args:
        inner: aiohttp's ``WebSocketReader``, fed every byte the gate lets through.
        budget: the process-wide budget.
        max_frame_bytes: the frame limit aiohttp enforces (larger frames pass unreserved).

    Attributes:
        reserved: bytes reserved per message handed to aiohttp and not yet :meth:`done`, oldest
            first (fragments of one message add to its entry); the deque behind it exists only
            while something is reserved, so an idle connection holds none.
    """

    def __init__(self, inner: _Parser, budget: InflightBudget, max_frame_bytes: int) -> None:
        self.inner = inner
        self.budget = budget
        self.max_frame_bytes = max_frame_bytes
        self._reserved: deque[int] | None = None
        self._on_refused: Callable[[Refused], None] | None = None
        self._pending: list[Refused] | None = None
        self._hdr = bytearray()
        self._remaining = 0  # payload bytes of the current frame still to come
        self._in_payload = False
        self._passing = True  # the current frame goes to aiohttp
        self._fin = True
        self._control = False
        self._mask = b""
        self._offset = 0  # payload bytes of the current frame seen so far
        self._in_message = False  # a passed data message awaits its final fragment
        self._dropping = False  # dropping the current data message
        self._cut = False  # the dropped rest belongs to a message aiohttp already has part of
        self._drop_declared = 0
        # A fresh bytearray for each dropped payload (most connections never drop one).
        self._drop_head: bytes | bytearray = b""
        self._drop_tail = b""
        self._closed = False

    @property
    def reserved(self) -> Collection[int]:
        """See the class docstring (an empty tuple while nothing is reserved)."""
        reserved = self._reserved
        return () if reserved is None else reserved

    # --- wiring -------------------------------------------------------------------------------
    def attach(self, on_refused: Callable[[Refused], None]) -> None:
        """Say where refusals go (refusals before this are delivered now)."""
        self._on_refused = on_refused
        pending, self._pending = self._pending, None
        for refused in pending or ():
            on_refused(refused)

    def done(self) -> None:
        """The hub finished with the oldest message aiohttp delivered: release its bytes."""
        reserved = self._reserved
        if reserved:
            self.budget.release(reserved.popleft())
            if not reserved:
                self._reserved = None

    def close(self) -> None:
        """The connection is gone: release everything it still holds."""
        reserved = self._reserved
        while reserved:
            self.budget.release(reserved.popleft())
        self._reserved = None
        self._closed = True

    def feed_eof(self) -> None:
        """aiohttp's end-of-stream, passed on."""
        self.inner.feed_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # --- the stream ---------------------------------------------------------------------------
    def feed_data(self, data: bytes | bytearray | memoryview) -> tuple[bool, bytes]:
        """Take bytes from the socket; pass what aiohttp may buffer, drop refused payloads."""
        view = memoryview(data)
        n = len(view)
        segments: list[bytes | memoryview] = []
        run_start = run_end = 0
        pos = 0
        refusals: list[Refused] = []

        def add(start: int, end: int) -> None:
            nonlocal run_start, run_end
            if start == run_end and run_end > run_start:
                run_end = end
                return
            if run_end > run_start:
                segments.append(view[run_start:run_end])
            run_start, run_end = start, end

        def flush() -> None:
            nonlocal run_start, run_end
            if run_end > run_start:
                segments.append(view[run_start:run_end])
            run_start = run_end = pos

        while pos < n:
            if not self._in_payload:
                hdr_start = pos if not self._hdr else -1
                while len(self._hdr) < _header_length(self._hdr) and pos < n:
                    take = min(_header_length(self._hdr) - len(self._hdr), n - pos)
                    self._hdr += view[pos : pos + take]
                    pos += take
                if len(self._hdr) < _header_length(self._hdr):
                    break  # the rest of the header comes with the next read
                self._on_header()
                if self._passing:
                    if hdr_start >= 0:
                        add(hdr_start, pos)
                    else:  # the header began in an earlier read and was held back
                        flush()
                        segments.append(bytes(self._hdr))
                        run_start = run_end = pos
                self._hdr.clear()
                self._offset = 0
                if self._remaining == 0:
                    self._on_frame_end(segments, refusals, flush)
                else:
                    self._in_payload = True
                continue
            take = min(self._remaining, n - pos)
            if self._passing:
                add(pos, pos + take)
            else:
                self._keep(view[pos : pos + take])
            pos += take
            self._offset += take
            self._remaining -= take
            if self._remaining == 0:
                self._in_payload = False
                self._on_frame_end(segments, refusals, flush)
        if run_end > run_start:
            if run_start == 0 and run_end == n and not segments:
                segments.append(data if type(data) is bytes else view)
            else:
                segments.append(view[run_start:run_end])
        result: tuple[bool, bytes] = (False, b"")
        for segment in segments:
            result = self.inner.feed_data(segment)
            if result[0]:
                break
        for refused in refusals:
            self._refuse(refused)
        return result

    def _on_header(self) -> None:
        """Decide whether the frame whose header is in ``_hdr`` goes to aiohttp or is dropped."""
        hdr = self._hdr
        self._fin = bool(hdr[0] & 0x80)
        opcode = hdr[0] & 0x0F
        masked = bool(hdr[1] & 0x80)
        length = hdr[1] & 0x7F
        if length == 126:
            length = struct.unpack_from("!H", hdr, 2)[0]
        elif length == 127:
            length = struct.unpack_from("!Q", hdr, 2)[0]
        self._mask = bytes(hdr[-4:]) if masked else b""
        self._remaining = length
        self._control = opcode >= 0x8
        if self._control:
            self._passing = True  # ping, pong, close: tiny, and aiohttp must see them
            return
        if self._dropping:
            self._passing = False
            self._drop_declared += length
            return
        if length > self.max_frame_bytes:
            self._passing = True  # aiohttp refuses it at the header: 4004, nothing buffered
            return
        starts = opcode in (_TEXT, _BINARY)
        if length <= SMALL_FRAME_BYTES:
            self.budget.force_reserve(length)
            fits = True
        else:
            fits = self.budget.try_reserve(length)
        if fits:
            self._passing = True
            reserved = self._reserved
            if reserved is None:
                self._reserved = reserved = deque()
            if starts or not reserved:
                reserved.append(length)
            else:
                reserved[-1] += length
            self._in_message = not self._fin
            return
        self._passing = False
        self._dropping = True
        self._cut = opcode == _CONTINUATION and self._in_message
        self._drop_declared = length
        self._drop_head = bytearray()
        self._drop_tail = b""

    def _on_frame_end(
        self,
        segments: list[bytes | memoryview],
        refusals: list[Refused],
        flush: Callable[[], None],
    ) -> None:
        if self._control or not self._fin:
            return
        self._in_message = False
        if not self._dropping:
            return
        self._dropping = False
        if self._cut:
            # aiohttp holds the message's first fragments: end it with a NUL, which no JSON
            # text may end with, so it becomes a ``bad_frame`` rather than a truncated message.
            flush()
            segments.append(b"\x80\x81\x00\x00\x00\x00\x00")
        head = bytes(self._drop_head)
        found = _ID_RE.search(head) or _ID_RE.search(self._drop_tail)
        kind = _TYPE_RE.search(head) or _TYPE_RE.search(self._drop_tail)
        refusals.append(
            Refused(
                declared=self._drop_declared,
                job_id=found.group(1).decode() if found else None,
                kind=kind.group(1).decode() if kind else None,
            )
        )

    def _keep(self, chunk: memoryview) -> None:
        """Keep the unmasked first and last :data:`KEEP_BYTES` of a dropped payload."""
        start = self._offset
        if len(self._drop_head) < KEEP_BYTES:
            part = bytearray(chunk[: KEEP_BYTES - len(self._drop_head)])
            self._drop_head += self._unmask(part, start)
        tail = bytearray(chunk[-KEEP_BYTES:])
        tail_start = start + len(chunk) - len(tail)
        self._drop_tail = (self._drop_tail + bytes(self._unmask(tail, tail_start)))[-KEEP_BYTES:]

    def _unmask(self, part: bytearray, offset: int) -> bytearray:
        if self._mask and part:
            shift = offset % 4
            websocket_mask(self._mask[shift:] + self._mask[:shift], part)
        return part

    def _refuse(self, refused: Refused) -> None:
        if self._closed:
            return
        if self._on_refused is None:
            if self._pending is None:
                self._pending = []
            self._pending.append(refused)
        else:
            self._on_refused(refused)


def _header_length(hdr: bytearray) -> int:
    """Bytes of a frame header, given its first bytes (2 until the length byte is known)."""
    if len(hdr) < 2:
        return 2
    length = hdr[1] & 0x7F
    ext = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + ext + (4 if hdr[1] & 0x80 else 0)
