"""Keeping the garbage collector from stalling the event loop once the model is loaded."""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Move everything alive now (torch, transformers, the model) out of the GC's reach.

    A full collection otherwise walks those millions of objects every few seconds under load and
    stalls the event loop for ~300 ms, making heartbeats late (see docs/benchmarks.md, Hub).
    """
    gc.collect()
    gc.freeze()
