"""Writing a job's chunk log as an SSE response, from any seq: the first stream and every resume.

Each chunk goes out with ``id: <seq>``; a client that lost the connection sends the last id it
saw as ``Last-Event-ID`` and gets exactly the chunks after it (no duplicate, no gap), then the
live rest. A dropped client costs nothing: the job runs on and its log waits.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from bridge.http import sse
from bridge.http.errors import ApiError
from bridge.http.jobs import HttpJob

log = structlog.get_logger(__name__)

MAX_SEQ_CHARS = 12
#: Seconds of silence before an SSE comment line is sent (proxies close idle responses).
KEEPALIVE_S = 15.0


def last_event_id(request: web.Request) -> int:
    """The ``Last-Event-ID`` header (or ``?last_event_id=``) as a seq; 0 when absent."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        raw = request.query.get("last_event_id")
    if raw is None or raw.strip() == "":
        return 0
    raw = raw.strip()
    if len(raw) > MAX_SEQ_CHARS or not raw.isascii() or not raw.isdigit():
        raise ApiError(
            400,
            "Last-Event-ID must be a non-negative integer (an SSE id: seen on the stream)",
            param="Last-Event-ID",
            code="invalid_request",
        )
    return int(raw)


def stream_headers(job_id: str) -> dict[str, str]:
    """The headers of every SSE answer (the job id in ``X-Request-Id``)."""
    return {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        "X-Request-Id": job_id,
    }


class _SseResponse(web.StreamResponse):
    """An SSE answer whose headers leave with its first chunk: one send instead of two, on the
    path every request takes before the next one is read (aiohttp's ``web.Response`` buffers
    its headers the same way; :func:`write_stream` flushes them itself when nothing is due)."""

    _send_headers_immediately = False


async def write_stream(
    request: web.Request, job: HttpJob, after: int, keepalive_s: float = KEEPALIVE_S
) -> web.StreamResponse:
    """Send ``job``'s chunks after seq ``after`` and follow it live until its end; while nothing
    comes for ``keepalive_s`` (a long queue), an SSE comment keeps proxies from timing out.

    Whatever is in the log when the writer wakes goes out as one write (with the headers the
    first time, with the end of the chunked body the last time): one send per wake-up, not
    one per chunk, since a send on loopback costs about as much as rendering a token's chunk.
    """
    if after > len(job.chunks) and job.ended:
        raise ApiError(
            400,
            f"Last-Event-ID {after} is beyond the stream's last id {len(job.chunks)}",
            param="Last-Event-ID",
            code="invalid_request",
        )
    resp = _SseResponse(status=200, headers=stream_headers(job.id))
    await resp.prepare(request)
    # Let the other requests that arrived with this one be parsed and submitted before its
    # first send: a send lets the engine's threads take the GIL and start a batch of only the
    # jobs submitted so far (the /ws path sends nothing while it reads submits, either).
    await asyncio.sleep(0)
    sent = after
    try:
        if sent >= len(job.chunks) and not job.ended:
            await resp.write(b"")  # nothing due yet: the headers go now, alone
        while True:
            chunks = job.chunks
            upto = len(chunks)
            if sent < upto:
                data = b"".join([sse.encode(chunks[i], i + 1) for i in range(sent, upto)])
                if job.ended and upto == len(job.chunks):
                    await resp.write_eof(data)
                    sent = upto
                    return resp
                await resp.write(data)
                sent = upto
                continue  # more may have come while the write waited for the socket
            if job.ended:
                break
            if not await job.wait(keepalive_s):
                await resp.write(sse.KEEPALIVE)
        await resp.write_eof()
    except (ConnectionError, RuntimeError) as exc:
        # The client went away (aiohttp raises ConnectionResetError or "closing transport"):
        # the job runs on; a resume picks up after the last id the client saw.
        log.info("http_stream_dropped", job_id=job.id, sent=sent, error=type(exc).__name__)
    return resp
