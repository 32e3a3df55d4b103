"""Fetch an ``image_url`` from a host allowed by ``--http-image-hosts``, within size and time.

Redirects are not followed (the target host was not checked), and the body is read in pieces so
an oversized image is refused (413) without holding more than the limit.
"""

from __future__ import annotations

import asyncio

import aiohttp
import structlog

from bridge.http.errors import ApiError

log = structlog.get_logger(__name__)

CHUNK_BYTES = 64 * 1024


async def fetch_image(
    session: aiohttp.ClientSession, url: str, *, max_bytes: int, timeout_s: float, job_id: str
) -> bytes:
    """The body of ``url`` (already checked against the allowed hosts) or :class:`ApiError`."""
    param = "messages.content.image_url.url"
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    log.info("http_image_fetch_refused", job_id=job_id, status=resp.status)
                    raise ApiError(
                        400,
                        f"the image URL answered HTTP {resp.status}",
                        param=param,
                        code="image_fetch_failed",
                    )
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise _too_large(max_bytes, param)
                body = bytearray()
                async for piece in resp.content.iter_chunked(CHUNK_BYTES):
                    body += piece
                    if len(body) > max_bytes:
                        raise _too_large(max_bytes, param)
    except TimeoutError:
        raise ApiError(
            400,
            f"the image URL did not answer within {timeout_s:g} s",
            param=param,
            code="image_fetch_failed",
        ) from None
    except aiohttp.ClientError as exc:
        log.info("http_image_fetch_failed", job_id=job_id, error=type(exc).__name__)
        raise ApiError(
            400, "the image URL could not be fetched", param=param, code="image_fetch_failed"
        ) from None
    if not body:
        raise ApiError(400, "the image URL returned an empty body", param=param, code="bad_image")
    return bytes(body)


def _too_large(max_bytes: int, param: str) -> ApiError:
    return ApiError(413, f"the image exceeds {max_bytes} bytes", param=param, code="too_large")
