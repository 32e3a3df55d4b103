"""The streaming fast paths give exactly what the general code gives: precomputed content chunks,
the one-line SSE encoding, and HttpJob's wait (woken, timed out, cancelled)."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge.http import sse
from bridge.http.jobs import HttpJob

TEXTS = ["hi", " world", 'quote " and \\ backslash', "line\nbreak", "é ✓ 😀", "\x00\x1f", "\u2028"]


@pytest.mark.parametrize("text", TEXTS)
def test_content_chunks_match_the_full_object_byte_for_byte(text: str) -> None:
    render = sse.ContentChunks("chatcmpl-abc", 1_700_000_000, 'model "x"')
    expected = sse.chunk("chatcmpl-abc", 1_700_000_000, 'model "x"', {"content": text})
    assert render(text) == expected
    assert json.loads(render(text))["choices"][0]["delta"] == {"content": text}


@pytest.mark.parametrize(
    ("data", "seq", "event", "expected"),
    [
        ('{"a":1}', 3, None, b'id: 3\ndata: {"a":1}\n\n'),
        ("[DONE]", None, None, b"data: [DONE]\n\n"),
        ("a\nb", 7, None, b"id: 7\ndata: a\ndata: b\n\n"),
        ("x", 2, "queued", b"id: 2\nevent: queued\ndata: x\n\n"),
    ],
)
def test_encode_one_line_and_general_forms(
    data: str, seq: int | None, event: str | None, expected: bytes
) -> None:
    assert sse.encode(data, seq, event) == expected


def _job() -> HttpJob:
    return HttpJob("j1", "alice", "http")


async def test_wait_is_woken_by_add_and_end() -> None:
    job = _job()
    waiter = asyncio.ensure_future(job.wait(30.0))
    await asyncio.sleep(0)
    job.add(["one"])
    assert await waiter is True
    waiter = asyncio.ensure_future(job.wait(30.0))
    await asyncio.sleep(0)
    job.end(1.0)
    assert await waiter is True
    assert await job.wait(30.0) is True  # ended: at once
    assert job._waiters == []


async def test_wait_times_out_and_forgets_its_waiter() -> None:
    job = _job()
    assert await job.wait(0.01) is False
    assert job._waiters == []
    job.add(["late"])  # nothing left to wake
    assert job.chunks == ["late"]


async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    job = _job()
    waiter = asyncio.ensure_future(job.wait(30.0))
    await asyncio.sleep(0)
    assert len(job._waiters) == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert job._waiters == []
    job.add(["after"])  # must not fail on the cancelled future
