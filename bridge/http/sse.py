"""Server-sent events on the wire (``id:`` / ``event:`` / ``data:`` lines) and the payloads the
API streams: OpenAI's ``chat.completion.chunk`` objects and the bridge's own job events."""

from __future__ import annotations

import json
from typing import Any

from bridge.hub.protocol import event_tail
from engine.types import JobEvent

DONE = "[DONE]"
#: An SSE comment: ignored by clients, keeps an idle response alive through proxies.
KEEPALIVE = b": keep-alive\n\n"


def encode(data: str, seq: int | None = None, event: str | None = None) -> bytes:
    """One SSE message; ``data`` is split on newlines so each line gets its own ``data:``."""
    if event is None and "\n" not in data:
        # The streaming hot path (one compact JSON line per chunk): one format, one encode.
        head = "" if seq is None else f"id: {seq}\n"
        return f"{head}data: {data}\n\n".encode()
    lines = []
    if seq is not None:
        lines.append(f"id: {seq}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend("data: " + line for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def dumps(obj: dict[str, Any]) -> str:
    """Compact JSON on one line (SSE data must not need splitting)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def chunk(
    job_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> str:
    """A ``chat.completion.chunk``; ``delta`` None makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": job_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return dumps(body)


class ContentChunks:
    """Renders the ``chat.completion.chunk`` of a content delta from precomputed JSON around the
    escaped text: byte for byte what :func:`chunk` gives, without building and encoding the
    whole object for every streamed token."""

    __slots__ = ("_head", "_tail")

    def __init__(self, job_id: str, created: int, model: str) -> None:
        marker = "\x00"
        whole = chunk(job_id, created, model, {"content": marker})
        head, _, tail = whole.partition(dumps({"c": marker})[5:-1])
        self._head = head
        self._tail = tail

    def __call__(self, text: str) -> str:
        """The chunk carrying ``text`` as its delta's content."""
        return self._head + json.dumps(text, ensure_ascii=False) + self._tail


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def job_event(job_id: str, event: JobEvent) -> str:
    """The bridge's own event, exactly as /ws frames carry it (without ``type``/``seq``), for
    ``/v1/analyze``."""
    return "{" + event_tail(job_id, event)
