"""Which devices and dtype a replica loads on, and the torch memory helpers (out-of-memory test,
cache release) that the loader and the workers share."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_devices(device: str, device_map: str | None) -> list[str]:
    """The devices to put one replica each on (or the single entry ``map`` for a device_map)."""
    if device_map:
        return ["map"]
    if device == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if device.startswith("cuda:"):
        if not torch.cuda.is_available() or int(device[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available")
        return [device]
    if device == "cpu":
        return ["cpu"]
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` picks bf16 on a CUDA device that supports it, fp16 on older ones, fp32 on CPU."""
    if dtype == "auto":
        if device.startswith("cuda") or device == "map":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        choices = "auto, float32, float16 or bfloat16"
        raise ValueError(f"unknown dtype {dtype!r}; use {choices}") from None


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error from any torch backend."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory() -> None:
    """Return cached allocator blocks after an OOM or an unload."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
