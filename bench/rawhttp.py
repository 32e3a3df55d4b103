"""A minimal HTTP/1.1 keep-alive client for benchmarks: prepared request bytes written in one call,
a chunked ``text/event-stream`` answer read back as SSE ``data:`` payloads.

A general client (aiohttp, httpx under ``openai``) spends a millisecond or more of the bench's one
event loop building each request before its bytes leave, so "16 requests sent at once" reach the
server spread out, while the /ws side writes 16 prepared frames in a fraction of that. This one
writes a request built before the clock starts, as the /ws side does, so both paths are timed
from the same moment: when the bytes are handed to the socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class RawHttpError(RuntimeError):
    """The server answered something other than a 200 chunked stream."""


def request_bytes(
    host: str, path: str, body: bytes, headers: dict[str, str], method: str = "POST"
) -> bytes:
    """A complete request: request line, headers (with Content-Length) and body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawHttp:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> RawHttp:
        """Connect (the connection is then ready for :meth:`send`)."""
        reader, writer = await asyncio.open_connection(host, port, limit=2**20)
        return cls(reader, writer)

    def send(self, request: bytes) -> None:
        """Hand a prepared request to the socket (no await: nothing else runs before it)."""
        self.writer.write(request)

    async def _head(self) -> tuple[bytes, list[bytes]]:
        status = await self.reader.readline()
        headers = []
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            headers.append(line.lower())
        return status, headers

    async def fetch(self, request: bytes) -> bytes:
        """Send a request and read its whole (Content-Length) answer's body."""
        self.send(request)
        status, headers = await self._head()
        length = [int(h.split(b":", 1)[1]) for h in headers if h.startswith(b"content-length:")]
        if b" 200 " not in status or not length:
            raise RawHttpError(f"not a 200 answer with a length: {status!r} {headers!r}")
        return await self.reader.readexactly(length[0])

    async def events(self) -> AsyncIterator[bytes]:
        """The ``data:`` payloads of the answer to the request just sent; iterate to the end
        (the connection is reused: the whole answer must be read)."""
        status, headers = await self._head()
        if b" 200 " not in status or b"transfer-encoding: chunked\r\n" not in headers:
            raise RawHttpError(f"not a 200 chunked answer: {status!r} {headers!r}")
        buf = b""
        while size := int((await self.reader.readline()).strip(), 16):
            buf += (await self.reader.readexactly(size + 2))[:-2]
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    yield line[6:]
        await self.reader.readline()  # the CRLF after the last (empty) chunk

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        await self.writer.wait_closed()
