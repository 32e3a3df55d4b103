"""Chat completions with the official openai client against the bridge running the tiny model."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from tests.http.conftest import PHOTO, Served, user_message


async def test_models_lists_the_served_model_and_tiny(tiny: Served) -> None:
    models = await tiny.client.models.list()
    ids = [m.id for m in models.data]
    assert "tiny" in ids and len(ids) == 2
    assert (await tiny.client.models.retrieve("tiny")).id == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        await tiny.client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"


async def test_non_streaming_completion_with_a_data_url_image_has_usage(tiny: Served) -> None:
    raw = await tiny.client.chat.completions.with_raw_response.create(
        model="tiny", messages=[user_message()], max_tokens=6, temperature=0.2, top_p=0.9, seed=7
    )
    done = raw.parse()
    assert raw.headers["x-request-id"] == done.id and done.id.startswith("chatcmpl-")
    assert done.object == "chat.completion" and done.model == "tiny"
    choice = done.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.prompt_tokens > 0
    assert 0 < done.usage.completion_tokens <= 6
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


async def test_streaming_with_usage_ends_with_done_and_matches_the_whole_answer(
    tiny: Served,
) -> None:
    stream = await tiny.client.chat.completions.create(
        model="tiny",
        messages=[user_message()],
        max_completion_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and 0 < usage.completion_tokens <= 8
    # The same job again, not streamed, gives the same text (greedy decoding).
    again = await tiny.client.chat.completions.create(
        model="tiny", messages=[user_message()], max_completion_tokens=8
    )
    assert again.choices[0].message.content == text


async def test_the_wire_has_sse_ids_and_a_done_line(tiny: Served) -> None:
    body = {"messages": [user_message()], "max_tokens": 4, "stream": True}  # no model: default
    headers = {"Authorization": "Bearer sk-http-test-token-1"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(tiny.base + "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        text = (await resp.read()).decode()
    blocks = [b for b in text.split("\n\n") if b]
    ids = [int(b.split("\n")[0].removeprefix("id: ")) for b in blocks]
    assert ids == list(range(1, len(blocks) + 1))
    assert blocks[-1].endswith("data: [DONE]")


async def test_a_wrong_model_is_404_model_not_found(tiny: Served) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await tiny.client.chat.completions.create(model="gpt-4o", messages=[user_message()])
    assert err.value.code == "model_not_found"
    assert err.value.body["param"] == "model"  # type: ignore[index]


async def test_a_bad_or_missing_key_is_401_and_not_echoed(tiny: Served) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        await tiny.openai("sk-wrong-secret-key").chat.completions.create(
            model="tiny", messages=[user_message()]
        )
    assert "sk-wrong-secret-key" not in str(err.value.body)
    with pytest.raises(openai.AuthenticationError):
        await tiny.openai("sk-wrong-secret-key").models.list()
    async with aiohttp.ClientSession() as http, http.get(tiny.base + "/v1/models") as resp:
        assert resp.status == 401
        body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key"


async def test_analyze_multipart_answers_with_the_bridges_job_events(tiny: Served) -> None:
    form = aiohttp.FormData()
    form.add_field("image", PHOTO, filename="chelsea.jpg", content_type="image/jpeg")
    form.add_field("prompt", "What is in the picture?")
    form.add_field("max_tokens", "5")
    headers = {"Authorization": "Bearer sk-http-test-token-1"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(tiny.base + "/v1/analyze", data=form, headers=headers) as resp,
    ):
        assert resp.status == 200 and resp.headers["X-Request-Id"].startswith("an-")
        text = (await resp.read()).decode()
    import json

    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "queued" and "position" in events[0]
    assert "started" in kinds and kinds[-1] == "done"
    deltas = "".join(e["text"] for e in events if e["kind"] == "delta")
    assert deltas == events[-1]["text"] and events[-1]["usage"]["completion_tokens"] <= 5


async def test_http_jobs_count_on_metrics_with_their_origin(tiny: Served) -> None:
    await tiny.client.chat.completions.create(model="tiny", messages=[user_message()], max_tokens=3)
    async with aiohttp.ClientSession() as http:
        for _ in range(200):  # the job's end is counted just after its last chunk
            async with http.get(tiny.base + "/metrics") as resp:
                text = await resp.text()
            if 'bridge_jobs_total{origin="http",outcome="done"} 1.0' in text:
                break
            await asyncio.sleep(0.02)
    assert 'bridge_jobs_total{origin="http",outcome="done"} 1.0' in text
