"""A cache of vision-tower outputs, so a second question about the same photo skips decoding,
preprocessing and the vision encoder and goes straight to prefill.

Entries are keyed by (model identity, image content hash, preprocessing size), bounded in bytes,
least recently used first out, and expire after a TTL. The feature tensors stay on the device
that computed them (the one that uses them).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.cache import TtlLru

_ENTRY_OVERHEAD = 256  # rough bytes of bookkeeping per entry


def vision_key(model_tag: str, image_digest: bytes, preprocessing: str) -> str:
    """The identity of one image's features: SHA-256 over model, image hash and preprocessing."""
    digest = hashlib.sha256()
    for part in (model_tag.encode(), image_digest, preprocessing.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def tensor_bytes(features: torch.Tensor) -> int:
    """Bytes a feature tensor holds on its device."""
    return int(features.numel() * features.element_size())


class VisionCache(TtlLru[torch.Tensor]):
    """Thread-safe LRU of feature tensors with a TTL and a byte bound; 0 bytes disables it.

    ``on_lookup(hit)`` and ``on_bytes(size)`` feed metrics (called on the caller's thread).
    """

    def __init__(
        self,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_lookup: Callable[[bool], None] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(ttl_s, max_bytes, clock)
        self._on_lookup = on_lookup
        self._on_bytes = on_bytes

    def get(self, key: str) -> torch.Tensor | None:
        """The fresh features for ``key`` or None (an expired entry is dropped)."""
        if not self.enabled:
            return None
        features = super().get(key)
        if self._on_lookup is not None:
            self._on_lookup(features is not None)
        self._report()
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Keep ``features`` (detached), evicting the least recently used beyond the bound."""
        if not self.enabled:
            return
        self.store(key, features.detach(), tensor_bytes(features) + len(key) + _ENTRY_OVERHEAD)
        self._report()

    def clear(self) -> None:
        """Forget everything (a hot swap changes the vision tower)."""
        super().clear()
        self._report()

    def snapshot(self) -> dict[str, Any]:
        """Counts for the engine status."""
        return {
            "entries": len(self),
            "bytes": self.size_bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }

    def _report(self) -> None:
        if self._on_bytes is not None:
            self._on_bytes(self.size_bytes)
