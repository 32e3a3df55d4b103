"""The one encoding of job events: an engine event as JSON-ready fields, and back.

Every surface that carries job events uses these fields: the /ws event frames
(:func:`bridge.hub.protocol.event_tail`), the cluster event log (:mod:`bridge.fanout`) and the
HTTP API's ``/v1/analyze`` stream. ``usage`` is always the object
``{"prompt_tokens", "completion_tokens"}``; ``retry_after`` appears only when set.
"""

from __future__ import annotations

from typing import Any

from engine.types import Delta, Done, Failed, JobEvent, Queued, Started, Usage


def event_fields(event: JobEvent) -> dict[str, Any]:
    """``kind`` and the fields of ``event``, in wire order.

    Raises:
        TypeError: ``event`` is not a job event.
    """
    if isinstance(event, Delta):  # the common case first: one per token
        return {"kind": "delta", "text": event.text}
    if isinstance(event, Queued):
        return {"kind": "queued", "position": event.position}
    if isinstance(event, Started):
        return {"kind": "started"}
    if isinstance(event, Done):
        return {
            "kind": "done",
            "text": event.text,
            "usage": {
                "prompt_tokens": event.usage.prompt_tokens,
                "completion_tokens": event.usage.completion_tokens,
            },
            "cached": event.cached,
        }
    if isinstance(event, Failed):
        fields: dict[str, Any] = {"kind": "error", "code": event.code, "message": event.message}
        if event.retry_after is not None:
            fields["retry_after"] = event.retry_after
        return fields
    raise TypeError(f"not a job event: {event!r}")


def event_from_fields(data: dict[str, Any]) -> JobEvent:
    """The inverse of :func:`event_fields`; unknown fields are ignored.

    ``usage`` is also read in the ``[prompt, completion]`` form that nodes of an earlier version
    append to the cluster's event log, so a rolling upgrade loses no event.

    Raises:
        ValueError: ``data`` does not describe a job event.
    """
    try:
        kind = data["kind"]
        if kind == "delta":
            return Delta(_text(data["text"]))
        if kind == "queued":
            return Queued(_int(data["position"]))
        if kind == "started":
            return Started()
        if kind == "done":
            return Done(_text(data["text"]), _usage(data["usage"]), bool(data.get("cached")))
        if kind == "error":
            retry_after = data.get("retry_after")
            return Failed(
                _text(data["code"]),
                _text(data["message"]),
                None if retry_after is None else _seconds(retry_after),
            )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a job event: {exc!r}") from None
    raise ValueError(f"unknown event kind {kind!r}")


def _usage(raw: Any) -> Usage:
    if isinstance(raw, dict):
        return Usage(_int(raw["prompt_tokens"]), _int(raw["completion_tokens"]))
    if isinstance(raw, list) and len(raw) == 2:
        return Usage(_int(raw[0]), _int(raw[1]))
    raise ValueError("usage must be an object with prompt_tokens and completion_tokens")


def _int(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"expected an integer, got {type(raw).__name__}")
    return raw


def _seconds(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"expected a number of seconds, got {type(raw).__name__}")
    try:
        return float(raw)
    except OverflowError:  # an int beyond any float
        raise ValueError("retry_after is out of range") from None


def _text(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    return raw
