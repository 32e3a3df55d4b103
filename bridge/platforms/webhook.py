"""The aiohttp side of an adapter's webhook: raw headers and body in, its JSON answer out."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from aiohttp import web

from adapters.base import WebhookResponse

WebhookHandler = Callable[[Mapping[str, str], bytes], Awaitable[WebhookResponse]]


def json_webhook(
    handle: WebhookHandler,
) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
    """An aiohttp handler that passes the request to ``handle`` and answers its JSON body."""

    async def route(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        result = await handle(dict(request.headers), body)
        return web.json_response(result.body, status=result.status)

    return route
