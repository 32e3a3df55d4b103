"""What a job request must satisfy before the engine queues it: the checks that refuse, with
``bad_request`` or ``too_large``, a request that could never run, in one place for every caller."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.sanitize import is_valid_text
from engine.types import EngineError, JobRequest


def admit(request: JobRequest, config: EngineConfig) -> tuple[int, float]:
    """Check ``request`` against ``config``; return its effective ``(max_tokens, timeout_s)``.

    Raises:
        EngineError: ``bad_request`` or ``too_large`` for requests that can never run.
    """
    max_tokens = request.max_tokens
    if max_tokens is None:
        max_tokens = config.max_new_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise EngineError("bad_request", "max_tokens must be a positive integer")
    max_tokens = min(max_tokens, config.max_new_tokens)
    timeout = config.job_timeout_s if request.timeout_s is None else request.timeout_s
    if not timeout > 0:
        raise EngineError("bad_request", "timeout_s must be positive")
    if not isinstance(request.prompt, str):
        raise EngineError("bad_request", "prompt must be text")
    if not is_valid_text(request.prompt):
        # The edges refuse or repair such text; a caller that did neither gets told here
        # instead of handing the tokenizer a string it cannot encode.
        raise EngineError("bad_request", "prompt is not valid Unicode (lone surrogate)")
    limits = config.limits
    if len(request.prompt) > limits.max_prompt_chars:
        raise EngineError(
            "too_large", f"prompt is longer than {limits.max_prompt_chars} characters"
        )
    if not isinstance(request.image, bytes | bytearray | memoryview):
        raise EngineError("bad_request", "image must be bytes")
    if len(request.image) > limits.max_image_bytes:
        raise EngineError("too_large", f"image is larger than {limits.max_image_bytes} bytes")
    return max_tokens, timeout
