"""``image_url`` over http(s): only from ``--http-image-hosts``, within size, no redirects."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.http.conftest import PHOTO, TOKEN, Served, serve, user_message, wait_ready
from tests.http.fakes import GatedEngine


@pytest.fixture
async def images() -> AsyncIterator[str]:
    """A loopback image host: /cat.jpg, /huge.jpg (11 MiB), /moved (302), /missing (404)."""

    async def cat(_r: web.Request) -> web.Response:
        return web.Response(body=PHOTO, content_type="image/jpeg")

    async def huge(_r: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # no Content-Length: the size shows only while reading
        await resp.prepare(_r)
        for _ in range(11):
            await resp.write(b"\0" * 2**20)
        return resp

    async def moved(_r: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:1/elsewhere.jpg")

    app = web.Application()
    app.router.add_get("/cat.jpg", cat)
    app.router.add_get("/huge.jpg", huge)
    app.router.add_get("/moved", moved)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_allowed_host_is_fetched_and_the_limits_hold(images: str) -> None:
    engine = GatedEngine()
    engine.release(1000)
    app = await serve(engine, flags={"http-image-hosts": "127.0.0.1", "max-image-bytes": "10MiB"})
    try:
        await wait_ready(app.urls[0])
        served = Served(app, app.urls[0], [])
        client = served.openai(TOKEN)
        done = await client.chat.completions.create(
            model="gated", messages=[user_message(url=images + "/cat.jpg")]
        )
        assert done.choices[0].message.content
        assert engine.handles[-1].request.image == PHOTO
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(
                model="gated", messages=[user_message(url=images + "/huge.jpg")]
            )
        assert err.value.status_code == 413
        for path in ("/moved", "/missing"):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(
                    model="gated", messages=[user_message(url=images + path)]
                )
            assert bad.value.code == "image_fetch_failed"
        # localhost is a different host name: not allowed.
        with pytest.raises(openai.BadRequestError) as bad:
            url = images.replace("127.0.0.1", "localhost") + "/cat.jpg"
            await client.chat.completions.create(model="gated", messages=[user_message(url=url)])
        assert bad.value.code == "image_host_not_allowed"
        assert len(engine.handles) == 1
        await served.close()
    finally:
        await app.stop(grace_s=1.0)
