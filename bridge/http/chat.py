"""Turn one job's engine events into OpenAI chat completion chunks (and the non-streamed answer).

``stop`` sequences are applied here, since the engine does not take them: text that could be the
start of a stop sequence is held back until it is known not to be one, and at a stop the answer
ends (``finish_reason: "stop"``) and the engine job is cancelled.
"""

from __future__ import annotations

from typing import Any

from bridge.http import sse
from bridge.http.errors import ApiError, from_engine
from engine.types import Delta, Done, Failed, JobEvent


class StopScanner:
    """Cuts a stream of text at the first of ``stops``; what it returns is final."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``held + text`` that can be emitted now (nothing once stopped)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    @property
    def held(self) -> str:
        """Text held back because it could begin a stop sequence."""
        return self._held

    def flush(self) -> str:
        """The held-back tail at the end of the answer (it was not a stop sequence)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class ChatRenderer:
    """Renders a job's events as chunk payloads (SSE data strings) and keeps the final answer.

    Attributes:
        text: the answer so far (after stop sequences).
        finish_reason: ``stop`` or ``length`` once finished.
        usage: OpenAI's usage object once finished.
        error: the job's failure, once it failed.
        finished: whether the answer is complete (done, failed or stopped).
        stopped: whether a stop sequence ended it (the engine job should be cancelled).
    """

    def __init__(
        self,
        job_id: str,
        created: int,
        model: str,
        *,
        include_usage: bool,
        stop: tuple[str, ...] = (),
        max_tokens: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.max_tokens = max_tokens
        self._scanner = StopScanner(stop)
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.error: ApiError | None = None
        self.finished = False
        self._completion_tokens = 0
        self._content_chunk = sse.ContentChunks(job_id, created, model)

    def first(self) -> list[str]:
        """The opening chunk (the assistant role), sent before any event."""
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, event: JobEvent) -> list[str]:
        """The payloads ``event`` adds (none for queued/started, nothing after the end)."""
        if self.finished:
            return []
        if isinstance(event, Delta):
            self._completion_tokens += 1
            out = self._content(self._scanner.feed(event.text))
            if self._scanner.stopped:
                usage = sse.usage_of(0, self._completion_tokens)
                out += self._finish("stop", usage)
            return out
        if isinstance(event, Done):
            out = []
            if event.text.startswith(self.text + self._scanner.held) and not self.stopped:
                rest = event.text[len(self.text) + len(self._scanner.held) :]
                out += self._content(self._scanner.feed(rest))
            out += self._content(self._scanner.flush())
            tokens = event.usage.completion_tokens
            capped = self.max_tokens is not None and tokens >= self.max_tokens
            reason = "stop" if self._scanner.stopped or not capped else "length"
            return out + self._finish(reason, sse.usage_of(event.usage.prompt_tokens, tokens))
        if isinstance(event, Failed):
            self.finished = True
            self.error = from_engine(event.code, event.message, event.retry_after)
            return [sse.dumps(self.error.body()), sse.DONE]
        return []

    @property
    def stopped(self) -> bool:
        """Whether a stop sequence ended the answer."""
        return self._scanner.stopped

    def completion(self) -> dict[str, Any]:
        """The non-streamed ``chat.completion`` object (call once finished without error)."""
        return {
            "id": self.job_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason or "stop",
                }
            ],
            "usage": self.usage or sse.usage_of(0, 0),
        }

    def _content(self, text: str) -> list[str]:
        if not text:
            return []
        self.text += text
        return [self._content_chunk(text)]

    def _finish(self, reason: str, usage: dict[str, int]) -> list[str]:
        self.finished = True
        self.finish_reason = reason
        self.usage = usage
        out = [self._chunk({}, reason)]
        if self.include_usage:
            out.append(sse.chunk(self.job_id, self.created, self.model, None, usage=usage))
        return [*out, sse.DONE]

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        return sse.chunk(self.job_id, self.created, self.model, delta, finish_reason)
