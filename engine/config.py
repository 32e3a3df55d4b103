"""Engine settings: one frozen dataclass mirroring the ``bridge serve`` engine options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.limits import DEFAULT_LIMITS, Limits

BATCHING_MODES = ("static", "continuous", "auto")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine loads its model and schedules jobs.

    Attributes:
        model: ``tiny`` (the built-in random-weight model), a local folder or a Hugging Face id.
        device: ``auto`` (every CUDA device, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto`` (bf16 on CUDA when supported, else fp32), ``float32``, ``float16``,
            ``bfloat16``.
        device_map: passed to ``from_pretrained`` (e.g. ``auto``) for a model larger than one
            GPU; the engine then runs a single replica spanning the devices.
        max_batch: most jobs in one ``generate`` call.
        batch_wait_ms: how long the first waiting job may wait for others to join its batch.
        queue_size: waiting jobs before new ones are refused with ``busy``.
        max_new_tokens: cap on generated tokens per job.
        job_timeout_s: default deadline of a job from submission.
        cache_ttl_s: how long a finished answer may be served again (0 disables the cache).
        cache_max_bytes: the answer cache's size bound.
        shared_cache_timeout_s: how long a decode thread waits for the cluster-wide answer cache
            (when the bridge gives the engine one) before treating the lookup as a miss.
        vision_cache_bytes: bound on the cached vision-tower outputs (0 disables the cache), so
            another question about the same image skips decoding and the vision encoder.
        vision_cache_ttl_s: how long cached image features may be reused.
        limits: the shared size limits (:class:`~engine.limits.Limits`): images over
            ``max_image_bytes`` or ``max_image_pixels`` (read from the header, refused
            undecoded) and prompts over ``max_prompt_chars`` are refused with ``too_large``.
        warmup: run a short generate on every replica before reporting ready.
        decode_threads: threads decoding images off the event loop.
        busy_retry_after_s: the ``retry_after`` hint sent with ``busy``.
        ignore_eos: generate exactly ``max_tokens`` tokens (benchmarks with a fixed output length).
        batching: ``static`` (gather a batch, one ``generate`` until its last row ends),
            ``continuous`` (admit waiting jobs between decode steps, up to ``max_batch`` rows;
            models that cannot support it fall back to static) or ``auto``
            (continuous on text backbones verified with it, static elsewhere).
    """

    model: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    queue_size: int = 256
    max_new_tokens: int = 256
    job_timeout_s: float = 120.0
    cache_ttl_s: float = 600.0
    cache_max_bytes: int = 64 * 2**20
    shared_cache_timeout_s: float = 0.5
    vision_cache_bytes: int = 256 * 2**20
    vision_cache_ttl_s: float = 600.0
    limits: Limits = DEFAULT_LIMITS
    warmup: bool = True
    decode_threads: int = 2
    busy_retry_after_s: float = 1.0
    ignore_eos: bool = False
    # static stays the default: on the CPU benchmark continuous batching kept twice the rows per
    # decode step but gained only 0-8% throughput, within noise (docs/benchmarks.md).
    batching: Literal["static", "continuous", "auto"] = "static"

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be >= 0")
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.job_timeout_s <= 0:
            raise ValueError("job_timeout_s must be > 0")
        if self.shared_cache_timeout_s <= 0:
            raise ValueError("shared_cache_timeout_s must be > 0")
        if self.vision_cache_bytes < 0:
            raise ValueError("vision_cache_bytes must be >= 0")
        if self.decode_threads < 1:
            raise ValueError("decode_threads must be >= 1")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}")
