"""Resumable streams: a client drops mid-stream, resumes with Last-Event-ID (no duplicate, no gap);
a disconnect does not cancel; DELETE does; only the starting token may resume."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import aiohttp
import openai
import pytest

from tests.http.conftest import OTHER, TOKEN, Served, user_message
from tests.http.fakes import ANSWER, GatedEngine


async def wait_until(check: object, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def parse_sse(text: str) -> list[tuple[int, str]]:
    out = []
    for block in text.split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert lines[0].startswith("id: ")
        out.append((int(lines[0][4:]), "\n".join(line[6:] for line in lines[1:])))
    return out


async def test_resume_after_a_drop_replays_then_follows_without_duplicate_or_gap(
    gated: tuple[Served, GatedEngine],
) -> None:
    served, engine = gated
    raw = await served.client.chat.completions.with_raw_response.create(
        model="gated",
        messages=[user_message()],
        stream=True,
        stream_options={"include_usage": True},
    )
    job_id = raw.headers["x-request-id"]
    stream = raw.parse()
    seen: list[str] = []
    engine.release(2)
    async for chunk in stream:
        seen.append(chunk.choices[0].delta.content or "")
        if len(seen) == 3:  # the role chunk and two words: ids 1..3
            break
    await stream.close()  # the client drops
    job = served.app.http_api.jobs.get(job_id, served.app.hub.cfg.label_of(TOKEN))
    assert job is not None
    engine.release(3)  # three more words while nobody listens
    await wait_until(lambda: len(job.chunks) >= 6)
    assert not engine.handles[0].cancelled.is_set()
    headers = {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": "3"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{served.base}/v1/chat/completions/{job_id}/stream", headers=headers) as resp,
    ):
        assert resp.status == 200 and resp.headers["X-Request-Id"] == job_id
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"id: 4\n")
        engine.release(10)  # the rest comes live
        rest = first + await resp.read()
    events = parse_sse(rest.decode())
    assert [seq for seq, _ in events] == list(range(4, 4 + len(events)))
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    text = "".join(seen) + "".join(
        c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
    )
    assert text == ANSWER
    assert chunks[-1]["usage"]["completion_tokens"] == len(ANSWER.split(" "))


async def test_only_the_starting_token_may_resume_or_cancel(
    gated: tuple[Served, GatedEngine],
) -> None:
    served, engine = gated
    engine.release(100)
    raw = await served.client.chat.completions.with_raw_response.create(
        model="gated", messages=[user_message()]
    )
    job_id = raw.headers["x-request-id"]
    async with aiohttp.ClientSession() as http:
        for key, path in ((OTHER, job_id), (TOKEN, "chatcmpl-unknown")):
            url = f"{served.base}/v1/chat/completions/{path}/stream"
            async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "not_found"
            url = f"{served.base}/v1/chat/completions/{path}"
            async with http.delete(url, headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 404
        url = f"{served.base}/v1/chat/completions/{job_id}/stream"
        for bad in ("-1", "abc", "9" * 40):
            headers = {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": bad}
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 400
        # The finished job replays whole for its own token (non-streamed jobs too).
        async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            events = parse_sse(await resp.text())
    assert events[-1][1] == "[DONE]" and events[0][0] == 1


async def test_delete_cancels_and_the_stream_ends_with_an_error(
    gated: tuple[Served, GatedEngine],
) -> None:
    served, engine = gated
    raw = await served.client.chat.completions.with_raw_response.create(
        model="gated", messages=[user_message()], stream=True
    )
    job_id = raw.headers["x-request-id"]
    stream = raw.parse()
    engine.release(1)
    got = []
    with pytest.raises(openai.APIError) as err:
        async for chunk in stream:
            got.append(chunk)
            if len(got) == 2:
                async with (
                    aiohttp.ClientSession() as http,
                    http.delete(
                        f"{served.base}/v1/chat/completions/{job_id}",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                    ) as resp,
                ):
                    assert resp.status == 200
                    assert await resp.json() == {
                        "id": job_id,
                        "object": "chat.completion.deleted",
                        "deleted": True,
                    }
    assert "cancelled" in str(err.value.message)
    assert engine.handles[0].cancelled.is_set()


async def test_a_long_wait_in_the_queue_sends_keepalive_comments(
    gated: tuple[Served, GatedEngine],
) -> None:
    served, engine = gated
    api = served.app.http_api
    api.cfg = dataclasses.replace(api.cfg, keepalive_s=0.05)
    engine.hold = asyncio.Event()
    body = {"messages": [user_message()], "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{served.base}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as resp,
    ):
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"id: 1\n")
        assert await resp.content.readuntil(b"\n\n") == b": keep-alive\n\n"
        engine.hold.set()
        engine.release(100)
        text = (await resp.read()).decode()
    events = [b for b in text.split("\n\n") if b and not b.startswith(":")]
    assert events[0].startswith("id: 2\n") and events[-1].endswith("data: [DONE]")
