"""Reading a dashboard request's form or JSON body under a small size cap, and writing its JSON
and redirect responses, so every handler parses and answers the same way."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from bridge.dashboard.errors import ApiError

MAX_FORM_BYTES = 4096


def redirect(location: str) -> web.Response:
    """A ``303 See Other`` to ``location`` that no cache keeps."""
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as compact JSON that no cache keeps."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return web.Response(
        text=text,
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def read_body(request: web.Request) -> bytes:
    """The request body, refused with 413 past :data:`MAX_FORM_BYTES`."""
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise ApiError(413, "too_large", f"request body over {MAX_FORM_BYTES} bytes")
    body = await request.content.read(MAX_FORM_BYTES + 1)
    if len(body) > MAX_FORM_BYTES:
        raise ApiError(413, "too_large", f"request body over {MAX_FORM_BYTES} bytes")
    return body


async def read_form(request: web.Request, required: bool = True) -> dict[str, str]:
    """The url-encoded form fields (first value of each); ``{}`` for no body when not required."""
    if request.content_type != "application/x-www-form-urlencoded":
        if not required and not request.can_read_body:
            return {}
        raise ApiError(415, "unsupported_media_type", "send application/x-www-form-urlencoded")
    body = await read_body(request)
    try:
        parsed = parse_qs(body.decode("utf-8"), max_num_fields=8, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "bad_request", "malformed form body") from exc
    return {key: values[0] for key, values in parsed.items() if values}


async def read_json(request: web.Request) -> dict[str, Any]:
    """The JSON object in the body (400 for anything else)."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send application/json")
    body = await read_body(request)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "bad_request", "malformed JSON body") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return data
