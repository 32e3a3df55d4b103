"""The jobs bench/http_vs_ws.py times: one streaming job over HTTP (prepared request on an open
connection, or the ``openai`` client) or over /ws (prepared submit frame on an open connection),
each returning its TTFT, total time and the usage it reported."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import openai

from bench.common import IMAGES
from bench.rawhttp import RawHttp

TOKEN = "bench-token"
PROMPT = "Describe the image."
PHOTO = (IMAGES / "chelsea.jpg").read_bytes()
#: One job: (TTFT seconds, total seconds, completion tokens, prompt tokens).
Result = tuple[float, float, int, int]


def prompt(tag: str) -> str:
    """The shared prompt with a job number, so no two jobs hit the answer cache."""
    return f"{PROMPT} #{tag}"


def chat_body(tag: str, max_tokens: int) -> bytes:
    """A streaming chat completion request body, encoded before the clock starts."""
    url = "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode()
    return json.dumps(
        {
            "model": "tiny",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": chat_content(tag, url)}],
        }
    ).encode()


def chat_content(tag: str, url: str) -> list[dict[str, object]]:
    """The user message's parts: the prompt and the photo as a data URL."""
    return [
        {"type": "text", "text": prompt(tag)},
        {"type": "image_url", "image_url": {"url": url}},
    ]


def submit_frame(tag: str, max_tokens: int) -> str:
    """The same job as a /ws submit frame, encoded before the clock starts."""
    image = base64.b64encode(PHOTO).decode("ascii")
    frame = {"type": "submit", "id": f"j{tag}", "prompt": prompt(tag), "image": image}
    return json.dumps({**frame, "max_tokens": max_tokens})


async def http_job(conn: RawHttp, request: bytes, go: asyncio.Event) -> Result:
    """One streaming chat completion on an open connection: the prepared request written when
    ``go`` is set, the SSE ``data:`` payloads read and decoded as they come."""
    await go.wait()
    t0 = time.perf_counter()
    ttft = float("nan")
    tokens = prompt_tokens = 0
    conn.send(request)
    async for data in conn.events():
        if data == b"[DONE]":
            continue
        chunk = json.loads(data)
        if ttft != ttft and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
            prompt_tokens = chunk["usage"]["prompt_tokens"]
    return ttft, time.perf_counter() - t0, tokens, prompt_tokens


async def openai_job(
    client: openai.AsyncOpenAI, tag: str, max_tokens: int, go: asyncio.Event
) -> Result:
    """One streaming chat completion through the official ``openai`` client (``--client
    openai``): its request building, JSON encoding and chunk parsing count in the latency."""
    content = chat_content(tag, "data:image/jpeg;base64," + base64.b64encode(PHOTO).decode())
    await go.wait()
    t0 = time.perf_counter()
    ttft = float("nan")
    tokens = prompt_tokens = 0
    stream = await client.chat.completions.create(
        model="tiny",
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": content}],  # type: ignore[misc, list-item]
    )
    async for chunk in stream:
        if ttft != ttft and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
            prompt_tokens = chunk.usage.prompt_tokens
    return ttft, time.perf_counter() - t0, tokens, prompt_tokens


async def ws_open(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    """A /ws connection past ``hello``/``welcome``."""
    ws = await http.ws_connect(url, max_msg_size=64 * 2**20, autoping=True)
    await ws.send_str(
        json.dumps({"type": "hello", "token": TOKEN, "session": None, "last_seq": None})
    )
    welcome = json.loads((await ws.receive(10.0)).data)
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome}")
    return ws


async def ws_job(ws: aiohttp.ClientWebSocketResponse, frame: str, go: asyncio.Event) -> Result:
    """One /ws job on an open connection: the prepared submit frame sent when ``go`` is set,
    the event frames read and decoded as they come."""
    await go.wait()
    t0 = time.perf_counter()
    ttft = float("nan")
    await ws.send_str(frame)
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        event = json.loads(msg.data)
        if event.get("type") == "ping":  # the hub's heartbeat, answered as HubClient does
            await ws.send_str(json.dumps({"type": "pong", "ts": event.get("ts")}))
            continue
        kind = event.get("kind")
        if kind == "delta" and ttft != ttft:
            ttft = time.perf_counter() - t0
        elif event.get("type") == "error" or kind == "error":
            raise RuntimeError(f"ws job failed: {event}")
        elif kind == "done":
            usage = event["usage"]
            total = time.perf_counter() - t0
            return ttft, total, int(usage["completion_tokens"]), int(usage["prompt_tokens"])
    raise RuntimeError(f"ws connection closed before done: {ws.close_code} {ws.exception()!r}")
