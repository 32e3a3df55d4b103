"""Parse and validate a ``POST /v1/chat/completions`` body into one engine job (no I/O).

The engine answers one prompt about one image, so the conversation's texts are joined into one
prompt and exactly one image part must be present. Sampling parameters the engine does not take
(``temperature``, ``top_p``, ``seed``, penalties, ``user``) are validated and accepted, since
ignoring them changes nothing a client relies on; features it cannot honour (``n`` > 1, tools,
log probabilities) are refused so a client never waits for what will not come.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bridge.http.errors import ApiError
from engine.sanitize import is_valid_text

MAX_MESSAGES = 256
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_TOKENS = 65_536
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_DATA_URL = re.compile(r"data:(image/[A-Za-z0-9.+-]{1,64})((?:;[^;,]{0,64}){0,4});base64,", re.I)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the parser accepts.

    Attributes:
        max_image_bytes: largest decoded image (413 beyond it).
        max_prompt_chars: longest joined prompt.
        image_hosts: hosts whose http(s) image URLs may be fetched (lower case; empty: none).
    """

    max_image_bytes: int
    max_prompt_chars: int
    image_hosts: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat completion request: one prompt, one image (bytes or an allowed URL)."""

    model: str | None
    prompt: str
    image: bytes | None
    image_url: str | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


def _bad(message: str, param: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, message, param=param, code="invalid_request")


def parse_chat(body: bytes, limits: Limits) -> ChatRequest:
    """The :class:`ChatRequest` in ``body``, or :class:`ApiError` (400, or 413 for a big image)."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise _bad("the body must be a JSON object")
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 256):
        raise _bad("'model' must be a model id string", "model")
    prompt, image, url = _messages(obj.get("messages"), limits)
    _refuse_unsupported(obj)
    _number(obj, "temperature", 0.0, 2.0)
    _number(obj, "top_p", 0.0, 1.0)
    _number(obj, "presence_penalty", -2.0, 2.0)
    _number(obj, "frequency_penalty", -2.0, 2.0)
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("'seed' must be an integer", "seed")
    max_tokens = _max_tokens(obj, "max_tokens")
    newer = _max_tokens(obj, "max_completion_tokens")
    stream = obj.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = obj.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        include_usage = options.get("include_usage", False) is True
    return ChatRequest(
        model=model,
        prompt=prompt,
        image=image,
        image_url=url,
        max_tokens=newer if newer is not None else max_tokens,
        stream=stream,
        include_usage=include_usage,
        stop=_stop(obj.get("stop")),
    )


def _messages(raw: object, limits: Limits) -> tuple[str, bytes | None, str | None]:
    """The joined prompt and the one image of ``messages``."""
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty array", "messages")
    if len(raw) > MAX_MESSAGES:
        raise _bad(f"'messages' holds more than {MAX_MESSAGES} messages", "messages")
    turns: list[tuple[str, str]] = []
    images: list[tuple[bytes | None, str | None]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}", where + ".role")
        texts = _content(message.get("content"), where, role, limits, images)
        turns.append((role, "\n".join(texts)))
    if not images:
        raise _bad("a message must carry one image_url part (the model answers about an image)")
    if len(images) > 1:
        raise _bad("only one image per request is supported", "messages")
    if len(turns) == 1:
        prompt = turns[0][1]
    else:
        prompt = "\n".join(f"{role.capitalize()}: {text}" for role, text in turns if text)
    if len(prompt) > limits.max_prompt_chars:
        raise _bad(f"the prompt exceeds {limits.max_prompt_chars} characters", "messages")
    image, url = images[0]
    return prompt, image, url


def _content(
    raw: object,
    where: str,
    role: str,
    limits: Limits,
    images: list[tuple[bytes | None, str | None]],
) -> list[str]:
    """The texts of one message's content; image parts are appended to ``images``."""
    if raw is None and role == "assistant":
        return []
    if isinstance(raw, str):
        return [_text(raw, where + ".content")]
    if not isinstance(raw, list):
        raise _bad(f"'{where}.content' must be a string or an array of parts", where + ".content")
    texts = []
    for j, part in enumerate(raw):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _bad(f"'{at}' must be an object", at)
        kind = part.get("type")
        if kind == "text":
            texts.append(_text(part.get("text"), at + ".text"))
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"'{at}': image parts are only accepted in user messages", at)
            images.append(_image(part.get("image_url"), at + ".image_url", limits))
        else:
            raise _bad(f"'{at}.type' must be 'text' or 'image_url'", at + ".type")
    return texts


