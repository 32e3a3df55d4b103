"""A bare WebSocket client over asyncio streams: exact control of frames, reads and buffers.

The hub's limit tests need what client libraries hide: a client that sends one frame in several
fragments, or one that never reads (its socket buffers fill and the server's writes back up).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from typing import Any

from aiohttp._websocket.helpers import websocket_mask

TEXT = 0x1
CONTINUATION = 0x0
CLOSE = 0x8
PING = 0x9
PONG = 0xA


def frame(payload: bytes, opcode: int = TEXT, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65_536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytearray(payload)
    websocket_mask(mask, masked)
    return head + mask + bytes(masked)


class RawClient:
    """One connection: send frames, read frames, or deliberately read nothing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, host: str, port: int, *, rcvbuf: int | None = None) -> RawClient:
        """Open the socket (``rcvbuf``: its SO_RCVBUF, set before connecting) and upgrade."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        # A small stream limit: the client's own buffer stays small when it does not read.
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.send_raw(frame(json.dumps(obj).encode()))

    async def read_frame(self) -> tuple[int, bytes]:
        """The next server frame (opcode, payload); records the code of a close frame."""
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        payload = await self.reader.readexactly(n)
        opcode = b0 & 0x0F
        if opcode == CLOSE and len(payload) >= 2:
            self.close_code = struct.unpack("!H", payload[:2])[0]
        return opcode, payload

    async def recv_json(self, *types: str, answer_pings: bool = True) -> dict[str, Any]:
        """The next JSON text frame of one of ``types`` (any when none given)."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == CLOSE:
                raise ConnectionError(f"closed with {self.close_code}")
            if opcode != TEXT:
                continue
            obj: dict[str, Any] = json.loads(payload)
            if obj.get("type") == "ping" and answer_pings and "ping" not in types:
                await self.send_json({"type": "pong", "ts": obj["ts"]})
                continue
            if not types or obj.get("type") in types:
                return obj

    async def read_until_close(self) -> tuple[int | None, int]:
        """Read everything until the server's close frame or EOF: (close code, bytes read)."""
        total = 0
        try:
            while True:
                opcode, payload = await self.read_frame()
                total += len(payload)
                if opcode == CLOSE:
                    return self.close_code, total
        except (asyncio.IncompleteReadError, ConnectionError):
            return self.close_code, total

    def close(self) -> None:
        self.writer.close()