def _text(raw: object, param: str) -> str:
    if not isinstance(raw, str):
        raise _bad(f"'{param}' must be a string", param)
    if not is_valid_text(raw):
        raise _bad(f"'{param}' is not valid Unicode (lone surrogate)", param)
    return raw


def _image(raw: object, param: str, limits: Limits) -> tuple[bytes | None, str | None]:
    """Decoded data-URL bytes, or an http(s) URL of an allowed host."""
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        raise _bad(f"'{param}' must be an object with a 'url' string", param)
    detail = raw.get("detail")
    if detail is not None and detail not in ("auto", "low", "high"):
        raise _bad(f"'{param}.detail' must be auto, low or high", param + ".detail")
    url: str = raw["url"]
    if url[:5].lower() == "data:":
        return decode_data_url(url, param + ".url", limits.max_image_bytes), None
    check_image_url(url, limits.image_hosts, param + ".url")
    return None, url


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL (400 when malformed, 413 when too big)."""
    match = _DATA_URL.match(url)
    if match is None:
        raise _bad(f"'{param}' must be a data:image/...;base64,... URL", param)
    payload = url[match.end() :]
    # Four base64 characters carry three bytes; refuse before decoding anything large.
    if (len(payload) // 4) * 3 > max_bytes + 3:
        raise ApiError(413, f"the image exceeds {max_bytes} bytes", param=param, code="too_large")
    try:
        image = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"'{param}' is not valid base64", param) from None
    if not image:
        raise _bad(f"'{param}' holds an empty image", param)
    if len(image) > max_bytes:
        raise ApiError(413, f"the image exceeds {max_bytes} bytes", param=param, code="too_large")
    return image


def check_image_url(url: str, hosts: frozenset[str], param: str) -> None:
    """Refuse (400) a URL that is not http(s) or whose host is not in ``hosts``."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        raise _bad(f"'{param}' is not a valid URL", param) from None
    if parts.scheme not in ("http", "https") or not host:
        raise _bad(f"'{param}' must be a data: URL or an http(s) URL", param)
    if parts.username is not None or parts.password is not None:
        raise _bad(f"'{param}' must not carry credentials", param)
    if host not in hosts:
        raise ApiError(
            400,
            "image URLs are fetched only from hosts allowed by --http-image-hosts; "
            "send the image as a data: URL instead",
            param=param,
            code="image_host_not_allowed",
        )


def _number(obj: dict[str, Any], name: str, lo: float, hi: float) -> None:
    value = obj.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _bad(f"'{name}' must be a number in {lo:g}..{hi:g}", name)


def _max_tokens(obj: dict[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_TOKENS:
        raise _bad(f"'{name}' must be an integer in 1..{MAX_TOKENS}", name)
    return value


def _stop(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise _bad(f"'stop' must be a string or an array of at most {MAX_STOPS} strings", "stop")
    out = []
    for stop in stops:
        if not isinstance(stop, str) or not 0 < len(stop) <= MAX_STOP_CHARS:
            raise _bad(f"'stop' entries must be strings of 1..{MAX_STOP_CHARS} characters", "stop")
        if not is_valid_text(stop):
            raise _bad("'stop' is not valid Unicode (lone surrogate)", "stop")
        out.append(stop)
    return tuple(out)


def _refuse_unsupported(obj: dict[str, Any]) -> None:
    """Refuse what cannot be honoured; everything else unknown is ignored."""
    n = obj.get("n")
    if n is not None and n != 1:
        raise _bad("only n=1 is supported", "n")
    if obj.get("tools") or obj.get("functions"):
        raise _bad("tools and functions are not supported by this model", "tools")
    if obj.get("logprobs") is True:
        raise _bad("logprobs are not supported", "logprobs")
